//! A diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
//! `text_encoder_2/`) presented under the single-file LDM/SGM key names, so the same model
//! loaders and shape-based detection serve both layouts.
//!
//! Every LDM name maps to a tensor of one of the folder's files, possibly transformed: the
//! fused OpenCLIP attention projection is the row concatenation of the transformers q/k/v
//! projections, and OpenCLIP's `text_projection` is the transpose of transformers'
//! `text_projection.weight`. Nothing is copied up front; tensors are read when a model asks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::api::{CheckpointInfo, Family};
use crate::detect::{
    SD1_CLIP_PREFIX, SD2_CLIP_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX, UNET_PREFIX,
    VAE_PREFIX,
};
use crate::lora::ldm_to_diffusers_unet;
use crate::models::unet::UNetConfig;
use crate::safetensors_file::{self, Dtype, Header, SafetensorsFile, TensorInfo};
use crate::{EngineError, Result};

fn unknown(msg: impl Into<String>) -> EngineError {
    EngineError::UnknownModel(msg.into())
}

/// Where an LDM-named tensor comes from.
#[derive(Debug, Clone)]
enum Src {
    /// (file index, tensor name in that file)
    Plain(usize, String),
    /// A 2-D tensor, transposed.
    Transpose(usize, String),
    /// Row concatenation of several tensors of one file (q, k, v).
    Cat(usize, Vec<String>),
}

/// One component (`unet`, `vae`, ...): its files and which file holds each tensor.
struct Component {
    /// diffusers name → (file index, shape)
    names: BTreeMap<String, (usize, Vec<usize>)>,
}

/// A diffusers folder seen through LDM key names.
pub struct Folder {
    files: Vec<SafetensorsFile>,
    map: HashMap<String, Src>,
    /// Synthetic header: LDM names with the shapes the models will get (no data offsets).
    header: Header,
    pub family: Family,
    /// From `scheduler/scheduler_config.json` (`prediction_type`), if present.
    pub v_prediction: Option<bool>,
}

impl std::fmt::Debug for Folder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Folder")
            .field("files", &self.files.len())
            .field("tensors", &self.map.len())
            .field("family", &self.family)
            .finish()
    }
}

/// Read a small JSON file, `None` if it does not exist.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let len = std::fs::metadata(path)?.len();
    if len > 64 << 20 {
        return Err(unknown(format!("{} is too large", path.display())));
    }
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| unknown(format!("{}: invalid JSON: {e}", path.display())))
}

/// The safetensors files of a component folder with base name `base` (e.g.
/// `diffusion_pytorch_model`): the single file, its `.fp16` variant, or a sharded index.
fn component_files(dir: &Path, base: &str) -> Result<Option<Vec<PathBuf>>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    for name in [
        format!("{base}.safetensors"),
        format!("{base}.fp16.safetensors"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(Some(vec![p]));
        }
    }
    for name in [
        format!("{base}.safetensors.index.json"),
        format!("{base}.safetensors.index.fp16.json"),
    ] {
        let p = dir.join(&name);
        let Some(index) = read_json(&p)? else {
            continue;
        };
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| unknown(format!("{}: no weight_map", p.display())))?;
        let mut shards = BTreeSet::new();
        for v in map.values() {
            let f = v.as_str().ok_or_else(|| {
                unknown(format!(
                    "{}: weight_map values must be strings",
                    p.display()
                ))
            })?;
            // Shards must sit beside the index: no paths.
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(unknown(format!("{}: bad shard name {f:?}", p.display())));
            }
            shards.insert(f.to_string());
        }
        return Ok(Some(shards.into_iter().map(|f| dir.join(f)).collect()));
    }
    let has_pickle = std::fs::read_dir(dir)?.flatten().any(|e| {
        let n = e.file_name().to_string_lossy().to_ascii_lowercase();
        n.ends_with(".bin") || n.ends_with(".ckpt") || n.ends_with(".pt")
    });
    if has_pickle {
        return Err(EngineError::UnsafeFormat(format!(
            "{}: only pickle weights (.bin); a safetensors copy is needed",
            dir.display()
        )));
    }
    Err(unknown(format!(
        "{}: no {base}.safetensors (or .fp16 / sharded index)",
        dir.display()
    )))
}

