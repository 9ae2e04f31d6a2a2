//! Micro-benchmarks of the UNet's hot kernels at SD 1.5 shapes (CFG batch 2, 512 px image =
//! 64×64 latent at the first level, 32×32 at the second). No criterion: a warm-up call, then
//! the median of a few timed calls, with the achieved GFLOP/s where the FLOP count is clear.
//!
//! ```text
//! cargo bench -p sd-engine --bench kernels            # everything (under 2 minutes on 2 cores)
//! cargo bench -p sd-engine --bench kernels -- attn    # only benchmarks whose name contains "attn"
//! ```
//! Threads follow `RAYON_NUM_THREADS` (default: all cores).

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use sd_engine::models::attention;
use sd_engine::models::vae::{Conv2d, GroupNorm};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn randn(shape: &[usize], std: f32) -> Res<Tensor> {
    Ok(Tensor::randn(0f32, std, shape, &Device::Cpu)?)
}

struct Bench {
    filter: Vec<String>,
}

impl Bench {
    /// Times `f` (one warm-up, then `reps` runs) and prints the median; `flops` per call
    /// (0 = not meaningful) gives the GFLOP/s column.
    fn run<T>(
        &self,
        name: &str,
        reps: usize,
        flops: f64,
        mut f: impl FnMut() -> Res<T>,
    ) -> Res<()> {
        if !self.filter.is_empty() && !self.filter.iter().any(|p| name.contains(p.as_str())) {
            return Ok(());
        }
        drop(f()?);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            let out = f()?;
            times.push(t.elapsed().as_secs_f64());
            drop(out);
        }
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        let rate = if flops > 0.0 {
            format!("{:7.1} GFLOP/s", flops / med / 1e9)
        } else {
            String::new()
        };
        println!(
            "{name:<48} median {:9.3} ms  (min {:9.3}, n={reps}) {rate}",
            med * 1e3,
            times[0] * 1e3
        );
        Ok(())
    }
}

/// FLOPs of `[m, k] × [k, n]`.
fn mm_flops(m: usize, k: usize, n: usize) -> f64 {
    2.0 * (m * k * n) as f64
}

