//! Parity of the checkpoint loader, UNet, text-encoder wiring and whole sampling pipeline with
//! diffusers, on the engine's tiny checkpoints (which diffusers' own single-file loader accepts
//! with no missing or unexpected keys). Fixtures: tests/fixtures/ckpt/, written by
//! tools/fixtures/make_ckpt_fixtures.py (see there to regenerate). The A1111 prompt checks
//! (weights, > 75 tokens, BREAK) compare the engine's conditioning with the script's independent
//! Python implementation of A1111's chunking and emphasis on diffusers' text encoders.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use sd_engine::checkpoint::{self, Checkpoint};
use sd_engine::models::unet::sdxl_vector;
use sd_engine::pipeline::CpuEngine;
use sd_engine::safetensors_file::{self, SafetensorsFile};
use sd_engine::text::conditioning::encode_prompt;
use sd_engine::text::tokenizer::ClipTokenizer;
use sd_engine::tiny::write_tiny_checkpoint;
use sd_engine::{Backend, Control, Family, GenerateParams};

/// Seed the fixture script writes its tiny checkpoints with.
const TINY_SEED: u64 = 5;

fn fixture(name: &str) -> SafetensorsFile {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ckpt")
        .join(name);
    safetensors_file::open(&p).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn get(f: &SafetensorsFile, name: &str) -> Tensor {
    f.tensor_f32(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Max |a - b| must be within 1e-4 of the reference's largest magnitude.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g = got
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("got");
    let w = want
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("want");
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let err = g
        .iter()
        .zip(&w)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 1e-4 * scale,
        "{what}: max abs error {err:e} vs reference scale {scale:e} (rel {:e})",
        err / scale
    );
    eprintln!("{what}: rel err {:e}", err / scale);
}

fn tiny(dir: &Path, fam: Family, inpaint: bool) -> PathBuf {
    let p = dir.join(format!("{}-{inpaint}.safetensors", fam.as_str()));
    write_tiny_checkpoint(fam, inpaint, TINY_SEED, &p).expect("write tiny checkpoint");
    p
}

/// The tiny checkpoint with a few text-encoder tensors replaced, as the fixture script's
/// `a1111_variant` / `A1111_OVERRIDES` write it (`true` = the "weight" values
/// 1 + 0.125 * (i % 7 - 3), `false` = the "bias" values 0.125 * (3i % 9) - 0.25; stored f16).
/// With the plain tiny weights the hidden states have a mean of ~0, which would make A1111's
/// emphasis mean restore divide noise by noise.
fn a1111_variant(dir: &Path, fam: Family) -> PathBuf {
    let overrides: &[(&str, bool)] = match fam {
        Family::Sd1 => &[
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                true,
            ),
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.bias",
                false,
            ),
        ],
        Family::Sd2 => &[
            ("cond_stage_model.model.ln_final.weight", true),
            ("cond_stage_model.model.ln_final.bias", false),
        ],
        Family::Sdxl => &[
            (
                "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc2.bias",
                false,
            ),
            (
                "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.bias",
                false,
            ),
        ],
    };
    let src = tiny(dir, fam, false);
    let f = safetensors_file::open(&src).expect("open tiny");
    let tensors: Vec<_> = f
        .header()
        .tensors
        .iter()
        .map(|(name, info)| {
            let bytes = match overrides.iter().find(|(n, _)| n == name) {
                Some(&(_, is_weight)) => (0..info.numel() as i32)
                    .map(|i| {
                        if is_weight {
                            1.0 + 0.125 * (i % 7 - 3) as f32
                        } else {
                            0.125 * (3 * i % 9) as f32 - 0.25
                        }
                    })
                    .flat_map(|x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
                None => f.raw(name).expect("raw").1.to_vec(),
            };
            (name.clone(), info.dtype, info.shape.clone(), bytes)
        })
        .collect();
    for (name, _) in overrides {
        assert!(
            f.header().contains(name),
            "{name} not in the tiny checkpoint"
        );
    }
    let bytes = safetensors_file::serialize(&tensors, &f.header().metadata).expect("serialize");
    let dst = dir.join(format!("{}-a1111.safetensors", fam.as_str()));
    std::fs::write(&dst, bytes).expect("write");
    dst
}