struct Builder {
    files: Vec<SafetensorsFile>,
    map: HashMap<String, Src>,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl Builder {
    fn component(&mut self, paths: &[PathBuf]) -> Result<Component> {
        let mut names = BTreeMap::new();
        for p in paths {
            let f = safetensors_file::open(p)?;
            let idx = self.files.len();
            for (k, t) in &f.header().tensors {
                if names.insert(k.clone(), (idx, t.shape.clone())).is_some() {
                    return Err(unknown(format!(
                        "tensor {k} appears in two shards ({})",
                        p.display()
                    )));
                }
            }
            self.files.push(f);
        }
        Ok(Component { names })
    }

    fn plain(&mut self, ldm: String, c: &Component, name: &str) {
        if let Some((idx, shape)) = c.names.get(name) {
            self.shapes.insert(ldm.clone(), shape.clone());
            self.map.insert(ldm, Src::Plain(*idx, name.to_string()));
        }
    }
}

/// Resnet sub-module name of a diffusers UNet resnet → the LDM one.
fn unet_resnet(rest: &str) -> Option<String> {
    let (head, tail) = rest.split_once('.')?;
    let ldm = match head {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(format!("{ldm}.{tail}"))
}

/// Split `a.b.c.rest` into the numbers at the given dotted positions.
fn idx(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// The LDM name (without `model.diffusion_model.`) of a diffusers UNet tensor. `r` is the
/// number of res blocks per level, `up_attn(i)` whether up level `i` has attention
/// (`up_attn(usize::MAX)`: whether the middle block has a transformer).
fn unet_name(name: &str, r: usize, up_attn: &dyn Fn(usize) -> bool) -> Option<String> {
    let simple = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (d, l) in simple {
        if let Some(rest) = name.strip_prefix(d) {
            return Some(format!("{l}{rest}"));
        }
    }
    if let Some(s) = name.strip_prefix("down_blocks.") {
        let (i, s) = idx(s)?;
        if let Some(s) = s.strip_prefix("resnets.") {
            let (j, rest) = idx(s)?;
            let n = 1 + i * (r + 1) + j;
            return Some(format!("input_blocks.{n}.0.{}", unet_resnet(rest)?));
        }
        if let Some(s) = s.strip_prefix("attentions.") {
            let (j, rest) = idx(s)?;
            let n = 1 + i * (r + 1) + j;
            return Some(format!("input_blocks.{n}.1.{rest}"));
        }
        if let Some(rest) = s.strip_prefix("downsamplers.0.conv.") {
            return Some(format!("input_blocks.{}.0.op.{rest}", (i + 1) * (r + 1)));
        }
        return None;
    }
    if let Some(s) = name.strip_prefix("mid_block.") {
        if let Some(rest) = s.strip_prefix("attentions.0.") {
            return Some(format!("middle_block.1.{rest}"));
        }
        let s = s.strip_prefix("resnets.")?;
        let (j, rest) = idx(s)?;
        // Without a middle transformer the second resnet is `middle_block.1`.
        let has_attn = up_attn(usize::MAX);
        let m = match (j, has_attn) {
            (0, _) => 0,
            (1, true) => 2,
            (1, false) => 1,
            _ => return None,
        };
        return Some(format!("middle_block.{m}.{}", unet_resnet(rest)?));
    }
    if let Some(s) = name.strip_prefix("up_blocks.") {
        let (i, s) = idx(s)?;
        if let Some(s) = s.strip_prefix("resnets.") {
            let (j, rest) = idx(s)?;
            let n = i * (r + 1) + j;
            return Some(format!("output_blocks.{n}.0.{}", unet_resnet(rest)?));
        }
        if let Some(s) = s.strip_prefix("attentions.") {
            let (j, rest) = idx(s)?;
            let n = i * (r + 1) + j;
            return Some(format!("output_blocks.{n}.1.{rest}"));
        }
        if let Some(rest) = s.strip_prefix("upsamplers.0.conv.") {
            let n = i * (r + 1) + r;
            let m = if up_attn(i) { 2 } else { 1 };
            return Some(format!("output_blocks.{n}.{m}.conv.{rest}"));
        }
    }
    None
}

/// The LDM name (without `first_stage_model.`) of a diffusers `AutoencoderKL` tensor;
/// `levels` is the number of decoder up blocks (they are numbered in reverse in LDM).
fn vae_name(name: &str, levels: usize) -> Option<String> {
    for same in ["quant_conv.", "post_quant_conv."] {
        if name.starts_with(same) {
            return Some(name.to_string());
        }
    }
    let (side, s) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let block = |rest: &str| -> Option<String> {
        let (head, tail) = rest.split_once('.')?;
        let head = match head {
            "norm1" | "conv1" | "norm2" | "conv2" => head,
            "conv_shortcut" => "nin_shortcut",
            _ => return None,
        };
        Some(format!("{head}.{tail}"))
    };
    let body = if let Some(rest) = s.strip_prefix("conv_norm_out.") {
        format!("norm_out.{rest}")
    } else if s.starts_with("conv_in.") || s.starts_with("conv_out.") {
        s.to_string()
    } else if let Some(t) = s.strip_prefix("mid_block.") {
        if let Some(t) = t.strip_prefix("resnets.") {
            let (j, rest) = idx(t)?;
            format!("mid.block_{}.{}", j + 1, block(rest)?)
        } else {
            let t = t.strip_prefix("attentions.0.")?;
            let (head, tail) = t.rsplit_once('.')?;
            let head = match head {
                "group_norm" => "norm",
                "to_q" | "query" => "q",
                "to_k" | "key" => "k",
                "to_v" | "value" => "v",
                "to_out.0" | "proj_attn" => "proj_out",
                _ => return None,
            };
            format!("mid.attn_1.{head}.{tail}")
        }
    } else if let Some(t) = s.strip_prefix("down_blocks.") {
        let (i, t) = idx(t)?;
        if let Some(t) = t.strip_prefix("resnets.") {
            let (j, rest) = idx(t)?;
            format!("down.{i}.block.{j}.{}", block(rest)?)
        } else {
            let rest = t.strip_prefix("downsamplers.0.conv.")?;
            format!("down.{i}.downsample.conv.{rest}")
        }
    } else if let Some(t) = s.strip_prefix("up_blocks.") {
        let (i, t) = idx(t)?;
        let li = levels.checked_sub(i + 1)?;
        if let Some(t) = t.strip_prefix("resnets.") {
            let (j, rest) = idx(t)?;
            format!("up.{li}.block.{j}.{}", block(rest)?)
        } else {
            let rest = t.strip_prefix("upsamplers.0.conv.")?;
            format!("up.{li}.upsample.conv.{rest}")
        }
    } else {
        return None;
    };
    Some(format!("{side}.{body}"))
}

/// Map a transformers CLIP text model onto OpenCLIP names under `prefix`.
fn open_clip_names(b: &mut Builder, c: &Component, prefix: &str) -> Result<()> {
    let t = hf_root(c);
    b.plain(
        format!("{prefix}token_embedding.weight"),
        c,
        &format!("{t}embeddings.token_embedding.weight"),
    );
    b.plain(
        format!("{prefix}positional_embedding"),
        c,
        &format!("{t}embeddings.position_embedding.weight"),
    );
    for p in ["weight", "bias"] {
        b.plain(
            format!("{prefix}ln_final.{p}"),
            c,
            &format!("{t}final_layer_norm.{p}"),
        );
    }
    let mut i = 0;
    loop {
        let hf = format!("{t}encoder.layers.{i}.");
        if !c.names.contains_key(&format!("{hf}mlp.fc1.weight")) {
            break;
        }
        let oc = format!("{prefix}transformer.resblocks.{i}.");
        for (from, to) in [
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("self_attn.out_proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ] {
            for p in ["weight", "bias"] {
                b.plain(format!("{oc}{to}.{p}"), c, &format!("{hf}{from}.{p}"));
            }
        }
        for (p, fused) in [("weight", "in_proj_weight"), ("bias", "in_proj_bias")] {
            let parts: Vec<String> = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|q| format!("{hf}self_attn.{q}.{p}"))
                .collect();
            let mut shape: Option<Vec<usize>> = None;
            let mut file = None;
            for part in &parts {
                let (fi, s) = c
                    .names
                    .get(part)
                    .ok_or_else(|| unknown(format!("text encoder: missing {part}")))?;
                if file.is_some_and(|f| f != *fi) {
                    return Err(unknown(format!(
                        "text encoder: q/k/v of layer {i} are in different shards"
                    )));
                }
                file = Some(*fi);
                shape = match shape {
                    None => Some(s.clone()),
                    Some(mut acc) if acc.len() == s.len() && acc[1..] == s[1..] => {
                        acc[0] += s[0];
                        Some(acc)
                    }
                    Some(_) => {
                        return Err(unknown(format!(
                            "text encoder: q/k/v of layer {i} disagree in shape"
                        )))
                    }
                };
            }
            if let (Some(fi), Some(shape)) = (file, shape) {
                let ldm = format!("{oc}attn.{fused}");
                b.shapes.insert(ldm.clone(), shape);
                b.map.insert(ldm, Src::Cat(fi, parts));
            }
        }
        i += 1;
    }
    // transformers stores the projection as a Linear weight [out, in]; OpenCLIP multiplies
    // x @ P with P [in, out].
    if let Some((fi, s)) = c.names.get("text_projection.weight") {
        if let [o, inp] = s.as_slice() {
            let ldm = format!("{prefix}text_projection");
            b.shapes.insert(ldm.clone(), vec![*inp, *o]);
            b.map.insert(
                ldm,
                Src::Transpose(*fi, "text_projection.weight".to_string()),
            );
        }
    }
    Ok(())
}

/// Where a transformers CLIP text model's modules start: `text_model.` in most saved files,
/// nothing in `CLIPTextModel` files written by transformers 5.
fn hf_root(c: &Component) -> &'static str {
    if c.names
        .contains_key("text_model.embeddings.token_embedding.weight")
    {
        "text_model."
    } else {
        ""
    }
}

/// transformers CLIP-L keeps its names; only the prefix changes.
fn openai_clip_names(b: &mut Builder, c: &Component, prefix: &str) {
    let root = hf_root(c);
    let names: Vec<String> = c.names.keys().cloned().collect();
    for name in names {
        if let Some(rest) = name.strip_prefix(root) {
            let known = ["embeddings.", "encoder.", "final_layer_norm."];
            if rest.ends_with("position_ids") || !known.iter().any(|k| rest.starts_with(k)) {
                continue;
            }
            b.plain(format!("{prefix}{rest}"), c, &name);
        }
    }
}

fn family_of(root: &Path, unet: &Component, has_te2: bool) -> Result<Family> {
    if has_te2 || unet.names.contains_key("add_embedding.linear_1.weight") {
        return Ok(Family::Sdxl);
    }
    // OpenCLIP-H (SD 2.x) uses gelu, OpenAI CLIP-L quick_gelu; tiny models share widths.
    if let Some(cfg) = read_json(&root.join("text_encoder").join("config.json"))? {
        match cfg.get("hidden_act").and_then(|v| v.as_str()) {
            Some("gelu") => return Ok(Family::Sd2),
            Some("quick_gelu") => return Ok(Family::Sd1),
            _ => {}
        }
    }
    if let Some(cfg) = read_json(&root.join("unet").join("config.json"))? {
        match cfg.get("cross_attention_dim").and_then(|v| v.as_u64()) {
            Some(1024) => return Ok(Family::Sd2),
            Some(768) => return Ok(Family::Sd1),
            Some(2048) => return Ok(Family::Sdxl),
            _ => {}
        }
    }
    Ok(Family::Sd1)
}

/// Give every tensor of the components its LDM name; returns the UNet/VAE tensors that have
/// none.
fn map_components(
    b: &mut Builder,
    family: Family,
    unet: &Component,
    vae: &Component,
    te: &Component,
    te2: Option<&Component>,
) -> Result<Vec<String>> {
    // UNet: res blocks per level and which up levels have attention, from the names.
    let count = |prefix: &str| -> usize {
        let mut n = 0;
        while unet
            .names
            .keys()
            .any(|k| k.starts_with(&format!("{prefix}{n}.")))
        {
            n += 1;
        }
        n
    };
    let r = count("down_blocks.0.resnets.");
    if r == 0 {
        return Err(unknown("unet: no down_blocks.0.resnets"));
    }
    let mid_attn = unet
        .names
        .keys()
        .any(|k| k.starts_with("mid_block.attentions."));
    let up_attn = |i: usize| {
        if i == usize::MAX {
            mid_attn
        } else {
            unet.names
                .keys()
                .any(|k| k.starts_with(&format!("up_blocks.{i}.attentions.")))
        }
    };
    let mut unmapped = Vec::new();
    for name in unet.names.keys() {
        match unet_name(name, r, &up_attn) {
            Some(l) => b.plain(format!("{UNET_PREFIX}{l}"), unet, name),
            None => unmapped.push(name.clone()),
        }
    }
    let vae_levels = {
        let mut n = 0;
        while vae
            .names
            .keys()
            .any(|k| k.starts_with(&format!("decoder.up_blocks.{n}.")))
        {
            n += 1;
        }
        n
    };
    for name in vae.names.keys() {
        match vae_name(name, vae_levels) {
            Some(l) => b.plain(format!("{VAE_PREFIX}{l}"), vae, name),
            None => unmapped.push(format!("vae/{name}")),
        }
    }
    match family {
        Family::Sd1 => openai_clip_names(b, te, SD1_CLIP_PREFIX),
        Family::Sd2 => open_clip_names(b, te, SD2_CLIP_PREFIX)?,
        Family::Sdxl => {
            openai_clip_names(b, te, SDXL_CLIP_L_PREFIX);
            let te2 = te2.ok_or_else(|| unknown("SDXL folder without text_encoder_2/"))?;
            open_clip_names(b, te2, SDXL_CLIP_G_PREFIX)?;
        }
    }
    Ok(unmapped)
}

/// A header holding only names and shapes (for the shape-based detection).
fn shapes_header(shapes: &BTreeMap<String, Vec<usize>>) -> Header {
    Header {
        tensors: shapes
            .iter()
            .map(|(k, s)| {
                let info = TensorInfo {
                    dtype: Dtype::F32,
                    shape: s.clone(),
                    data_offsets: (0, 0),
                };
                (k.clone(), info)
            })
            .collect(),
        metadata: BTreeMap::new(),
        data_start: 0,
    }
}

/// Open a diffusers pipeline folder.
pub fn open(root: &Path) -> Result<Folder> {
    if !root.join("model_index.json").is_file() && !root.join("unet").is_dir() {
        return Err(unknown(format!(
            "{}: not a diffusers pipeline folder (no model_index.json / unet/)",
            root.display()
        )));
    }
    let mut b = Builder {
        files: Vec::new(),
        map: HashMap::new(),
        shapes: BTreeMap::new(),
    };
    let need = |name: &str, base: &str| -> Result<Vec<PathBuf>> {
        component_files(&root.join(name), base)?
            .ok_or_else(|| unknown(format!("{}: no {name}/ folder", root.display())))
    };
    let unet = b.component(&need("unet", "diffusion_pytorch_model")?)?;
    let vae = b.component(&need("vae", "diffusion_pytorch_model")?)?;
    let te = b.component(&need("text_encoder", "model")?)?;
    let te2 = match component_files(&root.join("text_encoder_2"), "model")? {
        Some(p) => Some(b.component(&p)?),
        None => None,
    };
    let family = family_of(root, &unet, te2.is_some())?;

    let mut unmapped = map_components(&mut b, family, &unet, &vae, &te, te2.as_ref())?;
    if !unmapped.is_empty() {
        unmapped.truncate(5);
        return Err(unknown(format!(
            "{}: tensors with no single-file equivalent, e.g. {}",
            root.display(),
            unmapped.join(", ")
        )));
    }

    let header = shapes_header(&b.shapes);
    let v_prediction =
        read_json(&root.join("scheduler").join("scheduler_config.json"))?.and_then(|c| {
            c.get("prediction_type")
                .and_then(|p| p.as_str())
                .map(|p| p == "v_prediction")
        });
    Ok(Folder {
        files: b.files,
        map: b.map,
        header,
        family,
        v_prediction,
    })
}

/// A standalone diffusers-layout VAE file (`AutoencoderKL` names) seen through the single-file
/// names under `first_stage_model.`.
pub fn open_vae_file(path: &Path) -> Result<Folder> {
    let mut b = Builder {
        files: Vec::new(),
        map: HashMap::new(),
        shapes: BTreeMap::new(),
    };
    let vae = b.component(&[path.to_path_buf()])?;
    let levels = (0..)
        .take_while(|n| {
            vae.names
                .keys()
                .any(|k| k.starts_with(&format!("decoder.up_blocks.{n}.")))
        })
        .count();
    let mut unmapped = Vec::new();
    for name in vae.names.keys() {
        match vae_name(name, levels) {
            Some(l) => b.plain(format!("{VAE_PREFIX}{l}"), &vae, name),
            None => unmapped.push(name.clone()),
        }
    }
    if !unmapped.is_empty() {
        unmapped.truncate(5);
        return Err(unknown(format!(
            "{}: VAE tensors with no single-file equivalent, e.g. {}",
            path.display(),
            unmapped.join(", ")
        )));
    }
    let header = shapes_header(&b.shapes);
    Ok(Folder {
        files: b.files,
        map: b.map,
        header,
        // Not a checkpoint: only the VAE names are served.
        family: Family::Sd1,
        v_prediction: None,
    })
}

/// The facts of a diffusers folder without reading any weights (headers and JSON only).
pub fn folder_info(root: &Path) -> Result<CheckpointInfo> {
    open(root)?.info()
}

/// `true` if `path` looks like a diffusers pipeline folder (cheap: no files opened).
pub fn is_pipeline_folder(path: &Path) -> bool {
    path.is_dir() && path.join("model_index.json").is_file() && path.join("unet").is_dir()
}

impl Folder {
    /// Family, inpainting (9-channel UNet) and v-prediction (from the scheduler config).
    pub fn info(&self) -> Result<CheckpointInfo> {
        let mut info = crate::detect::checkpoint_info(&self.header)
            .ok_or_else(|| unknown("the folder has no usable UNet"))?;
        if info.family != self.family {
            return Err(unknown(format!(
                "text encoders say {}, UNet says {}",
                self.family.as_str(),
                info.family.as_str()
            )));
        }
        if let Some(v) = self.v_prediction {
            info.v_prediction = v;
        }
        Ok(info)
    }

    /// The LDM-named view's header (shapes only).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Cross-check the UNet names against the LDM → diffusers mapping used for LoRA (which
    /// is checked against diffusers' converter): both directions must agree on every tensor.
    pub fn check_unet_names(&self, cfg: &UNetConfig) -> Result<()> {
        check_unet_map(&self.map, cfg)
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let src = self
            .map
            .get(name)
            .ok_or_else(|| unknown(format!("missing tensor {name}")))?;
        let file = |i: usize| {
            self.files
                .get(i)
                .ok_or_else(|| unknown(format!("tensor {name}: bad file index")))
        };
        Ok(match src {
            Src::Plain(i, n) => file(*i)?.tensor_f32(n)?,
            Src::Transpose(i, n) => file(*i)?.tensor_f32(n)?.t()?.contiguous()?,
            Src::Cat(i, parts) => {
                let f = file(*i)?;
                let ts = parts
                    .iter()
                    .map(|p| f.tensor_f32(p))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&ts, 0)?
            }
        })
    }

    /// A `VarBuilder` serving the LDM names as f32 CPU tensors.
    pub fn var_builder(&self) -> VarBuilder<'_> {
        VarBuilder::from_backend(
            Box::new(FolderBackend { folder: self }),
            DType::F32,
            Device::Cpu,
        )
    }
}

