//! Dev helper for the diffusers fixture scripts (tools/fixtures/make_ckpt_fixtures.py).
//!
//! `tiny_ckpt write sd1|sd2|sdxl [--inpaint] [--full] [--seed N] OUT.safetensors` writes a tiny
//! checkpoint (`--full`: the real widths, f16, to time loading a real-size file);
//! `tiny_ckpt shapes sd1|sd2|sdxl [--inpaint] [--full]` prints every checkpoint key and shape as
//! JSON (`--full` = the real SD 1.5 / SD 2.x / SDXL widths).

use std::path::PathBuf;

use sd_engine::models::unet::UNetConfig;
use sd_engine::tiny::{ClipLayout, TinyClip, TinySpec, TinyVae};
use sd_engine::Family;

fn family(s: &str) -> Result<Family, String> {
    match s {
        "sd1" => Ok(Family::Sd1),
        "sd2" => Ok(Family::Sd2),
        "sdxl" => Ok(Family::Sdxl),
        _ => Err(format!("unknown family {s:?}")),
    }
}

fn full_spec(fam: Family, inpaint: bool) -> TinySpec {
    let mut spec = TinySpec::new(fam, inpaint);
    let full_clip = |layout, hidden, layers, projection| TinyClip {
        layout,
        vocab: 49408,
        max_len: 77,
        hidden,
        layers,
        intermediate: 4 * hidden,
        projection,
    };
    spec.vae = TinyVae {
        ch: 128,
        ch_mult: vec![1, 2, 4, 4],
        num_res_blocks: 2,
        z_channels: 4,
    };
    let (unet, clips) = match fam {
        Family::Sd1 => (
            UNetConfig::sd15(),
            vec![full_clip(ClipLayout::OpenAi, 768, 12, 768)],
        ),
        Family::Sd2 => (
            UNetConfig::sd2(),
            vec![full_clip(ClipLayout::OpenClip, 1024, 24, 1024)],
        ),
        Family::Sdxl => (
            UNetConfig::sdxl(),
            vec![
                full_clip(ClipLayout::OpenAi, 768, 12, 768),
                full_clip(ClipLayout::OpenClip, 1280, 32, 1280),
            ],
        ),
    };
    spec.unet = UNetConfig {
        in_channels: if inpaint { 9 } else { 4 },
        ..unet
    };
    for (slot, c) in spec.clips.iter_mut().zip(clips) {
        slot.1 = c;
    }
    spec
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args
        .first()
        .ok_or("usage: tiny_ckpt write|shapes FAMILY ...")?;
    let fam = family(args.get(1).ok_or("missing family")?)?;
    let inpaint = args.iter().any(|a| a == "--inpaint");
    let full = args.iter().any(|a| a == "--full");
    let seed = match args.iter().position(|a| a == "--seed") {
        Some(i) => args.get(i + 1).ok_or("--seed needs a value")?.parse()?,
        None => 0,
    };
    match cmd.as_str() {
        "write" => {
            let out = args
                .iter()
                .skip(2)
                .rev()
                .find(|a| !a.starts_with("--") && a.parse::<u64>().is_err())
                .ok_or("missing output path")?;
            if full {
                sd_engine::tiny::write_checkpoint_from_spec(
                    &full_spec(fam, inpaint),
                    seed,
                    sd_engine::safetensors_file::Dtype::F16,
                    &PathBuf::from(out),
                )?;
            } else {
                sd_engine::tiny::write_tiny_checkpoint(fam, inpaint, seed, &PathBuf::from(out))?;
            }
        }
        "shapes" => {
            let spec = if full {
                full_spec(fam, inpaint)
            } else {
                TinySpec::new(fam, inpaint)
            };
            let map: serde_json::Map<String, serde_json::Value> = spec
                .params()
                .into_iter()
                .map(|p| (p.name, serde_json::json!(p.shape)))
                .collect();
            println!("{}", serde_json::Value::Object(map));
        }
        other => return Err(format!("unknown command {other:?}").into()),
    }
    Ok(())
}
