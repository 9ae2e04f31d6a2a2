//! LoRA-family adapters (LoRA, LoCon, LoHA, LoKr, LyCORIS "full" diffs) applied to a loaded
//! checkpoint, as Civitai ships them.
//!
//! # File formats
//! - kohya / LyCORIS: `lora_unet_<module>.<part>`, `lora_te_<module>.<part>` (SD 1.x/2.x text
//!   encoder), `lora_te1_` / `lora_te2_` (SDXL CLIP-L / OpenCLIP-G). `<module>` is a module path
//!   with dots turned into underscores: diffusers' UNet paths for SD 1.x/2.x
//!   (`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), the LDM paths kohya uses for
//!   SDXL (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`) — both are accepted for every
//!   family — and transformers' CLIP paths for the text encoders
//!   (`text_model_encoder_layers_0_self_attn_q_proj`, also for OpenCLIP encoders, whose fused
//!   `in_proj_weight` then receives q/k/v as row blocks).
//! - diffusers / PEFT: `unet.<diffusers path>.lora_A.weight` / `lora_B.weight` (also
//!   `.lora.down/up.weight`, `.lora_linear_layer.down/up.weight`, the attention-processor form
//!   `attn1.processor.to_q_lora.down.weight`, and a `base_model.model.` prefix),
//!   `text_encoder.` / `text_encoder_2.` + transformers paths.
//!
//! # Deltas (per module; `scale` = `alpha / rank` when the file has `alpha`, else 1)
//! - LoRA / LoCon: ΔW = up · down · scale, with `down` `[r, in(, kh, kw)]` and `up`
//!   `[out, r(, 1, 1)]`; with a `lora_mid` `[r, r, kh, kw]` (LyCORIS Tucker form) ΔW is the
//!   Tucker product of mid, up and down. rank = `down.shape[0]`.
//! - LoHA: ΔW = (w1a · w1b) ⊙ (w2a · w2b) · scale, each factor optionally in Tucker form
//!   (`hada_t1` / `hada_t2` with `w?a` `[r, out]`, `w?b` `[r, in]`). rank = `w1b.shape[0]`.
//! - LoKr: ΔW = kron(w1, w2), `w1` = `lokr_w1` or `lokr_w1_a · lokr_w1_b`, `w2` = `lokr_w2` or
//!   `lokr_w2_a · lokr_w2_b` or the Tucker form with `lokr_t2`; scaled by alpha / rank only when
//!   a factor is decomposed (rank = `w2_b.shape[0]`, else `w1_b.shape[0]`), as A1111 and LyCORIS do.
//! - `diff` / `diff_b`: the weight / bias delta itself.
//!
//! A delta whose element count fits the target is reshaped to it (a linear LoRA on a 1×1 conv,
//! LoHA conv factors stored flat); a 4-input-channel delta on a 9-channel inpainting `conv_in`
//! is zero-padded, as A1111 does. Anything else that does not fit refuses the whole file.
//!
//! # How a set is applied, and why
//! [`LoraState::apply`] re-materialises the UNet and/or text encoders from the checkpoint file,
//! which stays memory-mapped, through a `VarBuilder` backend that adds Σ weightᵢ · ΔWᵢ to each
//! tensor as it is read ([`LoraSet::var_builder`]).
//! - Exact by construction: every set is computed from the pristine file bits in a fixed order,
//!   so switching LoRAs and back gives bit-identical weights, and the empty set gives exactly
//!   the weights a plain load gives. Merging and un-merging in place would accumulate f32
//!   rounding (W + Δ − Δ ≠ W) unless a second copy of every touched tensor were kept.
//! - Memory: one copy of the f32 weights. The old network is dropped before the new one is
//!   built; the file pages come from the page cache, and only one ΔW exists at a time.
//! - Speed: a change costs one f16→f32 re-read of the affected network plus the small ΔW
//!   products (rank ≪ width), about what loading that network costs; a network whose LoRA set
//!   did not change (same files, weights and order) is not touched, so requests that repeat
//!   the loaded set cost only reading the LoRA headers. The plain LoRA product is added in one
//!   fused pass per tensor (`add_low_rank`, rows split across threads).
//!   Measured (`cargo run --release --example lora_bench sd15 DIR 32`: full-size SD 1.5 layout,
//!   f16 file, kohya rank-32 LoRA on all 264 transformer/text projections; 2-core machine under
//!   other load): load_checkpoint 10.2 s; apply 7.8 s; change weight 7.5 s; unchanged set 2 ms;
//!   remove 3.9 s; peak RSS 4.17 GB after load, 4.27 GB after all switches (one copy of the
//!   weights). Tiny checkpoints (`tests::reapply_timing`): SD 1.x apply ≈ 36 ms vs 50 ms load,
//!   SDXL ≈ 120 ms vs 130 ms.
//! - Weight 0 entries are checked but never added, so they are bit-identical to leaving them out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::api::{Family, LoraFileReport, LoraReport, LoraSpec};
use crate::checkpoint::Checkpoint;
use crate::detect::{self, ModelKind, UNET_PREFIX};
use crate::models::clip::{ClipConfig, ClipLayout};
use crate::models::unet::UNetConfig;
use crate::safetensors_file::{self, Header, SafetensorsFile};
use crate::{EngineError, Result};

/// Adapter algorithm, for [`crate::tiny::write_tiny_lora`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraKind {
    Lora,
    Loha,
    Lokr,
}

impl LoraKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lora" | "locon" => Some(Self::Lora),
            "loha" => Some(Self::Loha),
            "lokr" => Some(Self::Lokr),
            _ => None,
        }
    }
}

/// Which network a module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Net {
    Unet,
    Text,
}

/// A checkpoint tensor a LoRA module adapts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Full key of the weight in the checkpoint.
    pub key: String,
    /// Full key of the module's bias, if it has one (for `diff_b`).
    pub bias: Option<String>,
    /// Row block of `key` (OpenCLIP's fused q/k/v `in_proj_weight`): (first row, rows).
    pub rows: Option<(usize, usize)>,
    /// Shape of the adapted weight (the row block when `rows` is set).
    pub shape: Vec<usize>,
    pub net: Net,
}

fn join(head: &str, tail: &[&str]) -> String {
    if tail.is_empty() {
        head.to_string()
    } else {
        format!("{head}.{}", tail.join("."))
    }
}

/// LDM res-block sub-module names → diffusers' `ResnetBlock2D` names.
fn resnet(head: &str, tail: &[&str]) -> Option<String> {
    let (name, used) = match tail {
        ["in_layers", "0", ..] => ("norm1", 2),
        ["in_layers", "2", ..] => ("conv1", 2),
        ["emb_layers", "1", ..] => ("time_emb_proj", 2),
        ["out_layers", "0", ..] => ("norm2", 2),
        ["out_layers", "3", ..] => ("conv2", 2),
        ["skip_connection", ..] => ("conv_shortcut", 1),
        _ => return None,
    };
    Some(join(&format!("{head}.{name}"), &tail[used..]))
}