/// See [`Folder::check_unet_names`].
fn check_unet_map(map: &HashMap<String, Src>, cfg: &UNetConfig) -> Result<()> {
    for (ldm, src) in map {
        let Some(rel) = ldm.strip_prefix(UNET_PREFIX) else {
            continue;
        };
        let Src::Plain(_, diff) = src else { continue };
        let (lm, suffix) = rel.rsplit_once('.').unwrap_or((rel, ""));
        let want = ldm_to_diffusers_unet(lm, cfg).map(|d| format!("{d}.{suffix}"));
        if want.as_deref() != Some(diff.as_str()) {
            return Err(unknown(format!(
                "unet/{diff}: maps to {ldm}, which the LDM layout names {want:?}"
            )));
        }
    }
    Ok(())
}

struct FolderBackend<'a> {
    folder: &'a Folder,
}

impl SimpleBackend for FolderBackend<'_> {
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
                "tensor {name}: folder has shape {:?}, model expects {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .folder
            .tensor(name)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.folder.map.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vae_names() {
        let m = |s: &str| vae_name(s, 4);
        assert_eq!(
            m("decoder.up_blocks.0.resnets.1.conv_shortcut.weight").as_deref(),
            Some("decoder.up.3.block.1.nin_shortcut.weight")
        );
        assert_eq!(
            m("decoder.up_blocks.3.upsamplers.0.conv.bias").as_deref(),
            Some("decoder.up.0.upsample.conv.bias")
        );
        assert_eq!(
            m("encoder.down_blocks.2.downsamplers.0.conv.weight").as_deref(),
            Some("encoder.down.2.downsample.conv.weight")
        );
        assert_eq!(
            m("encoder.mid_block.attentions.0.to_out.0.weight").as_deref(),
            Some("encoder.mid.attn_1.proj_out.weight")
        );
        assert_eq!(
            m("decoder.mid_block.attentions.0.group_norm.bias").as_deref(),
            Some("decoder.mid.attn_1.norm.bias")
        );
        assert_eq!(
            m("decoder.mid_block.attentions.0.key.weight").as_deref(),
            Some("decoder.mid.attn_1.k.weight")
        );
        assert_eq!(
            m("decoder.mid_block.resnets.1.norm2.weight").as_deref(),
            Some("decoder.mid.block_2.norm2.weight")
        );
        assert_eq!(
            m("encoder.conv_norm_out.weight").as_deref(),
            Some("encoder.norm_out.weight")
        );
        assert_eq!(m("quant_conv.weight").as_deref(), Some("quant_conv.weight"));
        assert_eq!(m("decoder.up_blocks.4.resnets.0.conv1.weight"), None);
        assert_eq!(m("encoder.whatever.weight"), None);
    }

    #[test]
    fn unet_names() {
        let with = |_: usize| true;
        let without = |_: usize| false;
        let m = |s: &str, a: &dyn Fn(usize) -> bool| unet_name(s, 2, a);
        assert_eq!(
            m("up_blocks.1.upsamplers.0.conv.weight", &with).as_deref(),
            Some("output_blocks.5.2.conv.weight")
        );
        assert_eq!(
            m("up_blocks.0.upsamplers.0.conv.weight", &without).as_deref(),
            Some("output_blocks.2.1.conv.weight")
        );
        assert_eq!(
            m("down_blocks.0.downsamplers.0.conv.bias", &with).as_deref(),
            Some("input_blocks.3.0.op.bias")
        );
        assert_eq!(
            m("down_blocks.1.attentions.1.proj_in.weight", &with).as_deref(),
            Some("input_blocks.5.1.proj_in.weight")
        );
        assert_eq!(
            m("mid_block.resnets.1.conv1.weight", &with).as_deref(),
            Some("middle_block.2.in_layers.2.weight")
        );
        assert_eq!(
            m("mid_block.resnets.1.conv1.weight", &without).as_deref(),
            Some("middle_block.1.in_layers.2.weight")
        );
        assert_eq!(
            m("up_blocks.2.resnets.0.conv_shortcut.weight", &with).as_deref(),
            Some("output_blocks.6.0.skip_connection.weight")
        );
        assert_eq!(
            m("add_embedding.linear_2.bias", &with).as_deref(),
            Some("label_emb.0.2.bias")
        );
        assert_eq!(m("down_blocks.0.resnets.0.bogus.weight", &with), None);
    }

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers_folder/sd1")
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read") {
            let e = e.expect("entry");
            if e.path().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
            }
        }
    }

    /// Split `unet/diffusion_pytorch_model.safetensors` into two shards plus an index.
    fn shard_unet(root: &Path, dup: bool, shard_name: &str) {
        let dir = root.join("unet");
        let single = dir.join("diffusion_pytorch_model.safetensors");
        let f = safetensors_file::open(&single).expect("open");
        let names: Vec<String> = f.header().tensors.keys().cloned().collect();
        let half = names.len() / 2;
        let mut weight_map = serde_json::Map::new();
        for (k, part) in [(0usize, &names[..half]), (1, &names[half..])] {
            let mut part: Vec<String> = part.to_vec();
            if dup && k == 1 {
                part.push(names[0].clone());
            }
            let tensors: Vec<_> = part
                .iter()
                .map(|n| {
                    let (info, bytes) = f.raw(n).expect("raw");
                    (n.clone(), info.dtype, info.shape.clone(), bytes.to_vec())
                })
                .collect();
            let file = if k == 0 {
                shard_name.to_string()
            } else {
                "diffusion_pytorch_model-00002-of-00002.safetensors".to_string()
            };
            let bytes = safetensors_file::serialize(&tensors, &Default::default()).expect("ser");
            if !file.contains('/') {
                std::fs::write(dir.join(&file), bytes).expect("write");
            }
            for n in part {
                weight_map.insert(n, serde_json::Value::String(file.clone()));
            }
        }
        drop(f);
        std::fs::remove_file(&single).expect("rm");
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(
            dir.join("diffusion_pytorch_model.safetensors.index.json"),
            index.to_string(),
        )
        .expect("index");
    }

    #[test]
    fn sharded_unet_loads_the_same_tensors() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("pipe");
        copy_dir(&fixture(), &root);
        shard_unet(
            &root,
            false,
            "diffusion_pytorch_model-00001-of-00002.safetensors",
        );
        let a = open(&fixture()).expect("single");
        let b = open(&root).expect("sharded");
        assert_eq!(b.files.len(), a.files.len() + 1);
        assert_eq!(a.header().tensors, b.header().tensors);
        let name = format!("{UNET_PREFIX}input_blocks.1.1.proj_in.weight");
        let (ta, tb) = (a.tensor(&name).expect("a"), b.tensor(&name).expect("b"));
        let diff = (ta - tb)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(diff, 0.0);
        assert_eq!(b.info().expect("info").family, Family::Sd1);

        // A tensor in two shards, or a shard outside the folder, is refused.
        for (dup, shard) in [
            (true, "diffusion_pytorch_model-00001-of-00002.safetensors"),
            (false, "../escape.safetensors"),
        ] {
            let root = dir.path().join(format!("bad{dup}"));
            copy_dir(&fixture(), &root);
            shard_unet(&root, dup, shard);
            let e = open(&root).expect_err("bad shards");
            assert!(matches!(e, EngineError::UnknownModel(_)), "{e}");
        }
    }

    #[test]
    fn fixture_maps_every_tensor_and_agrees_with_lora_names() {
        let f = open(&fixture()).expect("open");
        assert!(is_pipeline_folder(&fixture()));
        let info = folder_info(&fixture()).expect("info");
        assert_eq!(info.family, Family::Sd1);
        assert!(!info.inpaint && !info.v_prediction);
        let cfg = UNetConfig::detect(f.header(), UNET_PREFIX, Family::Sd1).expect("cfg");
        f.check_unet_names(&cfg).expect("names agree");
        // Every UNet and VAE tensor of the folder has an LDM name (open() refuses otherwise);
        // the text encoder keeps all but `position_ids`.
        let unet_vae: usize = f.files[..2].iter().map(|x| x.header().tensors.len()).sum();
        let mapped = f
            .map
            .keys()
            .filter(|k| k.starts_with(UNET_PREFIX) || k.starts_with(VAE_PREFIX))
            .count();
        assert_eq!(mapped, unet_vae);
    }

    /// Full-size diffusers names (from diffusers/transformers models built on the meta device
    /// with the real configs) map onto the LDM layout of the reference models.
    #[test]
    fn full_size_diffusers_names_give_reference_configs() {
        use crate::models::clip::ClipConfig;
        use crate::models::vae::VaeConfig;
        let text = std::fs::read_to_string(fixture().with_file_name("full_names.json"))
            .expect("full_names.json");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        let comp = |fam: &str, c: &str| -> Option<Component> {
            let obj = json["families"][fam].get(c)?.as_object()?;
            let names = obj
                .iter()
                .map(|(k, v)| {
                    let shape = v
                        .as_array()
                        .expect("shape")
                        .iter()
                        .map(|d| d.as_u64().expect("dim") as usize)
                        .collect();
                    (k.clone(), (0, shape))
                })
                .collect();
            Some(Component { names })
        };
        for (fam, family, unet_ref, clips) in [
            (
                "sd1",
                Family::Sd1,
                UNetConfig::sd15(),
                vec![ClipConfig::clip_l()],
            ),
            ("sd2", Family::Sd2, UNetConfig::sd2(), vec![]),
            (
                "sdxl",
                Family::Sdxl,
                UNetConfig::sdxl(),
                vec![ClipConfig::clip_l(), ClipConfig::open_clip_big_g()],
            ),
        ] {
            let mut b = Builder {
                files: Vec::new(),
                map: HashMap::new(),
                shapes: BTreeMap::new(),
            };
            let (unet, vae) = (
                comp(fam, "unet").expect("unet"),
                comp(fam, "vae").expect("vae"),
            );
            let te = comp(fam, "text_encoder").expect("te");
            let te2 = comp(fam, "text_encoder_2");
            let unmapped =
                map_components(&mut b, family, &unet, &vae, &te, te2.as_ref()).expect("map");
            assert!(unmapped.is_empty(), "{fam}: {unmapped:?}");
            let h = shapes_header(&b.shapes);
            let info = crate::detect::checkpoint_info(&h).expect("info");
            assert_eq!(info.family, family);
            assert!(!info.inpaint);
            let cfg = UNetConfig::detect(&h, UNET_PREFIX, family).expect("unet cfg");
            // Head counts are not in the weights' shapes; compare everything else.
            let mut want = unet_ref.clone();
            want.heads = cfg.heads;
            assert_eq!(cfg, want, "{fam}");
            check_unet_map(&b.map, &cfg).expect("names agree");
            let unet_mapped = b.map.keys().filter(|k| k.starts_with(UNET_PREFIX)).count();
            assert_eq!(unet_mapped, unet.names.len(), "{fam}");
            let vae_cfg = VaeConfig::detect(&h, VAE_PREFIX).expect("vae cfg");
            assert_eq!(vae_cfg.ch_mult, vec![1, 2, 4, 4]);
            let prefixes: &[&str] = match family {
                Family::Sd1 => &[SD1_CLIP_PREFIX],
                Family::Sd2 => &[SD2_CLIP_PREFIX],
                Family::Sdxl => &[SDXL_CLIP_L_PREFIX, SDXL_CLIP_G_PREFIX],
            };
            for (i, p) in prefixes.iter().enumerate() {
                let c = ClipConfig::detect(&h, p).expect("clip cfg");
                if let Some(want) = clips.get(i) {
                    assert_eq!(&c, want, "{fam} {p}");
                } else {
                    // SD 2.x: diffusers keeps 23 of OpenCLIP-H's 24 blocks.
                    assert_eq!((c.hidden, c.layers, c.intermediate), (1024, 23, 4096));
                }
            }
        }
    }
}