fn load(dir: &Path, fam: Family, inpaint: bool) -> Checkpoint {
    checkpoint::load(&tiny(dir, fam, inpaint)).expect("load")
}

fn check_unet(ck: &Checkpoint, tag: &str) {
    let f = fixture(&format!("{tag}_unet.safetensors"));
    let x = get(&f, "x");
    let t = get(&f, "t");
    let ctx = get(&f, "context");
    let y = if f.header().contains("text_embeds") {
        let te = get(&f, "text_embeds");
        let ids = get(&f, "time_ids").to_vec2::<f32>().expect("ids");
        let rows: Vec<Tensor> = ids
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let u = |k: usize| r[k] as u32;
                sdxl_vector(
                    &te.get(i).expect("row"),
                    (u(0), u(1)),
                    (u(2), u(3)),
                    (u(4), u(5)),
                )
                .expect("y")
            })
            .collect();
        Some(Tensor::cat(&rows, 0).expect("cat"))
    } else {
        None
    };
    let out = ck.unet.forward(&x, &t, &ctx, y.as_ref()).expect("forward");
    assert_close(&format!("{tag} unet"), &out, &get(&f, "out"));
}

fn check_text(ck: &Checkpoint, fam: Family) {
    let f = fixture(&format!("{}_text.safetensors", fam.as_str()));
    let tokens: Vec<u32> = get(&f, "tokens")
        .to_vec1::<f32>()
        .expect("tokens")
        .into_iter()
        .map(|v| v as u32)
        .collect();
    for (skip, name) in [(1, "hidden_skip1"), (2, "hidden_skip2")] {
        let (h, pooled) = ck
            .text
            .encode_ids(std::slice::from_ref(&tokens), skip)
            .expect("encode");
        assert_close(
            &format!("{} text clip_skip {skip}", fam.as_str()),
            &h.squeeze(0).expect("squeeze"),
            &get(&f, name),
        );
        if skip == 1 && f.header().contains("pooled") {
            let p = pooled.expect("pooled").squeeze(0).expect("squeeze");
            assert_close(&format!("{} pooled", fam.as_str()), &p, &get(&f, "pooled"));
        }
    }
}

/// A1111-style conditioning (attention weights, > 75 tokens, BREAK) through the engine's prompt
/// encoder (`encode_prompt`, what the pipeline's `encode_pair_with` runs per prompt), against the
/// script's `a1111_conditioning` (diffusers' text encoders; A1111's chunking, padding, layers and
/// "Original" emphasis re-implemented in Python). `ck` must be loaded from [`a1111_variant`].
fn check_a1111_text(ck: &Checkpoint, fam: Family) {
    let f = fixture(&format!("{}_text.safetensors", fam.as_str()));
    let meta = &f.header().metadata;
    let tok = ClipTokenizer::new();
    for (name, chunks) in [("weighted", 1), ("long", 2), ("break", 2)] {
        let prompt = meta
            .get(&format!("{name}_prompt"))
            .unwrap_or_else(|| panic!("{name}_prompt missing from the fixture metadata"));
        let c = encode_prompt(&tok, &ck.text, prompt, 1, 1).expect("encode");
        assert_eq!(c.chunks(), chunks, "{} {name}: chunk count", fam.as_str());
        let what = format!("{} a1111 {name}", fam.as_str());
        assert_close(
            &format!("{what} hidden"),
            &c.context.squeeze(0).expect("squeeze"),
            &get(&f, &format!("{name}_hidden")),
        );
        if fam == Family::Sdxl {
            let p = c.pooled.expect("pooled").squeeze(0).expect("squeeze");
            assert_close(
                &format!("{what} pooled"),
                &p,
                &get(&f, &format!("{name}_pooled")),
            );
        } else {
            assert!(c.pooled.is_none(), "{what}: unexpected pooled output");
        }
    }
}