/// The diffusers `UNet2DConditionModel` path of an LDM UNet module path (both without the
/// `model.diffusion_model.` prefix and the `.weight` suffix), e.g. `input_blocks.1.1.proj_in` →
/// `down_blocks.0.attentions.0.proj_in`. `None` for paths the layout does not have.
pub fn ldm_to_diffusers_unet(module: &str, cfg: &UNetConfig) -> Option<String> {
    let parts: Vec<&str> = module.split('.').collect();
    let r = cfg.num_res_blocks;
    let levels = cfg.channel_mult.len();
    let num = |s: &str| s.parse::<usize>().ok();
    match parts.as_slice() {
        ["time_embed", "0", tail @ ..] => Some(join("time_embedding.linear_1", tail)),
        ["time_embed", "2", tail @ ..] => Some(join("time_embedding.linear_2", tail)),
        ["label_emb", "0", "0", tail @ ..] => Some(join("add_embedding.linear_1", tail)),
        ["label_emb", "0", "2", tail @ ..] => Some(join("add_embedding.linear_2", tail)),
        ["out", "0", tail @ ..] => Some(join("conv_norm_out", tail)),
        ["out", "2", tail @ ..] => Some(join("conv_out", tail)),
        ["input_blocks", "0", "0", tail @ ..] => Some(join("conv_in", tail)),
        ["input_blocks", n, m, tail @ ..] => {
            let n = num(n)?.checked_sub(1)?;
            let (i, j) = (n / (r + 1), n % (r + 1));
            if i >= levels {
                return None;
            }
            match (num(m)?, j < r) {
                (0, true) => resnet(&format!("down_blocks.{i}.resnets.{j}"), tail),
                (1, true) if cfg.transformer_depth.get(i).copied().unwrap_or(0) > 0 => {
                    Some(join(&format!("down_blocks.{i}.attentions.{j}"), tail))
                }
                (0, false) if i + 1 < levels => match tail {
                    ["op", rest @ ..] => {
                        Some(join(&format!("down_blocks.{i}.downsamplers.0.conv"), rest))
                    }
                    _ => None,
                },
                _ => None,
            }
        }
        ["middle_block", m, tail @ ..] => {
            let attn = cfg.transformer_depth_middle > 0;
            match (num(m)?, attn) {
                (0, _) => resnet("mid_block.resnets.0", tail),
                (1, true) => Some(join("mid_block.attentions.0", tail)),
                (1, false) | (2, true) => resnet("mid_block.resnets.1", tail),
                _ => None,
            }
        }
        ["output_blocks", n, m, tail @ ..] => {
            let n = num(n)?;
            let (i, j) = (n / (r + 1), n % (r + 1));
            if i >= levels {
                return None;
            }
            let attn = cfg
                .transformer_depth
                .get(levels - 1 - i)
                .copied()
                .unwrap_or(0)
                > 0;
            let m = num(m)?;
            let up_index = if attn { 2 } else { 1 };
            match m {
                0 => resnet(&format!("up_blocks.{i}.resnets.{j}"), tail),
                1 if attn => Some(join(&format!("up_blocks.{i}.attentions.{j}"), tail)),
                _ if m == up_index && j == r && i + 1 < levels => match tail {
                    ["conv", rest @ ..] => {
                        Some(join(&format!("up_blocks.{i}.upsamplers.0.conv"), rest))
                    }
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

/// Text encoder key prefixes of a single-file checkpoint, as the loader picks them.
pub fn text_layouts_from_header(
    header: &Header,
    family: Family,
) -> Result<Vec<(String, ClipConfig)>> {
    use crate::detect::{SD1_CLIP_PREFIX, SD2_CLIP_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX};
    let prefixes: Vec<&str> = match family {
        Family::Sd1 => {
            let old = "cond_stage_model.transformer.";
            if !header.has_prefix(SD1_CLIP_PREFIX) && header.has_prefix(old) {
                vec![old]
            } else {
                vec![SD1_CLIP_PREFIX]
            }
        }
        Family::Sd2 => vec![SD2_CLIP_PREFIX],
        Family::Sdxl => vec![SDXL_CLIP_L_PREFIX, SDXL_CLIP_G_PREFIX],
    };
    prefixes
        .into_iter()
        .map(|p| Ok((p.to_string(), ClipConfig::detect(header, p)?)))
        .collect()
}

/// (transformers module, checkpoint weight key, bias key, row block) of a text encoder module.
type TextEntry = (&'static str, String, String, Option<(usize, usize)>);

/// LoRA module names (kohya and diffusers/PEFT spellings) → the checkpoint tensors they adapt.
/// Built once per checkpoint from its header.
#[derive(Debug, Clone)]
pub struct ModuleMap {
    family: Family,
    map: HashMap<String, Target>,
}

impl ModuleMap {
    /// `encoders`: each text encoder's key prefix and configuration, in conditioning order.
    pub fn new(
        header: &Header,
        family: Family,
        unet: &UNetConfig,
        encoders: &[(String, ClipConfig)],
    ) -> Self {
        let mut map = HashMap::new();
        for name in header.names_with_prefix(UNET_PREFIX) {
            let Some(module) = name
                .strip_prefix(UNET_PREFIX)
                .and_then(|m| m.strip_suffix(".weight"))
            else {
                continue;
            };
            let Some(shape) = header.shape(name) else {
                continue;
            };
            let bias = format!("{UNET_PREFIX}{module}.bias");
            let target = Target {
                key: name.to_string(),
                bias: header.contains(&bias).then_some(bias),
                rows: None,
                shape: shape.to_vec(),
                net: Net::Unet,
            };
            map.insert(
                format!("lora_unet_{}", module.replace('.', "_")),
                target.clone(),
            );
            if let Some(d) = ldm_to_diffusers_unet(module, unet) {
                map.insert(format!("lora_unet_{}", d.replace('.', "_")), target.clone());
                map.insert(format!("unet.{d}"), target);
            }
        }
        let n = encoders.len();
        for (e, (prefix, cfg)) in encoders.iter().enumerate() {
            let kohya = match (n, e) {
                (1, _) => "lora_te_",
                (_, 0) => "lora_te1_",
                _ => "lora_te2_",
            };
            let dotted = if e == 0 {
                "text_encoder."
            } else {
                "text_encoder_2."
            };
            let h = cfg.hidden;
            for l in 0..cfg.layers {
                let entries: Vec<TextEntry> = match cfg.layout {
                    ClipLayout::OpenAi => [
                        "self_attn.q_proj",
                        "self_attn.k_proj",
                        "self_attn.v_proj",
                        "self_attn.out_proj",
                        "mlp.fc1",
                        "mlp.fc2",
                    ]
                    .into_iter()
                    .map(|m| {
                        let base = format!("{prefix}encoder.layers.{l}.{m}");
                        (m, format!("{base}.weight"), format!("{base}.bias"), None)
                    })
                    .collect(),
                    ClipLayout::OpenClip => {
                        let b = format!("{prefix}transformer.resblocks.{l}.");
                        let fused = |m, start| {
                            (
                                m,
                                format!("{b}attn.in_proj_weight"),
                                String::new(),
                                Some((start, h)),
                            )
                        };
                        let plain = |m, ldm: &str| {
                            (
                                m,
                                format!("{b}{ldm}.weight"),
                                format!("{b}{ldm}.bias"),
                                None,
                            )
                        };
                        vec![
                            fused("self_attn.q_proj", 0),
                            fused("self_attn.k_proj", h),
                            fused("self_attn.v_proj", 2 * h),
                            plain("self_attn.out_proj", "attn.out_proj"),
                            plain("mlp.fc1", "mlp.c_fc"),
                            plain("mlp.fc2", "mlp.c_proj"),
                        ]
                    }
                };
                for (m, key, bias, rows) in entries {
                    let Some(full) = header.shape(&key) else {
                        continue;
                    };
                    let shape = match rows {
                        Some((start, len)) => {
                            if full.len() != 2 || full[0] < start + len {
                                continue;
                            }
                            vec![len, full[1]]
                        }
                        None => full.to_vec(),
                    };
                    let target = Target {
                        key,
                        bias: header.contains(&bias).then_some(bias),
                        rows,
                        shape,
                        net: Net::Text,
                    };
                    let hf = format!("text_model.encoder.layers.{l}.{m}");
                    map.insert(format!("{kohya}{}", hf.replace('.', "_")), target.clone());
                    map.insert(format!("{dotted}{hf}"), target);
                }
            }
        }
        Self { family, map }
    }

    /// From a checkpoint header alone (family, UNet and text encoder layouts detected).
    pub fn from_header(header: &Header) -> Result<Self> {
        let family = detect::checkpoint_family(header)
            .ok_or_else(|| EngineError::UnknownModel("not a Stable Diffusion checkpoint".into()))?;
        let unet = UNetConfig::detect(header, UNET_PREFIX, family)?;
        let text = text_layouts_from_header(header, family)?;
        Ok(Self::new(header, family, &unet, &text))
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The target of a (normalised) module name.
    pub fn get(&self, module: &str) -> Option<&Target> {
        self.map.get(module)
    }

    /// Every known module name and its target (unordered).
    pub fn entries(&self) -> impl Iterator<Item = (&String, &Target)> {
        self.map.iter()
    }
}

/// The role of one tensor inside an adapter module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Part {
    Down,
    Up,
    Mid,
    Alpha,
    Scale,
    W1a,
    W1b,
    W2a,
    W2b,
    T1,
    T2,
    K1,
    K1a,
    K1b,
    K2,
    K2a,
    K2b,
    Kt2,
    Diff,
    DiffB,
}

/// Parts named after the module (kohya: `module.part`; dotted formats: `module.part` too).
const PARTS: &[(&str, Part)] = &[
    ("lora_down.weight", Part::Down),
    ("lora_up.weight", Part::Up),
    ("lora_mid.weight", Part::Mid),
    ("lora_A.weight", Part::Down),
    ("lora_B.weight", Part::Up),
    ("lora.down.weight", Part::Down),
    ("lora.up.weight", Part::Up),
    ("lora_linear_layer.down.weight", Part::Down),
    ("lora_linear_layer.up.weight", Part::Up),
    ("alpha", Part::Alpha),
    ("scale", Part::Scale),
    ("hada_w1_a", Part::W1a),
    ("hada_w1_b", Part::W1b),
    ("hada_w2_a", Part::W2a),
    ("hada_w2_b", Part::W2b),
    ("hada_t1", Part::T1),
    ("hada_t2", Part::T2),
    ("lokr_w1", Part::K1),
    ("lokr_w1_a", Part::K1a),
    ("lokr_w1_b", Part::K1b),
    ("lokr_w2", Part::K2),
    ("lokr_w2_a", Part::K2a),
    ("lokr_w2_b", Part::K2b),
    ("lokr_t2", Part::Kt2),
    ("diff", Part::Diff),
    ("diff_b", Part::DiffB),
];

const DIFFUSERS_UNET_ROOTS: &[&str] = &[
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding.",
    "add_embedding.",
];

/// Normalise a dotted (diffusers / PEFT) module path to `unet.…` / `text_encoder(_2).…`.
fn normalize_dotted(module: &str) -> String {
    let mut m = module.replace(".processor.", ".");
    for (from, to) in [
        ("to_q_lora", "to_q"),
        ("to_k_lora", "to_k"),
        ("to_v_lora", "to_v"),
        ("to_out_lora", "to_out.0"),
    ] {
        if let Some(stem) = m.strip_suffix(from) {
            m = format!("{stem}{to}");
        }
    }
    if DIFFUSERS_UNET_ROOTS.iter().any(|r| m.starts_with(r)) {
        m = format!("unet.{m}");
    }
    m
}

/// (module, part) of a LoRA file key, or `None` when the key's form is not known.
fn split_key(key: &str) -> Option<(String, Part)> {
    if key.starts_with("lora_unet_") || key.starts_with("lora_te") {
        let (module, suffix) = key.split_once('.')?;
        let part = PARTS.iter().find(|(s, _)| *s == suffix)?.1;
        return Some((module.to_string(), part));
    }
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    // diffusers' attention-processor form: `attn1.processor.to_q_lora.down.weight`.
    for (suffix, part) in [(".down.weight", Part::Down), (".up.weight", Part::Up)] {
        if let Some(module) = key.strip_suffix(suffix).filter(|m| m.ends_with("_lora")) {
            return Some((normalize_dotted(module), part));
        }
    }
    // Longest suffix first so `lora.down.weight` is not read as `….down` + `weight`.
    let mut best: Option<(&str, Part)> = None;
    for &(suffix, part) in PARTS {
        let dotted_len = suffix.len() + 1;
        if key.len() > dotted_len
            && key.ends_with(suffix)
            && key.as_bytes()[key.len() - dotted_len] == b'.'
            && best.is_none_or(|(b, _)| suffix.len() > b.len())
        {
            best = Some((suffix, part));
        }
    }
    let (suffix, part) = best?;
    let module = &key[..key.len() - suffix.len() - 1];
    Some((normalize_dotted(module), part))
}

/// Adapter algorithm of one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lora,
    Loha,
    Lokr,
    Full,
}

/// How a module's `[out, n]` delta is laid onto its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    Reshape,
    /// 4 input channels onto a 9-channel inpainting conv: zero-pad the other 5.
    PadInpaint,
}

/// One adapted module of a LoRA file.
#[derive(Debug, Clone)]
struct Module {
    name: String,
    target: Target,
    kind: Kind,
    parts: BTreeMap<Part, String>,
    /// alpha / rank (or the file's `scale`, or 1).
    scale: f32,
    out: usize,
    n: usize,
    fit: Fit,
}

fn shape_of<'a>(h: &'a Header, parts: &BTreeMap<Part, String>, p: Part) -> Option<&'a [usize]> {
    parts.get(&p).and_then(|k| h.shape(k))
}

fn tail(s: &[usize]) -> usize {
    s.iter().skip(1).product()
}

/// `[out, n]` of a module's delta, and its rank (for alpha scaling), from header shapes.
fn delta_dims(
    h: &Header,
    kind: Kind,
    parts: &BTreeMap<Part, String>,
) -> std::result::Result<(usize, usize, Option<usize>), String> {
    let s = |p: Part| shape_of(h, parts, p).ok_or_else(|| format!("{p:?} missing"));
    let rank2 = |x: &[usize], what: &str| -> std::result::Result<(), String> {
        if x.len() == 2 {
            Ok(())
        } else {
            Err(format!("{what} has shape {x:?}, expected 2-D"))
        }
    };
    // A factor given as (a, b) or Tucker (t, a, b): its [out, n].
    let factor = |a: &[usize],
                  b: &[usize],
                  t: Option<&[usize]>|
     -> std::result::Result<(usize, usize), String> {
        match t {
            None => {
                if a.len() != 2 || b.len() < 2 || a[1] != b[0] {
                    return Err(format!("factor shapes {a:?} × {b:?} do not chain"));
                }
                Ok((a[0], tail(b)))
            }
            Some(t) => {
                if t.len() != 4 || a.len() != 2 || b.len() != 2 || a[0] != t[0] || b[0] != t[1] {
                    return Err(format!("Tucker shapes {t:?}, {a:?}, {b:?} do not chain"));
                }
                Ok((a[1], b[1] * t[2] * t[3]))
            }
        }
    };
    match kind {
        Kind::Lora => {
            let (down, up) = (s(Part::Down)?, s(Part::Up)?);
            if down.len() < 2 || up.len() < 2 || tail(up) != up[1] {
                return Err(format!("lora shapes up {up:?}, down {down:?}"));
            }
            let r = down[0];
            match shape_of(h, parts, Part::Mid) {
                Some(mid) => {
                    if mid.len() != 4 || mid[0] != up[1] || mid[1] != r || tail(down) != down[1] {
                        return Err(format!(
                            "lora_mid {mid:?} does not chain up {up:?} / down {down:?}"
                        ));
                    }
                    Ok((up[0], down[1] * mid[2] * mid[3], Some(r)))
                }
                None => {
                    if up[1] != r {
                        return Err(format!("lora up {up:?} and down {down:?} ranks differ"));
                    }
                    Ok((up[0], tail(down), Some(r)))
                }
            }
        }
        Kind::Loha => {
            let f1 = factor(s(Part::W1a)?, s(Part::W1b)?, shape_of(h, parts, Part::T1))?;
            let f2 = factor(s(Part::W2a)?, s(Part::W2b)?, shape_of(h, parts, Part::T2))?;
            if f1 != f2 {
                return Err(format!("hada factors give {f1:?} and {f2:?}"));
            }
            Ok((f1.0, f1.1, Some(s(Part::W1b)?[0])))
        }
        Kind::Lokr => {
            let mut rank = None;
            let (a, c) = match shape_of(h, parts, Part::K1) {
                Some(w1) => {
                    rank2(w1, "lokr_w1")?;
                    (w1[0], w1[1])
                }
                None => {
                    let (w1a, w1b) = (s(Part::K1a)?, s(Part::K1b)?);
                    rank2(w1b, "lokr_w1_b")?;
                    rank = Some(w1b[0]);
                    factor(w1a, w1b, None)?
                }
            };
            let (b, x) = match shape_of(h, parts, Part::K2) {
                Some(w2) if w2.len() >= 2 => (w2[0], tail(w2)),
                Some(w2) => return Err(format!("lokr_w2 has shape {w2:?}")),
                None => {
                    let (w2a, w2b) = (s(Part::K2a)?, s(Part::K2b)?);
                    rank = Some(w2b[0]);
                    factor(w2a, w2b, shape_of(h, parts, Part::Kt2))?
                }
            };
            Ok((a * b, c * x, rank))
        }
        Kind::Full => {
            let d = s(Part::Diff)?;
            if d.is_empty() {
                return Err("diff is a scalar".into());
            }
            Ok((d[0], tail(d), None))
        }
    }
}

fn fit(out: usize, n: usize, target: &[usize]) -> Option<Fit> {
    let t0 = *target.first()?;
    if out == t0 && n == tail(target) {
        return Some(Fit::Reshape);
    }
    if target.len() == 4 && target[1] == 9 && out == t0 && n == 4 * target[2] * target[3] {
        return Some(Fit::PadInpaint);
    }
    None
}

/// Parts each algorithm uses (besides `alpha` / `scale`).
fn classify(parts: &BTreeMap<Part, String>) -> Option<(Kind, Vec<Part>)> {
    let has = |p: Part| parts.contains_key(&p);
    if has(Part::Down) && has(Part::Up) {
        let mut used = vec![Part::Down, Part::Up];
        if has(Part::Mid) {
            used.push(Part::Mid);
        }
        return Some((Kind::Lora, used));
    }
    if [Part::W1a, Part::W1b, Part::W2a, Part::W2b]
        .iter()
        .all(|&p| has(p))
    {
        let mut used = vec![Part::W1a, Part::W1b, Part::W2a, Part::W2b];
        used.extend([Part::T1, Part::T2].into_iter().filter(|&p| has(p)));
        return Some((Kind::Loha, used));
    }
    let w1 = if has(Part::K1) {
        Some(vec![Part::K1])
    } else if has(Part::K1a) && has(Part::K1b) {
        Some(vec![Part::K1a, Part::K1b])
    } else {
        None
    };
    let w2 = if has(Part::K2) {
        Some(vec![Part::K2])
    } else if has(Part::K2a) && has(Part::K2b) {
        let mut v = vec![Part::K2a, Part::K2b];
        if has(Part::Kt2) {
            v.push(Part::Kt2);
        }
        Some(v)
    } else {
        None
    };
    if let (Some(mut a), Some(b)) = (w1, w2) {
        a.extend(b);
        return Some((Kind::Lokr, a));
    }
    if has(Part::Diff) {
        let mut used = vec![Part::Diff];
        if has(Part::DiffB) {
            used.push(Part::DiffB);
        }
        return Some((Kind::Full, used));
    }
    None
}

fn scalar(file: &SafetensorsFile, key: &str) -> Result<f32> {
    let t = file.tensor_f32(key)?.flatten_all()?;
    if t.elem_count() != 1 {
        return Err(EngineError::UnknownModel(format!(
            "{}: {key} should hold one number, has {:?}",
            file.path().display(),
            t.dims()
        )));
    }
    let v = t.to_vec1::<f32>()?[0];
    if !v.is_finite() {
        return Err(EngineError::UnknownModel(format!(
            "{}: {key} is not a finite number",
            file.path().display()
        )));
    }
    Ok(v)
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::Sd1 => "SD 1.x",
        Family::Sd2 => "SD 2.x",
        Family::Sdxl => "SDXL",
    }
}

/// Identity of a file for "did the set change": path, size and modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileId {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileId {
    fn of(path: &Path) -> Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// One LoRA file, checked against a checkpoint and ready to apply.
#[derive(Debug)]
pub struct LoadedLora {
    spec: LoraSpec,
    id: FileId,
    file: SafetensorsFile,
    modules: Vec<Module>,
    report: LoraFileReport,
}

/// At most this many unknown keys are listed by name in a report.
const MAX_EXAMPLES: usize = 8;

impl LoadedLora {
    /// Open `spec.path`, map every tensor onto `map`'s checkpoint and check every shape.
    pub fn load(spec: &LoraSpec, map: &ModuleMap) -> Result<Self> {
        if !spec.weight.is_finite() {
            return Err(EngineError::InvalidParam(format!(
                "LoRA {}: weight {} is not a finite number",
                spec.name, spec.weight
            )));
        }
        let id = FileId::of(&spec.path)?;
        let file = safetensors_file::open(&spec.path)?;
        let header = file.header();
        let wrong = |msg: String| EngineError::InvalidParam(format!("LoRA {:?}: {msg}", spec.name));
        match detect::detect(header) {
            ModelKind::Lora { family: Some(f) } if f != map.family => {
                return Err(wrong(format!(
                    "made for {}, but the loaded checkpoint is {}",
                    family_name(f),
                    family_name(map.family)
                )))
            }
            ModelKind::Checkpoint(_) => return Err(wrong("is a checkpoint, not a LoRA".into())),
            _ => {}
        }

        let mut unknown: Vec<String> = Vec::new();
        let mut groups: BTreeMap<String, Vec<(Part, String)>> = BTreeMap::new();
        for key in header.tensors.keys() {
            match split_key(key) {
                Some((module, part)) => groups.entry(module).or_default().push((part, key.clone())),
                None => unknown.push(key.clone()),
            }
        }
        let mut modules = Vec::new();
        let mut kinds = BTreeSet::new();
        let mut mismatch: Option<String> = None;
        for (name, list) in groups {
            let Some(target) = map.get(&name) else {
                unknown.extend(list.into_iter().map(|(_, k)| k));
                continue;
            };
            let mut parts = BTreeMap::new();
            for (p, k) in list {
                if let Some(dup) = parts.insert(p, k) {
                    unknown.push(dup);
                }
            }
            let Some((kind, used)) = classify(&parts) else {
                unknown.extend(parts.into_values());
                continue;
            };
            let (out, n, rank) = delta_dims(header, kind, &parts).map_err(|e| {
                EngineError::UnknownModel(format!("LoRA {:?}, module {name}: {e}", spec.name))
            })?;
            let Some(fit) = fit(out, n, &target.shape) else {
                mismatch.get_or_insert(format!(
                    "module {name} gives a [{out}, {n}] change but {} is {:?}",
                    target.key, target.shape
                ));
                continue;
            };
            let mut keep: BTreeMap<Part, String> = BTreeMap::new();
            for p in used {
                if let Some(k) = parts.remove(&p) {
                    keep.insert(p, k);
                }
            }
            // diff_b needs a bias of the right size on a whole (not row-block) target.
            if let Some(k) = keep.get(&Part::DiffB).cloned() {
                let ok = target.rows.is_none()
                    && target.bias.is_some()
                    && header.shape(&k).map(|s| s.iter().product::<usize>())
                        == Some(target.shape[0]);
                if !ok {
                    keep.remove(&Part::DiffB);
                    unknown.push(k);
                }
            }
            let alpha = parts.remove(&Part::Alpha);
            let explicit = parts.remove(&Part::Scale);
            unknown.extend(parts.into_values());
            let scale = match (explicit, alpha, rank) {
                (Some(k), _, _) => scalar(&file, &k)?,
                (None, Some(a), Some(r)) if r > 0 => scalar(&file, &a)? / r as f32,
                _ => 1.0,
            };
            kinds.insert(match kind {
                Kind::Lora if target.shape.len() == 4 && tail(&target.shape) > target.shape[1] => {
                    "locon"
                }
                Kind::Lora => "lora",
                Kind::Loha => "loha",
                Kind::Lokr => "lokr",
                Kind::Full => "full",
            });
            modules.push(Module {
                name,
                target: target.clone(),
                kind,
                parts: keep,
                scale,
                out,
                n,
                fit,
            });
        }
        if let Some(m) = mismatch {
            return Err(wrong(format!(
                "does not fit the loaded {} checkpoint ({m}); it is probably made for another model family",
                family_name(map.family)
            )));
        }
        if modules.is_empty() {
            return Err(wrong(format!(
                "none of its {} tensors matches a layer of the loaded {} checkpoint \
                 (not a LoRA, or made for another model family)",
                header.tensors.len(),
                family_name(map.family)
            )));
        }
        unknown.sort();
        let report = LoraFileReport {
            name: spec.name.clone(),
            weight: spec.weight,
            unet_modules: modules.iter().filter(|m| m.target.net == Net::Unet).count(),
            text_modules: modules.iter().filter(|m| m.target.net == Net::Text).count(),
            kinds: kinds.into_iter().map(String::from).collect(),
            unknown_keys: unknown.len(),
            unknown_examples: unknown.into_iter().take(MAX_EXAMPLES).collect(),
        };
        Ok(Self {
            spec: spec.clone(),
            id,
            file,
            modules,
            report,
        })
    }

    pub fn report(&self) -> &LoraFileReport {
        &self.report
    }

    fn touches(&self, net: Net) -> bool {
        self.modules.iter().any(|m| m.target.net == net)
    }

    fn t(&self, m: &Module, p: Part) -> Result<Tensor> {
        let key = m.parts.get(&p).ok_or_else(|| {
            EngineError::UnknownModel(format!("LoRA {:?}: {} lacks {p:?}", self.spec.name, m.name))
        })?;
        self.file.tensor_f32(key)
    }

    /// `t` as a 2-D `[dim0, rest]` matrix.
    fn mat(&self, m: &Module, p: Part) -> Result<Tensor> {
        let t = self.t(m, p)?;
        let d0 = t.dims().first().copied().unwrap_or(1);
        let n = t.elem_count() / d0.max(1);
        Ok(t.reshape((d0, n))?)
    }

    /// A factor given as `a · b`, or in Tucker form `t ×₀ aᵀ ×₁ bᵀ` (`a` `[p, out]`, `b` `[q, in]`).
    fn factor(&self, m: &Module, a: Part, b: Part, t: Option<Part>) -> Result<Tensor> {
        match t.filter(|t| m.parts.contains_key(t)) {
            None => Ok(self.mat(m, a)?.matmul(&self.mat(m, b)?)?),
            Some(t) => tucker(
                &self.t(m, t)?,
                &self.mat(m, a)?.t()?.contiguous()?,
                &self.mat(m, b)?,
            ),
        }
    }

    /// The module's unscaled delta as `[out, n]`, f32.
    fn delta(&self, m: &Module, bias: bool) -> Result<Tensor> {
        if bias {
            return Ok(self.t(m, Part::DiffB)?.flatten_all()?);
        }
        let d = match m.kind {
            Kind::Lora => {
                let up = self.mat(m, Part::Up)?;
                if m.parts.contains_key(&Part::Mid) {
                    tucker(&self.t(m, Part::Mid)?, &up, &self.mat(m, Part::Down)?)?
                } else {
                    up.matmul(&self.mat(m, Part::Down)?)?
                }
            }
            Kind::Loha => {
                let f1 = self.factor(m, Part::W1a, Part::W1b, Some(Part::T1))?;
                let f2 = self.factor(m, Part::W2a, Part::W2b, Some(Part::T2))?;
                (f1 * f2)?
            }
            Kind::Lokr => {
                let w1 = if m.parts.contains_key(&Part::K1) {
                    self.mat(m, Part::K1)?
                } else {
                    self.factor(m, Part::K1a, Part::K1b, None)?
                };
                let w2 = if m.parts.contains_key(&Part::K2) {
                    self.mat(m, Part::K2)?
                } else {
                    self.factor(m, Part::K2a, Part::K2b, Some(Part::Kt2))?
                };
                kron(&w1, &w2)?
            }
            Kind::Full => self.mat(m, Part::Diff)?,
        };
        if d.dims() != [m.out, m.n] {
            return Err(EngineError::UnknownModel(format!(
                "LoRA {:?}: {} gave a {:?} change, expected [{}, {}]",
                self.spec.name,
                m.name,
                d.dims(),
                m.out,
                m.n
            )));
        }
        Ok(d)
    }

    /// The module's delta shaped like its target (bias: the bias shape), times weight · scale.
    fn scaled_delta(&self, m: &Module, bias: bool) -> Result<Tensor> {
        let d = self.delta(m, bias)?;
        let mult = self.spec.weight * m.scale;
        let d = d.affine(mult as f64, 0.0)?;
        if bias {
            return Ok(d);
        }
        Ok(match m.fit {
            Fit::Reshape => d.reshape(m.target.shape.as_slice())?,
            Fit::PadInpaint => {
                let s = &m.target.shape;
                d.reshape((s[0], 4, s[2], s[3]))?
                    .pad_with_zeros(1, 0, s[1] - 4)?
            }
        })
    }
}

/// Tucker product: `t` `[p, q, kh, kw]`, `left` `[out, p]`, `right` `[q, in]` →
/// `[out, in·kh·kw]` with `Δ[o, i, k, l] = Σ left[o, p] · t[p, q, k, l] · right[q, i]`.
fn tucker(t: &Tensor, left: &Tensor, right: &Tensor) -> Result<Tensor> {
    let (p, q, kh, kw) = t.dims4()?;
    let (out, _) = left.dims2()?;
    let (_, inp) = right.dims2()?;
    // [kh·kw, p, q] @ [q, in] → [kh·kw, p, in]; [out, p] @ that → [kh·kw, out, in].
    let t = t
        .permute((2, 3, 0, 1))?
        .contiguous()?
        .reshape((kh * kw, p, q))?;
    let x = t.broadcast_matmul(right)?;
    let x = left.broadcast_matmul(&x)?;
    Ok(x.permute((1, 2, 0))?
        .contiguous()?
        .reshape((out, inp * kh * kw))?)
}

/// `w` (`[rows, n]`) += `mult` · `up` (`[rows, r]`) · `down` (`[r, n]`). Each row's delta is
/// summed in a scratch row first, then added once, so the result is `W + ΔW` rounded per
/// element like an explicit merge. Rows are split across threads; each row is computed the same
/// way whatever the split, so the result does not depend on the thread count.
fn add_low_rank(w: &mut [f32], up: &[f32], down: &[f32], r: usize, n: usize, mult: f32) {
    if n == 0 || r == 0 {
        return;
    }
    let rows = w.len() / n;
    let work = |chunk: &mut [f32], first: usize| {
        let mut acc = vec![0f32; n];
        for (k, row) in chunk.chunks_exact_mut(n).enumerate() {
            acc.iter_mut().for_each(|a| *a = 0.0);
            let o = first + k;
            for j in 0..r {
                let a = mult * up[o * r + j];
                let d = &down[j * n..(j + 1) * n];
                for (acc, d) in acc.iter_mut().zip(d) {
                    *acc += a * d;
                }
            }
            for (w, a) in row.iter_mut().zip(&acc) {
                *w += *a;
            }
        }
    };
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(rows.div_ceil(64).max(1));
    if threads <= 1 {
        work(w, 0);
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in w.chunks_mut(per * n).enumerate() {
            let work = &work;
            s.spawn(move || work(chunk, i * per));
        }
    });
}

