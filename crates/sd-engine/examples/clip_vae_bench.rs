//! Micro-benchmarks for the attention, GroupNorm, CLIP and VAE hot paths (no criterion; one
//! measurement per process so peak RSS means something).
//!
//! ```text
//! cargo run -p sd-engine --example clip_vae_bench -- attn [SIZE]        # SD1.5 level-1 attention
//! cargo run -p sd-engine --example clip_vae_bench -- attn-plain [SIZE]  # same, whole score matrix
//! cargo run -p sd-engine --example clip_vae_bench -- gn                 # fused vs candle GroupNorm
//! cargo run -p sd-engine --example clip_vae_bench -- clip-l | clip-g
//! cargo run -p sd-engine --example clip_vae_bench -- vae-decode [SIZE]  # full SD VAE, random weights
//! cargo run -p sd-engine --example clip_vae_bench -- vae-encode [SIZE]
//! ```
//! SIZE is the image edge in pixels (default 512). Prints seconds and peak RSS (VmHWM).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use sd_engine::models::attention;
use sd_engine::models::clip::{ClipConfig, ClipTextModel};
use sd_engine::models::vae::{GroupNorm, Vae, VaeConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn randn(shape: &[usize], std: f64) -> Res<Tensor> {
    Ok(Tensor::randn(0f32, std as f32, shape, &Device::Cpu)?)
}

fn random_vb(shapes: &[(String, Vec<usize>)]) -> Res<VarBuilder<'static>> {
    let mut m = HashMap::new();
    for (name, shape) in shapes {
        let t = if shape.len() == 1 && name.ends_with("weight") {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else if shape.is_empty() {
            Tensor::new(1f32, &Device::Cpu)?
        } else {
            randn(shape, 0.02)?
        };
        m.insert(name.clone(), t);
    }
    Ok(VarBuilder::from_tensors(m, DType::F32, &Device::Cpu))
}

fn time<T>(label: &str, reps: usize, mut f: impl FnMut() -> Res<T>) -> Res<()> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{label}: median {:.4} s over {reps} (min {:.4}), peak RSS {:.0} MB",
        times[reps / 2],
        times[0],
        peak_rss_mb()
    );
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(String::as_str).unwrap_or("attn");
    let size: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let lat = size / 8;
    match what {
        "attn" | "attn-plain" => {
            // SD1.5 first UNet level, CFG batch 2: 8 heads of 40 over (size/8)² tokens.
            let l = lat * lat;
            let q = randn(&[2, 8, l, 40], 1.0)?;
            let k = randn(&[2, 8, l, 40], 1.0)?;
            let v = randn(&[2, 8, l, 40], 1.0)?;
            let ctx_k = randn(&[2, 8, 77, 40], 1.0)?;
            let plain = what == "attn-plain";
            time(&format!("{what} self {l}x{l}"), 3, || {
                Ok(if plain {
                    attention::sdpa_reference(&q, &k, &v, false)?
                } else {
                    attention::sdpa(&q, &k, &v)?
                })
            })?;
            time(&format!("{what} cross {l}x77"), 5, || {
                Ok(attention::sdpa(&q, &ctx_k, &ctx_k)?)
            })?;
        }
        "gn" => {
            let x = randn(&[2, 320, lat, lat], 1.0)?;
            let w = randn(&[320], 1.0)?;
            let b = randn(&[320], 1.0)?;
            let ours = GroupNorm::new(w.clone(), b.clone(), 32, 1e-5)?;
            let theirs = candle_nn::GroupNorm::new(w, b, 320, 32, 1e-5)?;
            time(
                "fused group norm + silu",
                10,
                || Ok(ours.forward(&x, true)?),
            )?;
            time("candle group norm + silu", 10, || {
                Ok(candle_nn::ops::silu(&theirs.forward(&x)?)?)
            })?;
        }
        "clip-l" | "clip-g" => {
            let cfg = if what == "clip-l" {
                ClipConfig::clip_l()
            } else {
                ClipConfig::open_clip_big_g()
            };
            let model = ClipTextModel::load(random_vb(&cfg.param_shapes())?, &cfg)?;
            let ids = Tensor::new(&[[49406u32; 77], [49407u32; 77]], &Device::Cpu)?;
            time(&format!("{what} forward batch 2"), 5, || {
                Ok(model.forward(&ids, 1, true)?)
            })?;
        }
        "vae-decode" | "vae-encode" => {
            let cfg = VaeConfig::sd();
            let vae = Vae::load(random_vb(&cfg.param_shapes())?, &cfg)?;
            let base = peak_rss_mb();
            if what == "vae-decode" {
                let z = randn(&[1, 4, lat, lat], 1.0)?;
                let t = Instant::now();
                let img = vae.decode(&z)?;
                println!(
                    "vae decode {size}px: {:.2} s, out {:?}, peak RSS {:.0} MB (weights+base {:.0} MB)",
                    t.elapsed().as_secs_f64(),
                    img.dims(),
                    peak_rss_mb(),
                    base
                );
            } else {
                let x = randn(&[1, 3, size, size], 0.5)?;
                let t = Instant::now();
                let (mean, _) = vae.encode(&x)?;
                println!(
                    "vae encode {size}px: {:.2} s, out {:?}, peak RSS {:.0} MB (weights+base {:.0} MB)",
                    t.elapsed().as_secs_f64(),
                    mean.dims(),
                    peak_rss_mb(),
                    base
                );
            }
        }
        other => return Err(format!("unknown benchmark {other:?}").into()),
    }
    Ok(())
}
