//! Peak-memory probe for full-size networks (small random weights that really occupy memory, real shapes):
//! `mem_probe sd15|sdxl [RES]` builds the UNet and VAE, runs one CFG-batch UNet step and one VAE
//! decode at RES×RES pixels and prints the process's peak RSS (VmHWM) after each stage.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sd_engine::models::unet::{sdxl_vector, UNet, UNetConfig};
use sd_engine::models::vae::{Vae, VaeConfig};

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let xl = args.first().map(String::as_str) == Some("sdxl");
    let res: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let dev = Device::Cpu;
    let cfg = if xl {
        UNetConfig::sdxl()
    } else {
        UNetConfig::sd15()
    };
    let zeros = |shapes: Vec<(String, Vec<usize>)>| -> candle_core::Result<VarBuilder<'static>> {
        let mut map = std::collections::HashMap::new();
        for (name, shape) in shapes {
            map.insert(name, Tensor::randn(0f32, 0.02, shape, &dev)?);
        }
        Ok(VarBuilder::from_tensors(map, DType::F32, &dev))
    };
    let unet = UNet::load(zeros(cfg.param_shapes())?, &cfg)?;
    let vae_cfg = VaeConfig::sd();
    let vae = Vae::load(zeros(vae_cfg.param_shapes())?, &vae_cfg)?;
    println!("weights: peak {} MB", peak_mb());
    let l = res / 8;
    let x = Tensor::randn(0f32, 1.0, (2, 4, l, l), &dev)?;
    let t = Tensor::new(&[999f32, 999.0], &dev)?;
    let ctx = Tensor::randn(0f32, 1.0, (2, 77, cfg.context_dim), &dev)?;
    let y = if xl {
        let pooled = Tensor::zeros((2, 1280), DType::F32, &dev)?;
        let s = res as u32;
        Some(sdxl_vector(&pooled, (s, s), (0, 0), (s, s))?)
    } else {
        None
    };
    let start = std::time::Instant::now();
    let out = unet.forward(&x, &t, &ctx, y.as_ref())?;
    println!("unet step ({:?}): peak {} MB", start.elapsed(), peak_mb());
    drop(out);
    let start = std::time::Instant::now();
    let img = vae.decode(&x.narrow(0, 0, 1)?)?;
    println!(
        "vae decode {:?} ({:?}): peak {} MB",
        img.dims(),
        start.elapsed(),
        peak_mb()
    );
    Ok(())
}
