//! LoRA re-apply cost on a full-size checkpoint (random f16 weights, real SD 1.5 or SDXL layout).
//!
//! `lora_bench sd15|sdxl DIR [RANK]` writes DIR/<fam>.safetensors (once) and a kohya LoRA of
//! rank RANK (default 32) on every UNet transformer Linear/1×1 projection and every text
//! encoder projection (what kohya's default LoRA trains), then times load_checkpoint and
//! set_loras (apply, change weight, unchanged set, remove) and prints peak RSS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sd_engine::detect::{
    SD1_CLIP_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX, UNET_PREFIX, VAE_PREFIX,
};
use sd_engine::lora::ModuleMap;
use sd_engine::models::unet::UNetConfig;
use sd_engine::pipeline::CpuEngine;
use sd_engine::safetensors_file::{read_header, serialize, Dtype};
use sd_engine::tiny::{ClipLayout, TinyClip, TinyVae};
use sd_engine::{Backend, LoraSpec};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

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

/// f16 bytes of `n` pseudo-random values in ±`a`.
fn random_f16(seed: u64, n: usize, a: f32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let x = ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a;
        out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
    }
    out
}

fn write(path: &Path, tensors: Vec<(String, Vec<usize>, f32)>) -> Res<()> {
    let t: Vec<_> = tensors
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, a))| {
            let n = shape.iter().product();
            let bytes = random_f16(i as u64 + 1, n, a);
            (name, Dtype::F16, shape, bytes)
        })
        .collect();
    std::fs::write(path, serialize(&t, &BTreeMap::new())?)?;
    Ok(())
}

fn checkpoint(xl: bool, path: &Path) -> Res<()> {
    let clip = |layout, hidden, layers, projection| TinyClip {
        layout,
        vocab: 49408,
        max_len: 77,
        hidden,
        layers,
        intermediate: 4 * hidden,
        projection,
    };
    let (unet, clips) = if xl {
        (
            UNetConfig::sdxl(),
            vec![
                (SDXL_CLIP_L_PREFIX, clip(ClipLayout::OpenAi, 768, 12, 768)),
                (
                    SDXL_CLIP_G_PREFIX,
                    clip(ClipLayout::OpenClip, 1280, 32, 1280),
                ),
            ],
        )
    } else {
        (
            UNetConfig::sd15(),
            vec![(SD1_CLIP_PREFIX, clip(ClipLayout::OpenAi, 768, 12, 768))],
        )
    };
    let mut t: Vec<(String, Vec<usize>, f32)> = Vec::new();
    for (k, s) in unet.param_shapes() {
        t.push((format!("{UNET_PREFIX}{k}"), s, 0.02));
    }
    let vae = TinyVae {
        ch: 128,
        ch_mult: vec![1, 2, 4, 4],
        num_res_blocks: 2,
        z_channels: 4,
    };
    for p in vae.params() {
        t.push((format!("{VAE_PREFIX}{}", p.name), p.shape, 0.02));
    }
    for (prefix, c) in clips {
        for p in c.params() {
            if p.name.ends_with("position_ids") {
                continue;
            }
            t.push((format!("{prefix}{}", p.name), p.shape, 0.02));
        }
    }
    write(path, t)
}

fn lora(ckpt: &Path, rank: usize, path: &Path) -> Res<usize> {
    let header = read_header(ckpt)?;
    let map = ModuleMap::from_header(&header)?;
    let xl = map.family() == sd_engine::Family::Sdxl;
    let mut t = Vec::new();
    let mut modules = 0;
    let mut names: Vec<_> = map.entries().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    for (name, target) in names {
        let module = target
            .key
            .trim_start_matches(UNET_PREFIX)
            .trim_end_matches(".weight");
        let pick = if name.starts_with("lora_te") {
            true
        } else if let Some(rest) = name.strip_prefix("lora_unet_") {
            // kohya's default LoRA: Linear layers and 1×1 convs inside the transformers.
            let ldm_style = rest == module.replace('.', "_");
            ldm_style == xl
                && (module.contains("transformer_blocks")
                    || module.ends_with("proj_in")
                    || module.ends_with("proj_out"))
                && (target.shape.len() == 2
                    || (target.shape.len() == 4 && target.shape[2..] == [1, 1]))
        } else {
            false
        };
        if !pick {
            continue;
        }
        let (o, i) = (target.shape[0], target.shape[1]);
        let tail: Vec<usize> = target.shape[2..].to_vec();
        let mut down = vec![rank, i];
        down.extend(&tail);
        let mut up = vec![o, rank];
        up.extend(tail.iter().map(|_| 1));
        t.push((format!("{name}.lora_down.weight"), down, 0.05));
        t.push((format!("{name}.lora_up.weight"), up, 0.05));
        t.push((format!("{name}.alpha"), vec![], rank as f32));
        modules += 1;
    }
    write(path, t)?;
    Ok(modules)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let xl = args.first().map(String::as_str) == Some("sdxl");
    let dir = PathBuf::from(
        args.get(1)
            .ok_or("usage: lora_bench sd15|sdxl DIR [RANK]")?,
    );
    let rank: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(32);
    std::fs::create_dir_all(&dir)?;
    let ck = dir.join(if xl {
        "sdxl.safetensors"
    } else {
        "sd15.safetensors"
    });
    if !ck.exists() {
        let t = Instant::now();
        checkpoint(xl, &ck)?;
        println!("wrote {} in {:?}", ck.display(), t.elapsed());
    }
    let lp = dir.join(format!("lora-r{rank}.safetensors"));
    let n = lora(&ck, rank, &lp)?;
    println!(
        "LoRA: {n} modules, rank {rank}, {} MB",
        std::fs::metadata(&lp)?.len() >> 20
    );
    {
        // The delta arithmetic alone, without re-reading and rebuilding the networks.
        let file = sd_engine::safetensors_file::open(&ck)?;
        let map = ModuleMap::from_header(file.header())?;
        let set = sd_engine::lora::LoraSet::load(
            &[LoraSpec {
                path: lp.clone(),
                weight: 1.0,
                name: "b".into(),
            }],
            &map,
        )?;
        let (mut read, mut patch) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        for key in set.patched_keys() {
            let t = Instant::now();
            let w = file.tensor_f32(key)?;
            read += t.elapsed();
            let t = Instant::now();
            let _ = set.patch(key, w)?;
            patch += t.elapsed();
        }
        println!("patched tensors: read {read:?}, add deltas {patch:?}");
    }
    let mut e = CpuEngine::new();
    let t = Instant::now();
    e.load_checkpoint(&ck)?;
    println!(
        "load_checkpoint: {:?}, peak RSS {} MB",
        t.elapsed(),
        peak_mb()
    );
    let spec = |w: f32| LoraSpec {
        path: lp.clone(),
        weight: w,
        name: "bench".into(),
    };
    for (what, set) in [
        ("apply (w 1)", vec![spec(1.0)]),
        ("change weight (w 0.5)", vec![spec(0.5)]),
        ("unchanged set", vec![spec(0.5)]),
        ("remove", vec![]),
    ] {
        let t = Instant::now();
        let r = e.set_loras(&set)?;
        println!(
            "set_loras {what}: {:?} (unet rebuilt {}, text rebuilt {}), peak RSS {} MB",
            t.elapsed(),
            r.rebuilt_unet,
            r.rebuilt_text,
            peak_mb()
        );
    }
    Ok(())
}