fn main() -> Res<()> {
    // `cargo bench` passes `--bench`; everything not starting with `-` filters by name.
    let filter = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let b = Bench { filter };
    println!(
        "threads: {} (RAYON_NUM_THREADS or all cores)",
        candle_core::utils::get_num_threads()
    );

    // --- Attention: SD 1.5 level 1 (320 ch = 8 heads × 40) and level 2 (640 = 8 × 80).
    for (side, d) in [(64usize, 40usize), (32, 80)] {
        let l = side * side;
        let q = randn(&[2, 8, l, d], 1.0)?;
        let k = randn(&[2, 8, l, d], 1.0)?;
        let v = randn(&[2, 8, l, d], 1.0)?;
        let ck = randn(&[2, 8, 77, d], 1.0)?;
        let cv = randn(&[2, 8, 77, d], 1.0)?;
        // QKᵀ and PV: two [L, d] × [d, L]-sized products per head.
        let self_flops = 2.0 * 16.0 * mm_flops(l, d, l);
        let reps = if side == 64 { 3 } else { 5 };
        b.run(
            &format!("attn self {l}x{l} 2x8 heads d={d} (fused)"),
            reps,
            self_flops,
            || Ok(attention::sdpa(&q, &k, &v)?),
        )?;
        b.run(
            &format!("attn self {l}x{l} 2x8 heads d={d} (plain)"),
            reps,
            self_flops,
            || Ok(attention::sdpa_reference(&q, &k, &v, false)?),
        )?;
        b.run(
            &format!("attn cross {l}x77 2x8 heads d={d} (fused)"),
            10,
            2.0 * 16.0 * mm_flops(l, d, 77),
            || Ok(attention::sdpa(&q, &ck, &cv)?),
        )?;
    }

    // --- conv2d 3×3, 320 → 320 at 64×64, batch 2 (ResBlock convs of level 1).
    {
        let x = randn(&[2, 320, 64, 64], 1.0)?;
        let w = randn(&[320, 320, 3, 3], 0.02)?;
        let bias = randn(&[320], 0.02)?;
        let flops = 2.0 * mm_flops(320, 320 * 9, 64 * 64);
        let ours = Conv2d::new(w.clone(), Some(bias.clone()), 1, 1)?;
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let candle = candle_nn::Conv2d::new(w, Some(bias), cfg);
        b.run("conv3x3 320->320 64x64 b2 (engine)", 5, flops, || {
            Ok(ours.forward(&x)?)
        })?;
        b.run("conv3x3 320->320 64x64 b2 (candle)", 3, flops, || {
            Ok(candle.forward(&x)?)
        })?;
        // Level-3 shape: many channels, few pixels.
        let x = randn(&[2, 1280, 16, 16], 1.0)?;
        let w = randn(&[1280, 1280, 3, 3], 0.02)?;
        let ours = Conv2d::new(w, None, 1, 1)?;
        b.run(
            "conv3x3 1280->1280 16x16 b2 (engine)",
            5,
            2.0 * mm_flops(1280, 1280 * 9, 256),
            || Ok(ours.forward(&x)?),
        )?;
    }

    // --- GroupNorm(32) + SiLU at 320×64×64, batch 2.
    {
        let x = randn(&[2, 320, 64, 64], 1.0)?;
        let w = randn(&[320], 1.0)?;
        let bias = randn(&[320], 1.0)?;
        let ours = GroupNorm::new(w.clone(), bias.clone(), 32, 1e-5)?;
        let candle = candle_nn::GroupNorm::new(w, bias, 320, 32, 1e-5)?;
        b.run("groupnorm+silu 2x320x64x64 (engine fused)", 10, 0.0, || {
            Ok(ours.forward(&x, true)?)
        })?;
        b.run("groupnorm+silu 2x320x64x64 (candle)", 5, 0.0, || {
            Ok(candle.forward(&x)?.silu()?)
        })?;
    }

    // --- The transformer's matmuls at level 1 (tokens = 2 × 64 × 64), as candle's Linear
    // runs them (x · Wᵀ), plus LayerNorm and the GEGLU gate.
    {
        let tokens = 2 * 64 * 64;
        let x = randn(&[2, 4096, 320], 1.0)?;
        let lin = |cin: usize, cout: usize| -> Res<candle_nn::Linear> {
            Ok(candle_nn::Linear::new(
                randn(&[cout, cin], 0.02)?,
                Some(randn(&[cout], 0.02)?),
            ))
        };
        let q = lin(320, 320)?;
        b.run(
            "linear 8192x320 . 320x320 (to_q/out)",
            10,
            mm_flops(tokens, 320, 320),
            || Ok(q.forward(&x)?),
        )?;
        let geglu = lin(320, 2560)?;
        b.run(
            "linear 8192x320 . 320x2560 (GEGLU proj)",
            5,
            mm_flops(tokens, 320, 2560),
            || Ok(geglu.forward(&x)?),
        )?;
        let h = randn(&[2, 4096, 1280], 1.0)?;
        let down = lin(1280, 320)?;
        b.run(
            "linear 8192x1280 . 1280x320 (FF out)",
            5,
            mm_flops(tokens, 1280, 320),
            || Ok(down.forward(&h)?),
        )?;
        let ctx = randn(&[2, 77, 768], 1.0)?;
        let kv = lin(768, 320)?;
        b.run(
            "linear 154x768 . 768x320 (cross to_k/to_v)",
            20,
            mm_flops(154, 768, 320),
            || Ok(kv.forward(&ctx)?),
        )?;
        // Plain contiguous GEMM for reference: what the hardware gives at this size.
        let a = randn(&[tokens, 320], 1.0)?;
        let bm = randn(&[320, 2560], 1.0)?;
        b.run(
            "matmul 8192x320 . 320x2560 (contiguous)",
            5,
            mm_flops(tokens, 320, 2560),
            || Ok(a.matmul(&bm)?),
        )?;
        let ln = candle_nn::LayerNorm::new(
            Tensor::ones(320, DType::F32, &Device::Cpu)?,
            Tensor::zeros(320, DType::F32, &Device::Cpu)?,
            1e-5,
        );
        b.run("layernorm 2x4096x320", 10, 0.0, || Ok(ln.forward(&x)?))?;
        let p = randn(&[2, 4096, 2560], 1.0)?;
        b.run(
            "geglu gate 2x4096x(2x1280) (narrow, gelu_erf, mul)",
            5,
            0.0,
            || {
                let a = p.narrow(2, 0, 1280)?;
                let g = p.narrow(2, 1280, 1280)?.gelu_erf()?;
                Ok((a * g)?)
            },
        )?;
        // The layout change around each SpatialTransformer (NCHW ↔ tokens).
        let img = randn(&[2, 320, 64, 64], 1.0)?;
        b.run("permute NCHW->NHWC copy 2x320x64x64", 10, 0.0, || {
            Ok(img.permute((0, 2, 3, 1))?.contiguous()?)
        })?;
    }
    Ok(())
}
