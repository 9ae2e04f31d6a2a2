//! Parity of the CLIP text encoders and the VAE with diffusers/transformers.
//!
//! The checkpoints are built here, deterministically, from `ClipConfig::param_shapes` /
//! `VaeConfig::param_shapes` with every tensor distinct (norm weights and biases included, so a
//! swapped name shows up). `tools/fixtures/make_clip_vae_fixtures.py` has diffusers' single-file
//! conversion load the same files (refusing any missing or unexpected key) and records its
//! outputs in `tests/fixtures/clip_vae/*.safetensors`; the tests below recompute them.
//!
//! To regenerate the fixtures see the script's header; it writes the checkpoints with
//! `CLIP_VAE_FIXTURE_CKPT_DIR=DIR cargo test -p sd-engine --test clip_vae_parity -- --ignored`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_engine::models::clip::{ClipConfig, ClipLayout, ClipTextModel};
use sd_engine::models::vae::{Vae, VaeConfig};
use sd_engine::safetensors_file::{self, Dtype};

const SD1_CLIP: &str = "cond_stage_model.transformer.text_model.";
const SD2_CLIP: &str = "cond_stage_model.model.";
const XL_CLIP_L: &str = "conditioner.embedders.0.transformer.text_model.";
const XL_CLIP_G: &str = "conditioner.embedders.1.model.";
const VAE: &str = "first_stage_model.";

fn clip(layout: ClipLayout, hidden: usize, layers: usize, proj: Option<usize>) -> ClipConfig {
    ClipConfig {
        layout,
        vocab_size: 49408,
        max_position: 77,
        hidden,
        layers,
        heads: sd_engine::models::clip::clip_heads_for(hidden),
        intermediate: 4 * hidden,
        projection_dim: proj,
    }
}

fn vae_cfg() -> VaeConfig {
    VaeConfig {
        ch: 32,
        ch_mult: vec![1, 2, 2, 4],
        num_res_blocks: 2,
        z_channels: 4,
        in_channels: 3,
        out_channels: 3,
    }
}

/// Tensor names (relative to a prefix) and shapes.
type Shapes = Vec<(String, Vec<usize>)>;

/// (prefix, tensors) per fixture checkpoint. Encoder widths differ between SDXL's two encoders
/// because diffusers tells them apart by width.
fn parts(name: &str) -> Vec<(&'static str, Shapes)> {
    match name {
        "sd1" => vec![
            (
                SD1_CLIP,
                clip(ClipLayout::OpenAi, 48, 3, None).param_shapes(),
            ),
            (VAE, vae_cfg().param_shapes()),
        ],
        "sd2" => vec![(
            SD2_CLIP,
            clip(ClipLayout::OpenClip, 32, 3, Some(32)).param_shapes(),
        )],
        "sdxl" => vec![
            (
                XL_CLIP_L,
                clip(ClipLayout::OpenAi, 48, 3, None).param_shapes(),
            ),
            (
                XL_CLIP_G,
                clip(ClipLayout::OpenClip, 40, 3, Some(24)).param_shapes(),
            ),
        ],
        _ => unreachable!("unknown fixture {name}"),
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Deterministic values for one tensor: uniform in ±a (exact f32 arithmetic), with `a` chosen
/// by role so activations stay O(1) through the network.
fn values(name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut s = fnv(name);
    let mut uniform = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
    };
    if shape.is_empty() {
        return vec![2.659_26]; // logit_scale
    }
    let norm_weight = shape.len() == 1
        && name.ends_with("weight")
        && (name.contains("norm") || name.contains("ln_"));
    let embedding = name.contains("embedding");
    let fan_in: usize = if shape.len() >= 2 {
        shape[1..].iter().product()
    } else {
        1
    };
    (0..n)
        .map(|_| {
            let u = uniform();
            if norm_weight {
                1.0 + 0.5 * u
            } else if shape.len() == 1 {
                0.2 * u
            } else if embedding {
                u
            } else {
                u * (3.0 / fan_in as f32).sqrt()
            }
        })
        .collect()
}

fn checkpoint_bytes(name: &str) -> Vec<u8> {
    let mut tensors = Vec::new();
    for (prefix, shapes) in parts(name) {
        for (rel, shape) in shapes {
            let full = format!("{prefix}{rel}");
            let bytes = values(&full, &shape)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            tensors.push((full, Dtype::F32, shape, bytes));
        }
    }
    safetensors_file::serialize(&tensors, &BTreeMap::new()).expect("serialize")
}

fn write_checkpoint(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    std::fs::write(&path, checkpoint_bytes(name)).expect("write checkpoint");
    path
}

/// Writes the fixture checkpoints for the Python script (see the module docs).
#[test]
#[ignore = "writes checkpoints for tools/fixtures/make_clip_vae_fixtures.py"]
fn write_fixture_checkpoints() {
    let dir = std::env::var("CLIP_VAE_FIXTURE_CKPT_DIR").expect("set CLIP_VAE_FIXTURE_CKPT_DIR");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for name in ["sd1", "sd2", "sdxl"] {
        write_checkpoint(Path::new(&dir), name);
    }
}

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip_vae")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture")
}