/// Kronecker product of 2-D matrices `[a, c]` ⊗ `[b, x]` → `[a·b, c·x]`.
fn kron(w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    let (a, c) = w1.dims2()?;
    let (b, x) = w2.dims2()?;
    let p = w1
        .reshape((a, 1, c, 1))?
        .broadcast_mul(&w2.reshape((1, b, 1, x))?)?;
    Ok(p.reshape((a * b, c * x))?)
}

/// A checked set of LoRA files, applied in order.
#[derive(Debug, Default)]
pub struct LoraSet {
    loras: Vec<LoadedLora>,
    /// checkpoint key → (lora, module, is bias) contributions, in application order.
    by_key: HashMap<String, Vec<(usize, usize, bool)>>,
}

impl LoraSet {
    /// Load and check every file; fails on the first unusable one.
    pub fn load(specs: &[LoraSpec], map: &ModuleMap) -> Result<Self> {
        let mut set = LoraSet::default();
        for spec in specs {
            let lora = LoadedLora::load(spec, map)?;
            let li = set.loras.len();
            if lora.spec.weight != 0.0 {
                for (mi, m) in lora.modules.iter().enumerate() {
                    set.by_key
                        .entry(m.target.key.clone())
                        .or_default()
                        .push((li, mi, false));
                    if m.parts.contains_key(&Part::DiffB) {
                        if let Some(b) = &m.target.bias {
                            set.by_key
                                .entry(b.clone())
                                .or_default()
                                .push((li, mi, true));
                        }
                    }
                }
            }
            set.loras.push(lora);
        }
        Ok(set)
    }