fn check_loop(engine: &mut CpuEngine, fam: Family, short: &str, sampler: &str) {
    let f = fixture(&format!("{}_loop_{short}.safetensors", fam.as_str()));
    let meta = &f.header().metadata;
    let num = |k: &str| -> f64 { meta[k].parse().expect("number") };
    let params = GenerateParams {
        prompt: meta["prompt"].clone(),
        negative_prompt: meta["negative"].clone(),
        width: num("size") as u32,
        height: num("size") as u32,
        steps: num("steps") as u32,
        guidance_scale: num("cfg"),
        scheduler: sampler.into(),
        seed: num("seed") as u64,
        ..Default::default()
    };
    let out = engine
        .generate_tensors(&params, &mut |_| Control::Continue)
        .expect("generate");
    let (lat, img) = &out[0];
    let what = format!("{} {sampler}", fam.as_str());
    assert_close(&format!("{what} latents"), lat, &get(&f, "latents"));
    assert_close(&format!("{what} image"), img, &get(&f, "image"));
}

#[test]
fn sd1_matches_diffusers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = load(dir.path(), Family::Sd1, false);
    check_unet(&ck, "sd1");
    check_text(&ck, Family::Sd1);
    drop(ck);
    let ck = checkpoint::load(&a1111_variant(dir.path(), Family::Sd1)).expect("load");
    check_a1111_text(&ck, Family::Sd1);
    drop(ck);
    let mut e = CpuEngine::new();
    e.load_checkpoint(&tiny(dir.path(), Family::Sd1, false))
        .expect("load");
    check_loop(&mut e, Family::Sd1, "euler", "Euler");
    check_loop(&mut e, Family::Sd1, "euler_a", "Euler a");
    check_loop(&mut e, Family::Sd1, "ddim", "DDIM");
}

#[test]
fn inpaint_unets_of_every_family_match_diffusers() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (fam, tag) in [
        (Family::Sd1, "sd1inp"),
        (Family::Sd2, "sd2inp"),
        (Family::Sdxl, "sdxlinp"),
    ] {
        let ck = load(dir.path(), fam, true);
        assert!(ck.info.inpaint, "{tag}");
        check_unet(&ck, tag);
    }
}

#[test]
fn sd2_matches_diffusers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = load(dir.path(), Family::Sd2, false);
    check_unet(&ck, "sd2");
    check_text(&ck, Family::Sd2);
    drop(ck);
    let ck = checkpoint::load(&a1111_variant(dir.path(), Family::Sd2)).expect("load");
    check_a1111_text(&ck, Family::Sd2);
    drop(ck);
    let mut e = CpuEngine::new();
    e.load_checkpoint(&tiny(dir.path(), Family::Sd2, false))
        .expect("load");
    check_loop(&mut e, Family::Sd2, "dpmpp_2m", "DPM++ 2M");
}

#[test]
fn sdxl_matches_diffusers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = load(dir.path(), Family::Sdxl, false);
    check_unet(&ck, "sdxl");
    check_text(&ck, Family::Sdxl);
    drop(ck);
    let ck = checkpoint::load(&a1111_variant(dir.path(), Family::Sdxl)).expect("load");
    check_a1111_text(&ck, Family::Sdxl);
    drop(ck);
    let mut e = CpuEngine::new();
    e.load_checkpoint(&tiny(dir.path(), Family::Sdxl, false))
        .expect("load");
    check_loop(&mut e, Family::Sdxl, "euler", "Euler");
    check_loop(&mut e, Family::Sdxl, "dpmpp_2m", "DPM++ 2M");
}