fn get(f: &HashMap<String, Tensor>, key: &str) -> Tensor {
    f.get(key)
        .unwrap_or_else(|| panic!("fixture lacks {key}"))
        .clone()
}

/// Max |got - want| relative to max |want|, must be ≤ 1e-4.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got = got.to_dtype(DType::F32).expect("f32");
    let want = want.to_dtype(DType::F32).expect("f32");
    let diff: f32 = (&got - &want)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar())
        .expect("diff");
    let scale: f32 = want
        .abs()
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar())
        .expect("scale");
    assert!(scale > 0.0, "{what}: all-zero reference");
    let rel = diff / scale;
    eprintln!("{what}: relative max diff {rel:.2e} (scale {scale:.3})");
    assert!(
        rel <= 1e-4,
        "{what}: max diff {diff} (relative {rel}) vs scale {scale}"
    );
}

struct Loaded {
    _dir: tempfile::TempDir,
    file: safetensors_file::SafetensorsFile,
}

fn load(name: &str) -> Loaded {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_checkpoint(dir.path(), name);
    let file = safetensors_file::open(&path).expect("open");
    Loaded { _dir: dir, file }
}

fn load_clip(l: &Loaded, prefix: &str) -> ClipTextModel {
    let cfg = ClipConfig::detect(l.file.header(), prefix).expect("detect clip");
    let vb = l.file.var_builder().pp(prefix.trim_end_matches('.'));
    ClipTextModel::load(vb, &cfg).expect("load clip")
}

fn ids(f: &HashMap<String, Tensor>, key: &str) -> Tensor {
    get(f, key).to_dtype(DType::U32).expect("ids")
}

#[test]
fn sd1_clip_matches_transformers() {
    let f = fixture("sd1");
    let l = load("sd1");
    let m = load_clip(&l, SD1_CLIP);
    let t = ids(&f, "clip.ids");
    let (last, pooled) = m.forward(&t, 1, true).expect("forward");
    assert_close("last_normed", &last, &get(&f, "clip.last_normed"));
    assert_close("pooled", &pooled, &get(&f, "clip.pooled"));
    let pen = m.forward_hidden(&t, 2, true).expect("penult");
    assert_close("penult_normed", &pen, &get(&f, "clip.penult_normed"));
    let pen_raw = m.forward_hidden(&t, 2, false).expect("penult raw");
    assert_close("penult_raw", &pen_raw, &get(&f, "clip.penult_raw"));
}

#[test]
fn sd2_open_clip_matches_transformers() {
    let f = fixture("sd2");
    let l = load("sd2");
    let m = load_clip(&l, SD2_CLIP);
    let t = ids(&f, "clip.ids");
    let (last, pooled) = m.forward(&t, 1, true).expect("forward");
    assert_close("last_normed", &last, &get(&f, "clip.last_normed"));
    assert_close("pooled", &pooled, &get(&f, "clip.pooled_projected"));
    let pen = m.forward_hidden(&t, 2, true).expect("penult");
    assert_close("penult_normed", &pen, &get(&f, "clip.penult_normed"));
    let pen_raw = m.forward_hidden(&t, 2, false).expect("penult raw");
    assert_close("penult_raw", &pen_raw, &get(&f, "clip.penult_raw"));
}

#[test]
fn sdxl_encoders_match_transformers() {
    let f = fixture("sdxl");
    let l = load("sdxl");
    let clip_l = load_clip(&l, XL_CLIP_L);
    let clip_g = load_clip(&l, XL_CLIP_G);
    let t = ids(&f, "clip.ids");
    let pen_l = clip_l.forward_hidden(&t, 2, false).expect("clip_l");
    assert_close("clip_l penult_raw", &pen_l, &get(&f, "clip_l.penult_raw"));
    let (pen_g, pooled_g) = clip_g.forward(&t, 2, false).expect("clip_g");
    assert_close("clip_g penult_raw", &pen_g, &get(&f, "clip_g.penult_raw"));
    assert_close(
        "clip_g text_embeds",
        &pooled_g,
        &get(&f, "clip_g.text_embeds"),
    );
    let (last_g, _) = clip_g.forward(&t, 1, true).expect("clip_g last");
    assert_close(
        "clip_g last_normed",
        &last_g,
        &get(&f, "clip_g.last_normed"),
    );
}

#[test]
fn vae_matches_diffusers() {
    let f = fixture("sd1");
    let l = load("sd1");
    let cfg = VaeConfig::detect(l.file.header(), VAE).expect("detect vae");
    assert_eq!(cfg, vae_cfg());
    let vae = Vae::load(l.file.var_builder().pp("first_stage_model"), &cfg).expect("load vae");
    let (mean, logvar) = vae.encode(&get(&f, "vae.image_in")).expect("encode");
    assert_close("vae mean", &mean, &get(&f, "vae.mean"));
    assert_close("vae logvar", &logvar, &get(&f, "vae.logvar"));
    let img = vae.decode(&get(&f, "vae.latent_in")).expect("decode");
    assert_close("vae decode", &img, &get(&f, "vae.decoded"));
}