    pub fn reports(&self) -> Vec<LoraFileReport> {
        self.loras.iter().map(|l| l.report.clone()).collect()
    }

    /// Checkpoint tensors the set changes.
    pub fn patched_keys(&self) -> impl Iterator<Item = &str> {
        self.by_key.keys().map(String::as_str)
    }

    /// What decides a network's weights: (file, weight) of every non-zero LoRA touching it.
    fn signature(&self, net: Net) -> Vec<(FileId, u32)> {
        self.loras
            .iter()
            .filter(|l| l.spec.weight != 0.0 && l.touches(net))
            .map(|l| (l.id.clone(), l.spec.weight.to_bits()))
            .collect()
    }

    /// `w` (the pristine tensor `key`, f32) with every contribution added in order.
    pub fn patch(&self, key: &str, w: Tensor) -> Result<Tensor> {
        if !self.by_key.contains_key(key) {
            return Ok(w);
        }
        let shape = w.dims().to_vec();
        let mut data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.patch_values(key, &mut data, &shape)?;
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }

    /// [`LoraSet::patch`] on the row-major values of tensor `key` (shape `shape`), in place.
    pub fn patch_values(&self, key: &str, data: &mut [f32], shape: &[usize]) -> Result<()> {
        let Some(list) = self.by_key.get(key) else {
            return Ok(());
        };
        let rows = shape.first().copied().unwrap_or(1);
        let width = data.len().checked_div(rows).unwrap_or(0);
        for &(li, mi, bias) in list {
            let lora = &self.loras[li];
            let m = &lora.modules[mi];
            let (start, len) = match (bias, m.target.rows) {
                (false, Some(r)) => r,
                _ => (0, rows),
            };
            let block = data
                .get_mut(start * width..(start + len) * width)
                .filter(|b| bias || b.len() == m.target.shape.iter().product::<usize>())
                .ok_or_else(|| {
                    EngineError::UnknownModel(format!(
                        "LoRA {:?}: {} does not fit {key} {shape:?}",
                        lora.spec.name, m.name
                    ))
                })?;
            let plain = m.kind == Kind::Lora
                && !bias
                && m.fit == Fit::Reshape
                && !m.parts.contains_key(&Part::Mid);
            if plain {
                // The common case in one pass: block += weight · scale · up · down.
                let up = lora.mat(m, Part::Up)?.flatten_all()?.to_vec1::<f32>()?;
                let down = lora.mat(m, Part::Down)?;
                let r = down.dim(0)?;
                let down = down.flatten_all()?.to_vec1::<f32>()?;
                add_low_rank(block, &up, &down, r, m.n, lora.spec.weight * m.scale);
            } else {
                let d = lora
                    .scaled_delta(m, bias)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if d.len() != block.len() {
                    return Err(EngineError::UnknownModel(format!(
                        "LoRA {:?}: {} gives {} values for {} in {key}",
                        lora.spec.name,
                        m.name,
                        d.len(),
                        block.len()
                    )));
                }
                for (w, d) in block.iter_mut().zip(&d) {
                    *w += *d;
                }
            }
        }
        Ok(())
    }

