//! Timing probe for the full-size UNet and VAE (random weights, real shapes), reporting wall and
//! CPU time (user+sys of the whole process) per call, so A/B comparisons survive a loaded machine.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-perf cargo run --release -p sd-engine --example unet_prof -- \
//!     unet|vae|unet-xl [RES=256] [ITERS=2]
//! ```
//! `SD_ENGINE_PROFILE=1` also prints the per-operation breakdown of the timed calls.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sd_engine::models::ops::{prof, Linear};
use sd_engine::models::unet::{sdxl_vector, UNet, UNetConfig};
use sd_engine::models::vae::{Vae, VaeConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// (user+sys CPU seconds of this process, peak RSS MB) from /proc.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Field 14 is index 11 after the name (state is field 3 → index 0).
    (ticks(11) + ticks(12)) / 100.0
}

/// Minor page faults of this process so far.
fn minflt() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    rest.split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn peak_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

fn random_vb(shapes: Vec<(String, Vec<usize>)>) -> Res<VarBuilder<'static>> {
    let dev = Device::Cpu;
    let mut map = HashMap::new();
    for (name, shape) in shapes {
        let t = if shape.len() == 1 && name.ends_with("weight") {
            Tensor::ones(shape, DType::F32, &dev)?
        } else {
            Tensor::randn(0f32, 0.02, shape, &dev)?
        };
        map.insert(name, t);
    }
    Ok(VarBuilder::from_tensors(map, DType::F32, &dev))
}

fn time(label: &str, iters: usize, mut f: impl FnMut() -> Res<()>) -> Res<()> {
    let (w0, c0) = (Instant::now(), cpu_s());
    f()?;
    println!(
        "{label} warm-up: wall {:.3} s, cpu {:.2} s",
        w0.elapsed().as_secs_f64(),
        cpu_s() - c0
    );
    prof::reset();
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    let f0 = minflt();
    for _ in 0..iters {
        let (w0, c0) = (Instant::now(), cpu_s());
        f()?;
        walls.push(w0.elapsed().as_secs_f64());
        cpus.push(cpu_s() - c0);
    }
    walls.sort_by(f64::total_cmp);
    cpus.sort_by(f64::total_cmp);
    println!(
        "{label}: wall min {:.3} med {:.3} s, cpu min {:.2} med {:.2} s over {iters}, peak RSS {} MB, {} page faults per call",
        walls[0],
        walls[iters / 2],
        cpus[0],
        cpus[iters / 2],
        peak_mb(),
        (minflt() - f0) / iters as u64
    );
    let report = prof::report();
    if !report.is_empty() {
        println!("{report}");
    }
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(String::as_str).unwrap_or("unet");
    let res: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let iters: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let dev = Device::Cpu;
    let l = res / 8;
    println!(
        "{what} @ {res} px, {} threads",
        candle_core::utils::get_num_threads()
    );
    match what {
        "unet" | "unet-xl" => {
            let xl = what == "unet-xl";
            let cfg = if xl {
                UNetConfig::sdxl()
            } else {
                UNetConfig::sd15()
            };
            let unet = UNet::load(random_vb(cfg.param_shapes())?, &cfg)?;
            let x = Tensor::randn(0f32, 1.0, (2, 4, l, l), &dev)?;
            let t = Tensor::new(&[500f32, 500.0], &dev)?;
            let ctx = Tensor::randn(0f32, 1.0, (2, 77, cfg.context_dim), &dev)?;
            let y = if xl {
                let pooled = Tensor::zeros((2, 1280), DType::F32, &dev)?;
                let s = res as u32;
                Some(sdxl_vector(&pooled, (s, s), (0, 0), (s, s))?)
            } else {
                None
            };
            println!("weights loaded, peak RSS {} MB", peak_mb());
            time("unet step", iters, || {
                let out = unet.forward(&x, &t, &ctx, y.as_ref())?;
                drop(out);
                Ok(())
            })?;
        }
        "vae" => {
            let cfg = VaeConfig::sd();
            let vae = Vae::load(random_vb(cfg.param_shapes())?, &cfg)?;
            let z = Tensor::randn(0f32, 1.0, (1, 4, l, l), &dev)?;
            time("vae decode", iters, || {
                vae.decode(&z)?;
                Ok(())
            })?;
        }
        "gemm" => {
            // gemm M N K: [M, K] x [K, N] through candle's matmul.
            let m = res;
            let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1024);
            let k: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2880);
            let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
            let reps = 20;
            a.matmul(&b)?;
            let (w0, c0) = (Instant::now(), cpu_s());
            for _ in 0..reps {
                a.matmul(&b)?;
            }
            let (w, c) = (w0.elapsed().as_secs_f64(), cpu_s() - c0);
            let gf = 2.0 * (m * n * k * reps) as f64 / 1e9;
            println!(
                "gemm {m}x{n}x{k}: {:.1} GFLOP/s wall, {:.1} GFLOP/s per CPU-second",
                gf / w,
                gf / c
            );
        }
        "linear" => {
            // linear M K N: ops::Linear (weight [N, K]) on x [M, K], and a GEMM with [K, N].
            let m = res;
            let k: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(320);
            let n: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2560);
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let lin = Linear::new(w.clone(), None)?;
            let wt = w.t()?.contiguous()?;
            let lin_b = Linear::new(w.clone(), Some(Tensor::randn(0f32, 1.0, n, &dev)?))?;
            let reps = 10;
            let gf = 2.0 * (m * n * k * reps) as f64 / 1e9;
            for (name, f) in [
                ("ops::Linear", &|| -> Res<()> {
                    lin.forward(&x)?;
                    Ok(())
                } as &dyn Fn() -> Res<()>),
                ("ops::Linear+bias", &|| {
                    lin_b.forward(&x)?;
                    Ok(())
                }),
                ("candle x·Wt(view)", &|| {
                    x.matmul(&w.t()?)?;
                    Ok(())
                }),
                ("candle x·Wt(contig)", &|| {
                    x.matmul(&wt)?;
                    Ok(())
                }),
            ] {
                f()?;
                let (w0, c0) = (Instant::now(), cpu_s());
                for _ in 0..reps {
                    f()?;
                }
                let (wl, c) = (w0.elapsed().as_secs_f64(), cpu_s() - c0);
                println!(
                    "{name:<22} {m}x{k}->{n}: {:.1} GFLOP/s wall, {:.1} per CPU-s",
                    gf / wl,
                    gf / c
                );
            }
        }
        other => return Err(format!("unknown target {other:?}").into()),
    }
    Ok(())
}