    /// A `VarBuilder` serving `base`'s tensors with this set's deltas added.
    pub fn var_builder<'a>(&'a self, base: &'a SafetensorsFile) -> VarBuilder<'a> {
        VarBuilder::from_backend(
            Box::new(PatchBackend { base, set: self }),
            DType::F32,
            Device::Cpu,
        )
    }
}

struct PatchBackend<'a> {
    base: &'a SafetensorsFile,
    set: &'a LoraSet,
}

fn to_candle(e: EngineError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl SimpleBackend for PatchBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor {name}: checkpoint has shape {:?}, model expects {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (mut data, shape) = self.base.values_f32(name).map_err(to_candle)?;
        self.set
            .patch_values(name, &mut data, &shape)
            .map_err(to_candle)?;
        Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.header().contains(name)
    }
}

/// The engine's LoRA bookkeeping for the loaded checkpoint.
#[derive(Debug, Default)]
pub struct LoraState {
    map: Option<ModuleMap>,
    unet_sig: Vec<(FileId, u32)>,
    text_sig: Vec<(FileId, u32)>,
}

impl LoraState {
    /// Forget everything (a new checkpoint was loaded, pristine).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Replace the applied set on `*ckpt` (see [`crate::Backend::set_loras`]). Everything is
    /// checked before the model is touched, so a bad file leaves the previous set applied. If
    /// the rebuild itself fails, `*ckpt` is left `None` and the caller must reload it.
    pub fn apply(
        &mut self,
        ckpt: &mut Option<Checkpoint>,
        specs: &[LoraSpec],
    ) -> Result<LoraReport> {
        let start = Instant::now();
        let Some(ck) = ckpt.as_ref() else {
            return if specs.is_empty() {
                Ok(LoraReport::default())
            } else {
                Err(EngineError::NoCheckpoint)
            };
        };
        let source = ck.source().ok_or_else(|| {
            EngineError::InvalidParam("LoRAs need a single-file checkpoint".into())
        })?;
        let map = match &self.map {
            Some(m) => m,
            None => self.map.insert(ModuleMap::new(
                source.header(),
                ck.info.family,
                ck.unet.config(),
                &ck.text.layouts(),
            )),
        };
        let set = LoraSet::load(specs, map)?;
        let (us, ts) = (set.signature(Net::Unet), set.signature(Net::Text));
        let (ru, rt) = (us != self.unet_sig, ts != self.text_sig);
        if ru || rt {
            let ck = ckpt.take().ok_or(EngineError::NoCheckpoint)?;
            let vb = set.var_builder(&source);
            match ck.rebuild(&vb, ru, rt) {
                Ok(ck) => *ckpt = Some(ck),
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            }
            self.unet_sig = us;
            self.text_sig = ts;
        }
        Ok(LoraReport {
            loras: set.reports(),
            rebuilt_unet: ru,
            rebuilt_text: rt,
            elapsed_ms: start.elapsed().as_millis() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Backend, Control, GenerateParams, RgbImage};
    use crate::detect::{SD1_CLIP_PREFIX, SD2_CLIP_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX};
    use crate::pipeline::CpuEngine;
    use crate::safetensors_file::{serialize, Dtype, TensorInfo};
    use crate::tiny::{write_tiny_checkpoint, write_tiny_lora};

    fn header_of(entries: Vec<(String, Vec<usize>)>) -> Header {
        let mut h = Header::default();
        for (k, shape) in entries {
            h.tensors.insert(
                k,
                TensorInfo {
                    dtype: Dtype::F16,
                    shape,
                    data_offsets: (0, 0),
                },
            );
        }
        h
    }

    /// Header of a full-size checkpoint (names and shapes only).
    fn full_map(family: Family) -> ModuleMap {
        let (unet, clips) = match family {
            Family::Sd1 => (
                UNetConfig::sd15(),
                vec![(SD1_CLIP_PREFIX, ClipConfig::clip_l())],
            ),
            Family::Sd2 => (
                UNetConfig::sd2(),
                vec![(SD2_CLIP_PREFIX, ClipConfig::open_clip_h())],
            ),
            Family::Sdxl => (
                UNetConfig::sdxl(),
                vec![
                    (SDXL_CLIP_L_PREFIX, ClipConfig::clip_l()),
                    (SDXL_CLIP_G_PREFIX, ClipConfig::open_clip_big_g()),
                ],
            ),
        };
        let mut entries: Vec<(String, Vec<usize>)> = unet
            .param_shapes()
            .into_iter()
            .map(|(k, s)| (format!("{UNET_PREFIX}{k}"), s))
            .collect();
        for (p, c) in &clips {
            entries.extend(
                c.param_shapes()
                    .into_iter()
                    .map(|(k, s)| (format!("{p}{k}"), s)),
            );
        }
        let h = header_of(entries);
        let layouts: Vec<(String, ClipConfig)> =
            clips.into_iter().map(|(p, c)| (p.to_string(), c)).collect();
        ModuleMap::new(&h, family, &unet, &layouts)
    }

    fn key_of(map: &ModuleMap, lora_key: &str) -> (String, Option<(usize, usize)>) {
        let (module, _) = split_key(lora_key).unwrap_or_else(|| panic!("split {lora_key}"));
        let t = map
            .get(&module)
            .unwrap_or_else(|| panic!("no target for {module}"));
        (t.key.clone(), t.rows)
    }

    #[test]
    fn diffusers_paths_of_the_reference_unets() {
        let c = UNetConfig::sd15();
        let m = |s: &str| ldm_to_diffusers_unet(s, &c);
        for (ldm, want) in [
            ("input_blocks.0.0", Some("conv_in")),
            (
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                Some("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            ),
            (
                "input_blocks.2.0.in_layers.2",
                Some("down_blocks.0.resnets.1.conv1"),
            ),
            (
                "input_blocks.3.0.op",
                Some("down_blocks.0.downsamplers.0.conv"),
            ),
            (
                "input_blocks.4.0.skip_connection",
                Some("down_blocks.1.resnets.0.conv_shortcut"),
            ),
            (
                "input_blocks.10.0.emb_layers.1",
                Some("down_blocks.3.resnets.0.time_emb_proj"),
            ),
            ("input_blocks.10.1.proj_in", None),
            ("input_blocks.12.0.op", None),
            (
                "middle_block.1.proj_out",
                Some("mid_block.attentions.0.proj_out"),
            ),
            (
                "middle_block.2.out_layers.3",
                Some("mid_block.resnets.1.conv2"),
            ),
            (
                "output_blocks.2.1.conv",
                Some("up_blocks.0.upsamplers.0.conv"),
            ),
            (
                "output_blocks.3.1.transformer_blocks.0.ff.net.2",
                Some("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"),
            ),
            (
                "output_blocks.5.2.conv",
                Some("up_blocks.1.upsamplers.0.conv"),
            ),
            (
                "output_blocks.11.1.proj_in",
                Some("up_blocks.3.attentions.2.proj_in"),
            ),
            ("output_blocks.11.2.conv", None),
            ("out.2", Some("conv_out")),
            ("time_embed.0", Some("time_embedding.linear_1")),
        ] {
            assert_eq!(m(ldm).as_deref(), want, "{ldm}");
        }
        let c = UNetConfig::sdxl();
        let m = |s: &str| ldm_to_diffusers_unet(s, &c);
        for (ldm, want) in [
            (
                "input_blocks.4.1.transformer_blocks.1.attn2.to_k",
                Some("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
            ),
            ("input_blocks.1.1.proj_in", None),
            (
                "output_blocks.2.2.conv",
                Some("up_blocks.0.upsamplers.0.conv"),
            ),
            ("output_blocks.8.1.conv", None),
            (
                "output_blocks.8.0.in_layers.0",
                Some("up_blocks.2.resnets.2.norm1"),
            ),
            ("label_emb.0.2", Some("add_embedding.linear_2")),
        ] {
            assert_eq!(m(ldm).as_deref(), want, "{ldm}");
        }
    }

    #[test]
    fn kohya_and_peft_names_reach_ldm_keys() {
        let sd1 = full_map(Family::Sd1);
        let u = "model.diffusion_model.";
        for (k, want) in [
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
                "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight",
            ),
            ("lora_unet_mid_block_attentions_0_proj_in.alpha", "middle_block.1.proj_in.weight"),
            ("lora_unet_down_blocks_1_resnets_0_conv_shortcut.hada_w1_a", "input_blocks.4.0.skip_connection.weight"),
            ("lora_unet_up_blocks_0_upsamplers_0_conv.lokr_w1", "output_blocks.2.1.conv.weight"),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "base_model.model.down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj.lora_B.weight",
                "input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight",
            ),
            (
                "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
                "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0.weight",
            ),
            (
                "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            // LDM-style kohya names are accepted for SD 1.x too.
            ("lora_unet_input_blocks_7_1_proj_out.lora_down.weight", "input_blocks.7.1.proj_out.weight"),
        ] {
            assert_eq!(key_of(&sd1, k), (format!("{u}{want}"), None), "{k}");
        }
        let te = "cond_stage_model.transformer.text_model.encoder.layers.";
        assert_eq!(
            key_of(
                &sd1,
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
            ),
            (format!("{te}0.self_attn.q_proj.weight"), None)
        );
        assert_eq!(
            key_of(
                &sd1,
                "text_encoder.text_model.encoder.layers.11.mlp.fc2.lora_linear_layer.up.weight"
            ),
            (format!("{te}11.mlp.fc2.weight"), None)
        );
        assert!(sd1
            .get("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
            .is_none());
        assert!(sd1
            .get("lora_unet_down_blocks_3_attentions_0_proj_in")
            .is_none());

        let sd2 = full_map(Family::Sd2);
        let g = "cond_stage_model.model.transformer.resblocks.";
        assert_eq!(
            key_of(
                &sd2,
                "lora_te_text_model_encoder_layers_22_mlp_fc2.lora_up.weight"
            ),
            (format!("{g}22.mlp.c_proj.weight"), None)
        );
        assert_eq!(
            key_of(
                &sd2,
                "lora_te_text_model_encoder_layers_3_self_attn_v_proj.lora_up.weight"
            ),
            (format!("{g}3.attn.in_proj_weight"), Some((2048, 1024)))
        );

        let xl = full_map(Family::Sdxl);
        for k in [
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        ] {
            assert_eq!(
                key_of(&xl, k),
                (
                    format!("{u}input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
                    None
                ),
                "{k}"
            );
        }
        assert_eq!(
            key_of(
                &xl,
                "lora_te1_text_model_encoder_layers_5_self_attn_out_proj.alpha"
            ),
            (
                format!("{SDXL_CLIP_L_PREFIX}encoder.layers.5.self_attn.out_proj.weight"),
                None
            )
        );
        assert_eq!(
            key_of(
                &xl,
                "lora_te2_text_model_encoder_layers_31_self_attn_k_proj.lora_down.weight"
            ),
            (
                format!("{SDXL_CLIP_G_PREFIX}transformer.resblocks.31.attn.in_proj_weight"),
                Some((1280, 1280))
            )
        );
        assert_eq!(
            key_of(
                &xl,
                "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
            )
            .1,
            Some((0, 1280))
        );
        assert!(split_key("lora_unet_x.dora_scale").is_none());
        assert!(split_key("something").is_none());
    }

    /// Values of a tensor of a safetensors file, as f64, with its shape.
    fn values(f: &SafetensorsFile, key: &str) -> (Vec<f64>, Vec<usize>) {
        let t = f.tensor_f32(key).expect("tensor");
        let shape = t.dims().to_vec();
        let v = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("vec");
        (v.into_iter().map(f64::from).collect(), shape)
    }

    /// `a` `[m, k]` · `b` `[k, n]`, plain loops.
    fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for x in 0..k {
                    s += a[i * k + x] * b[x * n + j];
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    /// A1111's `make_weight_cp(t, wa, wb)`: `out[r, j, k, l] = Σ_i Σ_q wa[i, r] t[i, q, k, l] wb[q, j]`,
    /// flattened to `[r, j·k·l]`.
    fn cp(t: &[f64], ts: &[usize], wa: &[f64], out: usize, wb: &[f64], inp: usize) -> Vec<f64> {
        let (p, q, kk) = (ts[0], ts[1], ts[2] * ts[3]);
        let mut res = vec![0.0; out * inp * kk];
        for r in 0..out {
            for j in 0..inp {
                for k in 0..kk {
                    let mut s = 0.0;
                    for i in 0..p {
                        for x in 0..q {
                            s += wa[i * out + r] * t[(i * q + x) * kk + k] * wb[x * inp + j];
                        }
                    }
                    res[(r * inp + j) * kk + k] = s;
                }
            }
        }
        res
    }

    /// The delta of one module of a LoRA file, straight from its tensors (`[out, n]` flat).
    fn reference_delta(f: &SafetensorsFile, module: &str) -> (Vec<f64>, usize) {
        let h = f.header();
        let has = |p: &str| h.contains(&format!("{module}.{p}"));
        let get = |p: &str| values(f, &format!("{module}.{p}"));
        let alpha = has("alpha").then(|| get("alpha").0[0]);
        if has("lora_down.weight") {
            let (down, ds) = get("lora_down.weight");
            let (up, us) = get("lora_up.weight");
            let (r, n) = (ds[0], down.len() / ds[0]);
            let d = matmul(&up, &down, us[0], r, n);
            let s = alpha.map_or(1.0, |a| a / r as f64);
            return (d.into_iter().map(|x| x * s).collect(), us[0]);
        }
        if has("hada_w1_a") {
            let factor = |i: &str| {
                let (a, sa) = get(&format!("hada_w{i}_a"));
                let (b, sb) = get(&format!("hada_w{i}_b"));
                if has(&format!("hada_t{i}")) {
                    let (t, ts) = get(&format!("hada_t{i}"));
                    (cp(&t, &ts, &a, sa[1], &b, sb[1]), sa[1], sb[0])
                } else {
                    (matmul(&a, &b, sa[0], sa[1], b.len() / sb[0]), sa[0], sb[0])
                }
            };
            let (f1, out, r) = factor("1");
            let (f2, _, _) = factor("2");
            let s = alpha.map_or(1.0, |a| a / r as f64);
            return (f1.iter().zip(&f2).map(|(a, b)| a * b * s).collect(), out);
        }
        // LoKr.
        let mut rank = None;
        let (w1, a, c) = if has("lokr_w1") {
            let (w, s) = get("lokr_w1");
            (w, s[0], s[1])
        } else {
            let (wa, sa) = get("lokr_w1_a");
            let (wb, sb) = get("lokr_w1_b");
            rank = Some(sb[0]);
            (matmul(&wa, &wb, sa[0], sa[1], sb[1]), sa[0], sb[1])
        };
        let (w2, b, x) = if has("lokr_w2") {
            let (w, s) = get("lokr_w2");
            let x = w.len() / s[0];
            (w, s[0], x)
        } else {
            let (wa, sa) = get("lokr_w2_a");
            let (wb, sb) = get("lokr_w2_b");
            rank = Some(sb[0]);
            if has("lokr_t2") {
                let (t, ts) = get("lokr_t2");
                let x = sb[1] * ts[2] * ts[3];
                (cp(&t, &ts, &wa, sa[1], &wb, sb[1]), sa[1], x)
            } else {
                (matmul(&wa, &wb, sa[0], sa[1], sb[1]), sa[0], sb[1])
            }
        };
        let s = match (alpha, rank) {
            (Some(al), Some(r)) => al / r as f64,
            _ => 1.0,
        };
        let mut out = vec![0.0; a * b * c * x];
        for i in 0..a {
            for j in 0..c {
                for p in 0..b {
                    for q in 0..x {
                        out[(i * b + p) * (c * x) + j * x + q] = w1[i * c + j] * w2[p * x + q] * s;
                    }
                }
            }
        }
        (out, a * b)
    }

    fn tiny_pair(dir: &Path, fam: Family, kind: LoraKind, seed: u64) -> (PathBuf, PathBuf) {
        let ck = dir.join(format!("{}.safetensors", fam.as_str()));
        if !ck.exists() {
            write_tiny_checkpoint(fam, false, 3, &ck).expect("ckpt");
        }
        let lora = dir.join(format!("{}-{kind:?}-{seed}.safetensors", fam.as_str()));
        write_tiny_lora(&ck, kind, seed, &lora).expect("lora");
        (ck, lora)
    }

    fn spec(path: &Path, weight: f32) -> LoraSpec {
        LoraSpec {
            path: path.to_path_buf(),
            weight,
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    #[test]
    fn merged_weights_equal_reference_deltas() {
        let dir = tempfile::tempdir().expect("tmp");
        for fam in [Family::Sd1, Family::Sd2, Family::Sdxl] {
            for kind in [LoraKind::Lora, LoraKind::Loha, LoraKind::Lokr] {
                let (ck, lora) = tiny_pair(dir.path(), fam, kind, 9);
                let base = safetensors_file::open(&ck).expect("open");
                let map = ModuleMap::from_header(base.header()).expect("map");
                let weight = -0.7f32;
                let set = LoraSet::load(&[spec(&lora, weight)], &map).expect("load");
                let rep = &set.reports()[0];
                assert_eq!(
                    rep.unknown_keys, 0,
                    "{fam:?} {kind:?}: {:?}",
                    rep.unknown_examples
                );
                assert!(rep.unet_modules >= 9 && rep.text_modules >= 8, "{rep:?}");
                let lf = safetensors_file::open(&lora).expect("lora");
                let modules: BTreeSet<&str> = lf
                    .header()
                    .tensors
                    .keys()
                    .filter_map(|k| k.split_once('.').map(|(m, _)| m))
                    .collect();
                assert_eq!(modules.len(), rep.unet_modules + rep.text_modules);
                for module in modules {
                    let t = map.get(module).expect("target");
                    let pristine = base.tensor_f32(&t.key).expect("w");
                    let patched = set.patch(&t.key, pristine.clone()).expect("patch");
                    let (start, len) = t.rows.unwrap_or((0, t.shape[0]));
                    let d = (patched.narrow(0, start, len).expect("n")
                        - pristine.narrow(0, start, len).expect("n"))
                    .expect("sub")
                    .flatten_all()
                    .and_then(|d| d.to_vec1::<f32>())
                    .expect("vec");
                    let (want, out) = reference_delta(&lf, module);
                    assert_eq!(out, len, "{module}");
                    assert_eq!(d.len(), want.len(), "{module}");
                    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
                    assert!(scale > 1e-3, "{module}: delta too small to test");
                    for (g, w) in d.iter().zip(&want) {
                        let w = w * weight as f64;
                        assert!(
                            (*g as f64 - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                            "{fam:?} {kind:?} {module}: {g} vs {w}"
                        );
                    }
                }
            }
        }
        // A q/k/v block of a fused OpenCLIP in_proj leaves the other rows bit-identical.
        let (ck, lora) = tiny_pair(dir.path(), Family::Sd2, LoraKind::Lora, 9);
        let f = safetensors_file::open(&lora).expect("open");
        let k_only: Vec<_> = f
            .header()
            .tensors
            .keys()
            .filter(|k| k.contains("layers_1_self_attn_k_proj"))
            .map(|k| {
                let (info, b) = f.raw(k).expect("raw");
                (k.clone(), info.dtype, info.shape.clone(), b.to_vec())
            })
            .collect();
        let p = dir.path().join("k.safetensors");
        std::fs::write(&p, serialize(&k_only, &Default::default()).expect("ser")).expect("w");
        let base = safetensors_file::open(&ck).expect("open");
        let map = ModuleMap::from_header(base.header()).expect("map");
        let set = LoraSet::load(&[spec(&p, 1.0)], &map).expect("load");
        let key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight";
        let w = base.tensor_f32(key).expect("w");
        let patched = set.patch(key, w.clone()).expect("patch");
        let bits = |t: &Tensor, start: usize, len: usize| {
            t.narrow(0, start, len)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("v")
                .into_iter()
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&patched, 0, 64), bits(&w, 0, 64));
        assert_ne!(bits(&patched, 64, 64), bits(&w, 64, 64));
        assert_eq!(bits(&patched, 128, 64), bits(&w, 128, 64));
    }

    fn write_lora(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let t: Vec<_> = tensors
            .iter()
            .map(|(k, s, v)| {
                let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (k.to_string(), Dtype::F32, s.clone(), b)
            })
            .collect();
        std::fs::write(path, serialize(&t, &Default::default()).expect("ser")).expect("write");
    }

    fn ramp(n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * s).collect()
    }

    #[test]
    fn lora_mid_diff_inpaint_pad_and_peft_names() {
        let dir = tempfile::tempdir().expect("tmp");
        let ck = dir.path().join("inp.safetensors");
        write_tiny_checkpoint(Family::Sd1, true, 3, &ck).expect("ckpt");
        let base = safetensors_file::open(&ck).expect("open");
        let map = ModuleMap::from_header(base.header()).expect("map");
        let conv1 = "lora_unet_down_blocks_0_resnets_0_conv1";
        let t = map.get(conv1).expect("conv1").clone();
        let (o, i) = (t.shape[0], t.shape[1]);
        let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        let tq = map.get(q).expect("to_q").clone();
        let tin = map.get("lora_unet_conv_in").expect("conv_in").clone();
        assert_eq!(tin.shape[1], 9);
        let p = dir.path().join("mix.safetensors");
        write_lora(
            &p,
            &[
                // LoCon in Tucker form.
                (
                    &format!("{conv1}.lora_down.weight"),
                    vec![2, i, 1, 1],
                    ramp(2 * i, 0.05),
                ),
                (
                    &format!("{conv1}.lora_mid.weight"),
                    vec![3, 2, 3, 3],
                    ramp(54, 0.1),
                ),
                (
                    &format!("{conv1}.lora_up.weight"),
                    vec![o, 3, 1, 1],
                    ramp(3 * o, 0.05),
                ),
                (&format!("{conv1}.alpha"), vec![], vec![1.0]),
                // Full diff with a bias diff.
                (
                    "lora_unet_down_blocks_0_resnets_0_conv2.diff",
                    vec![o, o, 3, 3],
                    ramp(o * o * 9, 0.01),
                ),
                (
                    "lora_unet_down_blocks_0_resnets_0_conv2.diff_b",
                    vec![o],
                    ramp(o, 0.01),
                ),
                // PEFT names, no alpha.
                (
                    &format!("{q}.lora_A.weight"),
                    vec![2, tq.shape[1]],
                    ramp(2 * tq.shape[1], 0.02),
                ),
                (
                    &format!("{q}.lora_B.weight"),
                    vec![tq.shape[0], 2],
                    ramp(2 * tq.shape[0], 0.02),
                ),
                // A 4-channel LoRA on the 9-channel inpainting conv_in.
                (
                    "lora_unet_conv_in.lora_down.weight",
                    vec![2, 4, 3, 3],
                    ramp(72, 0.05),
                ),
                (
                    "lora_unet_conv_in.lora_up.weight",
                    vec![tin.shape[0], 2, 1, 1],
                    ramp(2 * tin.shape[0], 0.05),
                ),
            ],
        );
        let set = LoraSet::load(&[spec(&p, 1.0)], &map).expect("load");
        let rep = &set.reports()[0];
        assert_eq!((rep.unet_modules, rep.unknown_keys), (4, 0), "{rep:?}");
        assert_eq!(rep.kinds, vec!["full", "locon", "lora"]);
        let lf = safetensors_file::open(&p).expect("lora");
        let delta = |key: &str| {
            let w = base.tensor_f32(key).expect("w");
            let d = (set.patch(key, w.clone()).expect("patch") - w).expect("sub");
            d.flatten_all().and_then(|d| d.to_vec1::<f32>()).expect("v")
        };
        let close = |got: &[f32], want: &[f64], what: &str| {
            assert_eq!(got.len(), want.len(), "{what}");
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-6 + 1e-5 * w.abs(),
                    "{what}: {g} vs {w}"
                );
            }
        };
        // lora_mid: einsum('n m k l, i n, m j -> i j k l', mid, up, down) · alpha / rank(2).
        let (mid, ms) = values(&lf, &format!("{conv1}.lora_mid.weight"));
        let (up, _) = values(&lf, &format!("{conv1}.lora_up.weight"));
        let (down, _) = values(&lf, &format!("{conv1}.lora_down.weight"));
        // up is [o, 3] = wa[3, o] transposed for `cp`.
        let up_t: Vec<f64> = (0..3)
            .flat_map(|n| (0..o).map(move |r| (n, r)))
            .map(|(n, r)| up[r * 3 + n])
            .collect();
        let want: Vec<f64> = cp(&mid, &ms, &up_t, o, &down, i)
            .into_iter()
            .map(|x| x * 0.5)
            .collect();
        close(&delta(&t.key), &want, "lora_mid");
        // diff and diff_b are the deltas themselves.
        let conv2 = map
            .get("lora_unet_down_blocks_0_resnets_0_conv2")
            .expect("conv2");
        let (d, _) = values(&lf, "lora_unet_down_blocks_0_resnets_0_conv2.diff");
        close(&delta(&conv2.key), &d, "diff");
        let (db, _) = values(&lf, "lora_unet_down_blocks_0_resnets_0_conv2.diff_b");
        close(&delta(conv2.bias.as_deref().expect("bias")), &db, "diff_b");
        // PEFT: B · A, scale 1.
        let (a, _) = values(&lf, &format!("{q}.lora_A.weight"));
        let (b, _) = values(&lf, &format!("{q}.lora_B.weight"));
        close(
            &delta(&tq.key),
            &matmul(&b, &a, tq.shape[0], 2, tq.shape[1]),
            "peft",
        );
        // conv_in: channels 4..9 untouched, 0..4 get up · down.
        let (down, _) = values(&lf, "lora_unet_conv_in.lora_down.weight");
        let (up, _) = values(&lf, "lora_unet_conv_in.lora_up.weight");
        let small = matmul(&up, &down, tin.shape[0], 2, 36);
        let mut want = vec![0.0; tin.shape[0] * 81];
        for oc in 0..tin.shape[0] {
            want[oc * 81..oc * 81 + 36].copy_from_slice(&small[oc * 36..oc * 36 + 36]);
        }
        close(&delta(&tin.key), &want, "inpaint conv_in");
    }

    #[test]
    fn wrong_family_refused_unknown_keys_reported() {
        let dir = tempfile::tempdir().expect("tmp");
        let (_, sd1_lora) = tiny_pair(dir.path(), Family::Sd1, LoraKind::Lora, 1);
        let (xl, _) = tiny_pair(dir.path(), Family::Sdxl, LoraKind::Lora, 1);
        let xl_map =
            ModuleMap::from_header(&safetensors_file::read_header(&xl).expect("h")).expect("map");
        let e = LoraSet::load(&[spec(&sd1_lora, 1.0)], &xl_map).expect_err("sd1 on sdxl");
        assert!(e.to_string().contains("another model family"), "{e}");
        // Real widths tell the family from the header: a 768-wide attn2 LoRA is SD 1.x.
        let p = dir.path().join("real.safetensors");
        let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
        write_lora(
            &p,
            &[
                (
                    &format!("{k}.lora_down.weight"),
                    vec![1, 768],
                    vec![0.0; 768],
                ),
                (&format!("{k}.lora_up.weight"), vec![320, 1], vec![0.0; 320]),
            ],
        );
        let e = LoraSet::load(&[spec(&p, 1.0)], &xl_map).expect_err("family");
        assert!(
            e.to_string()
                .contains("made for SD 1.x, but the loaded checkpoint is SDXL"),
            "{e}"
        );
        // A checkpoint is not a LoRA.
        assert!(LoraSet::load(&[spec(&xl, 1.0)], &xl_map).is_err());

        // Unknown modules and parts are counted and named; the rest still applies.
        let (sd1, lora) = tiny_pair(dir.path(), Family::Sd1, LoraKind::Lora, 2);
        let f = safetensors_file::open(&lora).expect("open");
        let mut tensors: Vec<_> = f
            .header()
            .tensors
            .keys()
            .map(|k| {
                let (info, b) = f.raw(k).expect("raw");
                (k.clone(), info.dtype, info.shape.clone(), b.to_vec())
            })
            .collect();
        let n_modules = f
            .header()
            .tensors
            .keys()
            .filter(|k| k.ends_with("lora_down.weight"))
            .count();
        for k in [
            "lora_unet_no_such_block.lora_down.weight",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale",
            "junk",
        ] {
            tensors.push((k.to_string(), Dtype::F32, vec![1], vec![0; 4]));
        }
        let p = dir.path().join("extra.safetensors");
        std::fs::write(&p, serialize(&tensors, &Default::default()).expect("ser")).expect("write");
        let map =
            ModuleMap::from_header(&safetensors_file::read_header(&sd1).expect("h")).expect("map");
        let set = LoraSet::load(&[spec(&p, 1.0)], &map).expect("load");
        let rep = &set.reports()[0];
        assert_eq!(rep.unet_modules + rep.text_modules, n_modules);
        assert_eq!(rep.unknown_keys, 3);
        assert!(rep.unknown_examples.iter().any(|k| k == "junk"), "{rep:?}");
        assert!(
            rep.unknown_examples
                .iter()
                .any(|k| k.ends_with("dora_scale")),
            "{rep:?}"
        );
        // Nothing that matches at all is an error, not a silent no-op.
        let p = dir.path().join("none.safetensors");
        write_lora(
            &p,
            &[(
                "lora_unet_no_such_block.lora_down.weight",
                vec![1, 1],
                vec![0.0],
            )],
        );
        assert!(LoraSet::load(&[spec(&p, 1.0)], &map).is_err());
    }

    fn generate(e: &mut CpuEngine) -> Vec<RgbImage> {
        let p = GenerateParams {
            prompt: "a photo of a cat".into(),
            negative_prompt: "blurry".into(),
            width: 32,
            height: 32,
            steps: 2,
            guidance_scale: 5.0,
            scheduler: "Euler".into(),
            seed: 7,
            ..Default::default()
        };
        e.generate(&p, &mut |_| Control::Continue)
            .expect("generate")
    }

    #[test]
    fn switching_sets_is_exact() {
        let dir = tempfile::tempdir().expect("tmp");
        for fam in [Family::Sd1, Family::Sdxl] {
            let (ck, a) = tiny_pair(dir.path(), fam, LoraKind::Lora, 1);
            let (_, b) = tiny_pair(dir.path(), fam, LoraKind::Loha, 2);
            let (_, c) = tiny_pair(dir.path(), fam, LoraKind::Lokr, 3);
            let mut e = CpuEngine::new();
            e.load_checkpoint(&ck).expect("load");
            let base = generate(&mut e);

            let r = e.set_loras(&[spec(&a, 0.0)]).expect("w0");
            assert!(
                !r.rebuilt_unet && !r.rebuilt_text,
                "weight 0 changes nothing"
            );
            assert_eq!(r.loras[0].unknown_keys, 0);
            assert_eq!(
                generate(&mut e),
                base,
                "{fam:?}: weight 0 must equal no LoRA"
            );

            let r = e.set_loras(&[spec(&a, 1.0)]).expect("a");
            assert!(r.rebuilt_unet && r.rebuilt_text);
            let with_a = generate(&mut e);
            assert_ne!(with_a, base, "{fam:?}: weight 1 must change the image");

            e.set_loras(&[spec(&b, 0.8), spec(&c, -0.6)]).expect("b+c");
            let with_bc = generate(&mut e);
            assert_ne!(with_bc, with_a);
            e.set_loras(&[spec(&a, 1.0)]).expect("a again");
            assert_eq!(
                generate(&mut e),
                with_a,
                "{fam:?}: switching back must be bit-identical"
            );

            // The same set again is a no-op; a bad file leaves the set applied.
            let r = e.set_loras(&[spec(&a, 1.0)]).expect("same");
            assert!(!r.rebuilt_unet && !r.rebuilt_text);
            let missing = dir.path().join("missing.safetensors");
            assert!(e.set_loras(&[spec(&a, 1.0), spec(&missing, 1.0)]).is_err());
            assert_eq!(generate(&mut e), with_a);

            let r = e.set_loras(&[]).expect("none");
            assert!(r.rebuilt_unet && r.rebuilt_text);
            assert_eq!(
                generate(&mut e),
                base,
                "{fam:?}: the empty set must restore the checkpoint"
            );

            // A new checkpoint load starts without LoRA.
            e.set_loras(&[spec(&a, 1.0)]).expect("a");
            e.load_checkpoint(&ck).expect("reload");
            assert_eq!(generate(&mut e), base);
        }
    }

    #[test]
    fn text_only_change_keeps_the_unet() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ck, a) = tiny_pair(dir.path(), Family::Sd1, LoraKind::Lora, 1);
        // A LoRA with only the text-encoder modules of `a`.
        let f = safetensors_file::open(&a).expect("open");
        let te: Vec<_> = f
            .header()
            .tensors
            .keys()
            .filter(|k| k.starts_with("lora_te_"))
            .map(|k| {
                let (info, b) = f.raw(k).expect("raw");
                (k.clone(), info.dtype, info.shape.clone(), b.to_vec())
            })
            .collect();
        let te_path = dir.path().join("te.safetensors");
        std::fs::write(&te_path, serialize(&te, &Default::default()).expect("ser")).expect("w");
        let mut e = CpuEngine::new();
        e.load_checkpoint(&ck).expect("load");
        e.set_loras(&[spec(&a, 1.0)]).expect("a");
        let r = e
            .set_loras(&[spec(&a, 1.0), spec(&te_path, 0.5)])
            .expect("a+te");
        assert!(!r.rebuilt_unet && r.rebuilt_text, "{r:?}");
        assert_eq!(
            (r.loras[1].unet_modules, r.loras[1].kinds.clone()),
            (0, vec!["lora".to_string()])
        );
    }

    #[test]
    fn reapply_timing() {
        let dir = tempfile::tempdir().expect("tmp");
        for fam in [Family::Sd1, Family::Sdxl] {
            let (ck, a) = tiny_pair(dir.path(), fam, LoraKind::Lora, 1);
            let (_, b) = tiny_pair(dir.path(), fam, LoraKind::Lokr, 2);
            let mut e = CpuEngine::new();
            let t = Instant::now();
            e.load_checkpoint(&ck).expect("load");
            let load = t.elapsed();
            let t = Instant::now();
            let ra = e.set_loras(&[spec(&a, 1.0)]).expect("a");
            let apply = t.elapsed();
            let t = Instant::now();
            e.set_loras(&[spec(&a, 1.0), spec(&b, 0.5)]).expect("a+b");
            let two = t.elapsed();
            let t = Instant::now();
            e.set_loras(&[spec(&a, 1.0), spec(&b, 0.5)]).expect("same");
            let same = t.elapsed();
            eprintln!(
                "{fam:?} tiny: load {load:?}, apply 1 LoRA {apply:?} ({} modules), 2 LoRAs {two:?}, unchanged set {same:?}",
                ra.loras[0].unet_modules + ra.loras[0].text_modules
            );
        }
    }

    fn fixture(name: &str) -> serde_json::Value {
        let text = match name {
            "unet_names" => include_str!("../tests/fixtures/lora/unet_names.json"),
            "sd1_peft" => include_str!("../tests/fixtures/lora/sd1_peft.json"),
            "sd2_peft" => include_str!("../tests/fixtures/lora/sd2_peft.json"),
            "sdxl_peft" => include_str!("../tests/fixtures/lora/sdxl_peft.json"),
            "lycoris" => include_str!("../tests/fixtures/lora/lycoris.json"),
            _ => panic!("no fixture {name}"),
        };
        serde_json::from_str(text).expect("fixture json")
    }

    #[test]
    fn fixture_unet_names_match_diffusers_converter() {
        let fx = fixture("unet_names");
        for (fam, cfg) in [("sd1", UNetConfig::sd15()), ("sdxl", UNetConfig::sdxl())] {
            let names = fx[fam].as_object().expect("names");
            let ours: BTreeSet<String> = cfg
                .param_shapes()
                .into_iter()
                .filter_map(|(k, _)| {
                    k.strip_suffix(".weight")
                        .or_else(|| k.strip_suffix(".bias"))
                        .map(str::to_string)
                })
                .collect();
            assert_eq!(ours.len(), names.len(), "{fam}: module count");
            for (ldm, d) in names {
                assert!(ours.contains(ldm), "{fam}: {ldm} not in our layout");
                assert_eq!(
                    ldm_to_diffusers_unet(ldm, &cfg).as_deref(),
                    d.as_str(),
                    "{fam}: {ldm}"
                );
            }
        }
    }

    /// Compares one fixture record (sampled values of the adapted weight, sums of the change)
    /// with the engine's patched tensor for a target.
    fn check_record(what: &str, rec: &serde_json::Value, patched: &Tensor, pristine: &Tensor) {
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("v");
        let (p, w) = (flat(patched), flat(pristine));
        assert_eq!(rec["n"].as_u64(), Some(p.len() as u64), "{what}: size");
        let idx = rec["idx"].as_array().expect("idx");
        let sample = rec["sample"].as_array().expect("sample");
        for (i, want) in idx.iter().zip(sample) {
            let (i, want) = (i.as_u64().expect("i") as usize, want.as_f64().expect("f"));
            let got = p[i] as f64;
            assert!(
                (got - want).abs() <= 1e-6 + 1e-5 * want.abs(),
                "{what}[{i}]: {got} vs {want}"
            );
        }
        let (sum, sumsq) = p.iter().zip(&w).fold((0f64, 0f64), |(s, q), (a, b)| {
            let d = *a as f64 - *b as f64;
            (s + d, q + d * d)
        });
        let want_sq = rec["delta_sumsq"].as_f64().expect("sq");
        let want_sum = rec["delta_sum"].as_f64().expect("sum");
        assert!(want_sq > 0.0, "{what}: no change recorded");
        assert!(
            (sumsq - want_sq).abs() <= 1e-4 * want_sq,
            "{what}: sumsq {sumsq} vs {want_sq}"
        );
        let tol = 1e-4 * (want_sq * p.len() as f64).sqrt();
        assert!(
            (sum - want_sum).abs() <= tol,
            "{what}: sum {sum} vs {want_sum}"
        );
    }

    #[test]
    fn fixture_kohya_lora_matches_diffusers_peft() {
        let dir = tempfile::tempdir().expect("tmp");
        for fam in [Family::Sd1, Family::Sd2, Family::Sdxl] {
            let fx = fixture(&format!("{}_peft", fam.as_str()));
            let ck = dir.path().join(format!("{}.safetensors", fam.as_str()));
            write_tiny_checkpoint(fam, false, fx["ckpt_seed"].as_u64().expect("seed"), &ck)
                .expect("ckpt");
            let lora = dir
                .path()
                .join(format!("{}-lora.safetensors", fam.as_str()));
            write_tiny_lora(
                &ck,
                LoraKind::Lora,
                fx["lora_seed"].as_u64().expect("seed"),
                &lora,
            )
            .expect("lora");
            let weight = fx["weight"].as_f64().expect("w") as f32;
            let base = safetensors_file::open(&ck).expect("open");
            let map = ModuleMap::from_header(base.header()).expect("map");
            let set = LoraSet::load(&[spec(&lora, weight)], &map).expect("load");
            let rep = &set.reports()[0];
            let modules = fx["modules"].as_object().expect("modules");
            // diffusers' SD 2.x text encoder lacks the last block (4 projections).
            let dropped = if fam == Family::Sd2 { 4 } else { 0 };
            assert_eq!(
                modules.len() + dropped,
                rep.unet_modules + rep.text_modules,
                "{fam:?}"
            );
            for (module, rec) in modules {
                let t = map
                    .get(module)
                    .unwrap_or_else(|| panic!("{fam:?}: no target for {module}"));
                let pristine = base.tensor_f32(&t.key).expect("w");
                let patched = set.patch(&t.key, pristine.clone()).expect("patch");
                let (start, len) = t.rows.unwrap_or((0, t.shape[0]));
                let block = |x: &Tensor| x.narrow(0, start, len).expect("rows");
                check_record(
                    &format!("{fam:?} {module}"),
                    rec,
                    &block(&patched),
                    &block(&pristine),
                );
            }
        }
    }

    #[test]
    fn fixture_loha_lokr_match_lycoris() {
        let fx = fixture("lycoris");
        let dir = tempfile::tempdir().expect("tmp");
        for fam in [Family::Sd1, Family::Sdxl] {
            let ck = dir.path().join(format!("{}.safetensors", fam.as_str()));
            write_tiny_checkpoint(fam, false, fx["ckpt_seed"].as_u64().expect("seed"), &ck)
                .expect("ckpt");
            let base = safetensors_file::open(&ck).expect("open");
            let map = ModuleMap::from_header(base.header()).expect("map");
            for (kind, name) in [(LoraKind::Loha, "loha"), (LoraKind::Lokr, "lokr")] {
                let lora = dir
                    .path()
                    .join(format!("{}-{name}.safetensors", fam.as_str()));
                write_tiny_lora(&ck, kind, fx["lora_seed"].as_u64().expect("seed"), &lora)
                    .expect("lora");
                let set = LoraSet::load(&[spec(&lora, 1.0)], &map).expect("load");
                let modules = fx[fam.as_str()][name].as_object().expect("modules");
                let rep = &set.reports()[0];
                assert_eq!(modules.len(), rep.unet_modules + rep.text_modules);
                for (module, rec) in modules {
                    let t = map.get(module).expect("target");
                    let pristine = base.tensor_f32(&t.key).expect("w");
                    let patched = set.patch(&t.key, pristine.clone()).expect("patch");
                    let (start, len) = t.rows.unwrap_or((0, t.shape[0]));
                    let delta = (patched.narrow(0, start, len).expect("n")
                        - pristine.narrow(0, start, len).expect("n"))
                    .expect("d");
                    let zero = delta.zeros_like().expect("z");
                    check_record(&format!("{fam:?} {name} {module}"), rec, &delta, &zero);
                }
            }
        }
    }
}
