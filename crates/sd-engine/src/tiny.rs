//! Tiny random-weight checkpoints with the real single-file (LDM/SGM) key layout of each family
//! but small widths, so every engine test runs the same loading and sampling code as a real
//! checkpoint, in milliseconds. Diffusers' own single-file loader accepts them (see
//! `tools/fixtures/make_ckpt_fixtures.py`), which is what keeps the key names honest.
//!
//! Widths are chosen so the family conventions the loaders rely on still hold: SD 1.x UNets use
//! 8 heads, SD 2.x/SDXL UNets and all CLIP encoders 64-wide heads, GroupNorm 32 groups.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::api::Family;
use crate::detect::{
    SD1_CLIP_PREFIX, SD2_CLIP_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX, UNET_PREFIX,
    VAE_PREFIX,
};
use crate::models::unet::{HeadSpec, UNetConfig, SDXL_TIME_ID_DIM};
use crate::safetensors_file::{serialize, Dtype};
use crate::Result;

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Random, mean 0, standard deviation 0.02.
    Normal,
    One,
    Zero,
    Const(f32),
    /// 0, 1, 2, ... stored as I64 (CLIP `position_ids`).
    Arange,
}

/// One tensor of a model layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

#[derive(Default)]
struct Spec {
    params: Vec<Param>,
}

impl Spec {
    fn push(&mut self, name: String, shape: Vec<usize>, init: Init) {
        self.params.push(Param { name, shape, init });
    }
    fn norm(&mut self, p: &str, ch: usize) {
        self.push(format!("{p}.weight"), vec![ch], Init::One);
        self.push(format!("{p}.bias"), vec![ch], Init::Zero);
    }
    fn conv(&mut self, p: &str, cin: usize, cout: usize, k: usize) {
        self.push(format!("{p}.weight"), vec![cout, cin, k, k], Init::Normal);
        self.push(format!("{p}.bias"), vec![cout], Init::Normal);
    }
    fn linear(&mut self, p: &str, cin: usize, cout: usize) {
        self.push(format!("{p}.weight"), vec![cout, cin], Init::Normal);
        self.push(format!("{p}.bias"), vec![cout], Init::Normal);
    }
}

/// The LDM autoencoder layout (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyVae {
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub z_channels: usize,
}

impl TinyVae {
    pub fn tiny() -> Self {
        TinyVae {
            ch: 32,
            ch_mult: vec![1, 2, 2, 2],
            num_res_blocks: 1,
            z_channels: 4,
        }
    }

    /// Names relative to `first_stage_model.`.
    pub fn params(&self) -> Vec<Param> {
        let mut s = Spec::default();
        let res = |s: &mut Spec, p: &str, cin: usize, cout: usize| {
            s.norm(&format!("{p}.norm1"), cin);
            s.conv(&format!("{p}.conv1"), cin, cout, 3);
            s.norm(&format!("{p}.norm2"), cout);
            s.conv(&format!("{p}.conv2"), cout, cout, 3);
            if cin != cout {
                s.conv(&format!("{p}.nin_shortcut"), cin, cout, 1);
            }
        };
        let mid = |s: &mut Spec, p: &str, ch: usize| {
            res(s, &format!("{p}.mid.block_1"), ch, ch);
            s.norm(&format!("{p}.mid.attn_1.norm"), ch);
            for n in ["q", "k", "v", "proj_out"] {
                s.conv(&format!("{p}.mid.attn_1.{n}"), ch, ch, 1);
            }
            res(s, &format!("{p}.mid.block_2"), ch, ch);
        };
        let levels = self.ch_mult.len();
        let z = self.z_channels;
        // Encoder.
        s.conv("encoder.conv_in", 3, self.ch, 3);
        let mut cin = self.ch;
        for (i, &m) in self.ch_mult.iter().enumerate() {
            let cout = self.ch * m;
            for j in 0..self.num_res_blocks {
                res(&mut s, &format!("encoder.down.{i}.block.{j}"), cin, cout);
                cin = cout;
            }
            if i + 1 < levels {
                s.conv(&format!("encoder.down.{i}.downsample.conv"), cin, cin, 3);
            }
        }
        mid(&mut s, "encoder", cin);
        s.norm("encoder.norm_out", cin);
        s.conv("encoder.conv_out", cin, 2 * z, 3);
        // Decoder.
        let mut cin = self.ch * self.ch_mult[levels - 1];
        s.conv("decoder.conv_in", z, cin, 3);
        mid(&mut s, "decoder", cin);
        for i in (0..levels).rev() {
            let cout = self.ch * self.ch_mult[i];
            for j in 0..=self.num_res_blocks {
                res(&mut s, &format!("decoder.up.{i}.block.{j}"), cin, cout);
                cin = cout;
            }
            if i > 0 {
                s.conv(&format!("decoder.up.{i}.upsample.conv"), cin, cin, 3);
            }
        }
        s.norm("decoder.norm_out", cin);
        s.conv("decoder.conv_out", cin, 3, 3);
        s.conv("quant_conv", 2 * z, 2 * z, 1);
        s.conv("post_quant_conv", z, z, 1);
        s.params
    }
}

/// Which CLIP implementation's key layout a text encoder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipLayout {
    /// transformers' `CLIPTextModel` (`text_model.encoder.layers.N.self_attn.q_proj`).
    OpenAi,
    /// open_clip (`transformer.resblocks.N.attn.in_proj_weight`) with `text_projection`.
    OpenClip,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyClip {
    pub layout: ClipLayout,
    pub vocab: usize,
    pub max_len: usize,
    pub hidden: usize,
    pub layers: usize,
    pub intermediate: usize,
    /// `text_projection` output width (OpenCLIP only).
    pub projection: usize,
}

impl TinyClip {
    /// Full vocabulary (the real tokenizer is used), `hidden/64` heads, 4× MLP.
    pub fn tiny(layout: ClipLayout, hidden: usize, layers: usize) -> Self {
        TinyClip {
            layout,
            vocab: 49408,
            max_len: 77,
            hidden,
            layers,
            intermediate: 4 * hidden,
            projection: 64,
        }
    }

    /// Names relative to the encoder prefix (e.g. `cond_stage_model.transformer.text_model.`).
    pub fn params(&self) -> Vec<Param> {
        let mut s = Spec::default();
        let (d, i) = (self.hidden, self.intermediate);
        match self.layout {
            ClipLayout::OpenAi => {
                s.push(
                    "embeddings.token_embedding.weight".into(),
                    vec![self.vocab, d],
                    Init::Normal,
                );
                s.push(
                    "embeddings.position_embedding.weight".into(),
                    vec![self.max_len, d],
                    Init::Normal,
                );
                s.push(
                    "embeddings.position_ids".into(),
                    vec![1, self.max_len],
                    Init::Arange,
                );
                for l in 0..self.layers {
                    let p = format!("encoder.layers.{l}");
                    for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                        s.linear(&format!("{p}.self_attn.{n}"), d, d);
                    }
                    s.norm(&format!("{p}.layer_norm1"), d);
                    s.linear(&format!("{p}.mlp.fc1"), d, i);
                    s.linear(&format!("{p}.mlp.fc2"), i, d);
                    s.norm(&format!("{p}.layer_norm2"), d);
                }
                s.norm("final_layer_norm", d);
            }
            ClipLayout::OpenClip => {
                s.push(
                    "token_embedding.weight".into(),
                    vec![self.vocab, d],
                    Init::Normal,
                );
                s.push(
                    "positional_embedding".into(),
                    vec![self.max_len, d],
                    Init::Normal,
                );
                for l in 0..self.layers {
                    let p = format!("transformer.resblocks.{l}");
                    s.norm(&format!("{p}.ln_1"), d);
                    s.push(
                        format!("{p}.attn.in_proj_weight"),
                        vec![3 * d, d],
                        Init::Normal,
                    );
                    s.push(format!("{p}.attn.in_proj_bias"), vec![3 * d], Init::Normal);
                    s.linear(&format!("{p}.attn.out_proj"), d, d);
                    s.norm(&format!("{p}.ln_2"), d);
                    s.linear(&format!("{p}.mlp.c_fc"), d, i);
                    s.linear(&format!("{p}.mlp.c_proj"), i, d);
                }
                s.norm("ln_final", d);
                s.push(
                    "text_projection".into(),
                    vec![d, self.projection],
                    Init::Normal,
                );
                s.push("logit_scale".into(), vec![], Init::Const(2.659_26));
            }
        }
        s.params
    }
}

/// The complete tiny architecture of one family.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub family: Family,
    pub unet: UNetConfig,
    pub vae: TinyVae,
    /// (key prefix, encoder) in conditioning order.
    pub clips: Vec<(&'static str, TinyClip)>,
}

impl TinySpec {
    pub fn new(family: Family, inpaint: bool) -> Self {
        let in_channels = if inpaint { 9 } else { 4 };
        match family {
            Family::Sd1 => {
                let clip = TinyClip::tiny(ClipLayout::OpenAi, 64, 2);
                TinySpec {
                    family,
                    unet: UNetConfig {
                        in_channels,
                        out_channels: 4,
                        model_channels: 32,
                        channel_mult: vec![1, 2, 2],
                        num_res_blocks: 1,
                        transformer_depth: vec![1, 1, 0],
                        transformer_depth_middle: 1,
                        heads: HeadSpec::Count(8),
                        context_dim: clip.hidden,
                        use_linear_in_transformer: false,
                        adm_in_channels: None,
                    },
                    vae: TinyVae::tiny(),
                    clips: vec![(SD1_CLIP_PREFIX, clip)],
                }
            }
            Family::Sd2 => {
                // Three layers: SD 2.x reads the penultimate one, clip_skip 2 the one before.
                let clip = TinyClip::tiny(ClipLayout::OpenClip, 64, 3);
                TinySpec {
                    family,
                    unet: UNetConfig {
                        in_channels,
                        out_channels: 4,
                        model_channels: 64,
                        channel_mult: vec![1, 2],
                        num_res_blocks: 1,
                        transformer_depth: vec![1, 1],
                        transformer_depth_middle: 1,
                        heads: HeadSpec::Dim(64),
                        context_dim: clip.hidden,
                        use_linear_in_transformer: true,
                        adm_in_channels: None,
                    },
                    vae: TinyVae::tiny(),
                    clips: vec![(SD2_CLIP_PREFIX, clip)],
                }
            }
            Family::Sdxl => {
                // The two encoders must differ in width: diffusers tells them apart that way.
                // CLIP-G: 2 heads and a non-square text_projection (128 -> 64).
                // Three CLIP-L layers so clip_skip 2 (third from last) is still a real layer.
                let l = TinyClip::tiny(ClipLayout::OpenAi, 64, 3);
                let g = TinyClip::tiny(ClipLayout::OpenClip, 128, 3);
                TinySpec {
                    family,
                    unet: UNetConfig {
                        in_channels,
                        out_channels: 4,
                        model_channels: 64,
                        channel_mult: vec![1, 2],
                        num_res_blocks: 1,
                        transformer_depth: vec![0, 2],
                        transformer_depth_middle: 2,
                        heads: HeadSpec::Dim(64),
                        context_dim: l.hidden + g.hidden,
                        use_linear_in_transformer: true,
                        adm_in_channels: Some(g.projection + 6 * SDXL_TIME_ID_DIM),
                    },
                    vae: TinyVae::tiny(),
                    clips: vec![(SDXL_CLIP_L_PREFIX, l), (SDXL_CLIP_G_PREFIX, g)],
                }
            }
        }
    }

    /// Every tensor of the single-file checkpoint with its full key.
    pub fn params(&self) -> Vec<Param> {
        let mut out = Vec::new();
        for (name, shape) in self.unet.param_shapes() {
            // candle's norms ask for weight/bias by these names; everything else is random.
            let init = if is_unet_norm(&name) {
                if name.ends_with(".weight") {
                    Init::One
                } else {
                    Init::Zero
                }
            } else {
                Init::Normal
            };
            out.push(Param {
                name: format!("{UNET_PREFIX}{name}"),
                shape,
                init,
            });
        }
        for p in self.vae.params() {
            out.push(Param {
                name: format!("{VAE_PREFIX}{}", p.name),
                ..p
            });
        }
        for (prefix, clip) in &self.clips {
            for p in clip.params() {
                out.push(Param {
                    name: format!("{prefix}{}", p.name),
                    ..p
                });
            }
        }
        out
    }
}

fn is_unet_norm(name: &str) -> bool {
    let stem = name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name);
    stem.ends_with("in_layers.0")
        || stem.ends_with("out_layers.0")
        || stem.ends_with(".norm")
        || stem.ends_with("norm1")
        || stem.ends_with("norm2")
        || stem.ends_with("norm3")
        || stem == "out.0"
}

/// splitmix64: tiny, deterministic, good enough for test weights.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Standard deviation of the random weights: small, so activations stay tame through the
/// residual stacks.
const WEIGHT_STD: f32 = 0.02;

/// `n` values uniform on ±√3·σ (mean 0, std σ); uniform rather than normal because it is
/// cheap, and these are test weights, not a trained model.
fn random_values(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    let a = WEIGHT_STD * 3f32.sqrt();
    let scale = 2.0 * a / (1u32 << 24) as f32;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let r = rng.next_u64();
        out.push((r >> 40) as f32 * scale - a);
        if out.len() < n {
            out.push(((r >> 8) & 0xFF_FFFF) as f32 * scale - a);
        }
    }
    out
}

/// FNV-1a, so each tensor's values depend only on (seed, name), not on layout order.
fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        Dtype::F16 => {
            for v in values {
                out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        Dtype::Bf16 => {
            for v in values {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
        _ => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

/// Write a tiny checkpoint of `family` with weights stored as f16.
pub fn write_tiny_checkpoint(family: Family, inpaint: bool, seed: u64, path: &Path) -> Result<()> {
    write_tiny_checkpoint_as(family, inpaint, seed, Dtype::F16, path)
}

/// Write a tiny checkpoint with float weights stored as `dtype` (F16, BF16 or F32).
pub fn write_tiny_checkpoint_as(
    family: Family,
    inpaint: bool,
    seed: u64,
    dtype: Dtype,
    path: &Path,
) -> Result<()> {
    let dtype = match dtype {
        Dtype::F16 | Dtype::Bf16 | Dtype::F32 => dtype,
        other => {
            return Err(crate::EngineError::InvalidParam(format!(
                "tiny checkpoints store F16, BF16 or F32, not {}",
                other.as_str()
            )))
        }
    };
    let spec = TinySpec::new(family, inpaint);
    write_checkpoint_from_spec(&spec, seed, dtype, path)
}

/// Write a standalone VAE file (bare LDM names, as Civitai VAEs ship) with the tiny widths of the
/// family's checkpoint, random weights from `seed`.
pub fn write_tiny_vae(family: Family, seed: u64, path: &Path) -> Result<()> {
    let prefix = crate::detect::VAE_PREFIX;
    let mut tensors = Vec::new();
    for p in TinySpec::new(family, false).params() {
        let Some(name) = p.name.strip_prefix(prefix) else {
            continue;
        };
        let n: usize = p.shape.iter().product();
        let values = match p.init {
            Init::One => vec![1.0; n],
            Init::Zero => vec![0.0; n],
            Init::Const(c) => vec![c; n],
            Init::Normal | Init::Arange => random_values(seed ^ name_hash(&p.name), n),
        };
        tensors.push((
            name.to_string(),
            Dtype::F16,
            p.shape,
            encode(&values, Dtype::F16),
        ));
    }
    let mut meta = BTreeMap::new();
    meta.insert(
        "sd_engine.tiny_vae".to_string(),
        family.as_str().to_string(),
    );
    write_atomic(path, &serialize(&tensors, &meta)?)
}

/// Write a random-weight single-file checkpoint of any widths (tiny ones for tests, the full SD
/// 1.5 / 2.x / SDXL ones to time loading a real-size file).
pub fn write_checkpoint_from_spec(
    spec: &TinySpec,
    seed: u64,
    dtype: Dtype,
    path: &Path,
) -> Result<()> {
    let family = spec.family;
    let mut tensors = Vec::new();
    for p in spec.params() {
        let n: usize = p.shape.iter().product();
        let (dt, bytes) = match p.init {
            Init::Arange => (
                Dtype::I64,
                (0..n as i64).flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Init::One => (dtype, encode(&vec![1.0; n], dtype)),
            Init::Zero => (dtype, encode(&vec![0.0; n], dtype)),
            Init::Const(c) => (dtype, encode(&vec![c; n], dtype)),
            Init::Normal => (
                dtype,
                encode(&random_values(seed ^ name_hash(&p.name), n), dtype),
            ),
        };
        tensors.push((p.name, dt, p.shape, bytes));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("sd_engine.tiny".to_string(), family.as_str().to_string());
    meta.insert("sd_engine.seed".to_string(), seed.to_string());
    // Random weights answer the SD 2.x v-prediction probe at random: say what they are.
    meta.insert(
        "sd_engine.prediction_type".to_string(),
        "epsilon".to_string(),
    );
    let bytes = serialize(&tensors, &meta)?;
    write_atomic(path, &bytes)
}

/// Write via a temporary sibling, fsync, then rename, so readers never see half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tiny".into());
    let tmp = dir.join(format!(".{file_name}.{}.part", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(res?)
}

/// Rank of the tiny LoRAs.
const LORA_RANK: usize = 4;

/// `(a, n / a)` with `a` the largest divisor of `n` not above √n (LoKr's split of a width).
fn split_dim(n: usize) -> (usize, usize) {
    let mut a = 1;
    let mut d = 1;
    while d * d <= n {
        if n.is_multiple_of(d) {
            a = d;
        }
        d += 1;
    }
    (a, n / a)
}

/// Write a small random LoRA in kohya naming for the layers of a (tiny) checkpoint: every UNet
/// attention projection (`attn1`/`attn2` `to_q`, `to_k`, `to_v`, `to_out.0`), the first
/// transformer's `proj_in` (a 1×1 conv in SD 1.x), the first res block's 3×3 `conv1`, and the
/// q/k/v/out projections of every text encoder layer. UNet names follow kohya: diffusers paths
/// for SD 1.x/2.x, LDM paths for SDXL. Tensors are stored as f16, like most shipped LoRAs.
///
/// - [`LoraKind::Lora`]: `lora_down`/`lora_up` (3×3 down + 1×1 up on the conv, LoCon),
///   rank 4, `alpha` 2.
/// - [`LoraKind::Loha`]: `hada_w1_a/b`, `hada_w2_a/b`; the 3×3 conv in Tucker form
///   (`hada_t1`/`hada_t2`); `alpha` 2.
/// - [`LoraKind::Lokr`]: every form: UNet projections `lokr_w1` + `lokr_w2_a/b`, text encoder
///   `lokr_w1_a/b` + `lokr_w2`, the 3×3 conv `lokr_w1` + Tucker `lokr_t2`/`lokr_w2_a/b`
///   (all with `alpha` 2), and `proj_in` with full `lokr_w1` + `lokr_w2` (no alpha).
pub fn write_tiny_lora(
    checkpoint: &Path,
    kind: crate::lora::LoraKind,
    seed: u64,
    out: &Path,
) -> Result<()> {
    use crate::lora::{text_layouts_from_header, LoraKind, ModuleMap};
    let header = crate::safetensors_file::read_header(checkpoint)?;
    let family = crate::detect::checkpoint_family(&header).ok_or_else(|| {
        crate::EngineError::UnknownModel(format!("{} is not a checkpoint", checkpoint.display()))
    })?;
    let unet = UNetConfig::detect(&header, UNET_PREFIX, family)?;
    let map = ModuleMap::new(
        &header,
        family,
        &unet,
        &text_layouts_from_header(&header, family)?,
    );
    let attn = [".to_q", ".to_k", ".to_v", ".to_out.0"];
    let mut chosen: BTreeMap<String, crate::lora::Target> = BTreeMap::new();
    let mut proj_in: Option<(String, crate::lora::Target)> = None;
    for (name, t) in map.entries() {
        if name.starts_with("lora_te") {
            if name.contains("_self_attn_") {
                chosen.insert(name.clone(), t.clone());
            }
            continue;
        }
        let Some(module) = name.strip_prefix("lora_unet_").and(
            t.key
                .strip_prefix(UNET_PREFIX)
                .and_then(|k| k.strip_suffix(".weight")),
        ) else {
            continue;
        };
        let ldm_style = *name == format!("lora_unet_{}", module.replace('.', "_"));
        if ldm_style != (family == Family::Sdxl) {
            continue;
        }
        let is_attn = (module.contains(".attn1.") || module.contains(".attn2."))
            && attn.iter().any(|a| module.ends_with(a));
        if is_attn || module == "input_blocks.1.0.in_layers.2" {
            chosen.insert(name.clone(), t.clone());
        } else if module.ends_with(".proj_in")
            && proj_in.as_ref().is_none_or(|(_, p)| t.key < p.key)
        {
            proj_in = Some((name.clone(), t.clone()));
        }
    }
    let proj_in_name = proj_in.as_ref().map(|(n, _)| n.clone());
    chosen.extend(proj_in);

    let r = LORA_RANK;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, part: &str, shape: Vec<usize>, sigma: f32| {
        let key = format!("{name}.{part}");
        let n: usize = shape.iter().product();
        let v: Vec<f32> = random_values(seed ^ name_hash(&key), n)
            .into_iter()
            .map(|x| x * (sigma / WEIGHT_STD))
            .collect();
        tensors.push((key, Dtype::F16, shape, encode(&v, Dtype::F16)));
    };
    let mut alphas = Vec::new();
    for (name, t) in &chosen {
        let s = &t.shape;
        let (o, i) = (s[0], s[1]);
        let (kh, kw) = if s.len() == 4 { (s[2], s[3]) } else { (1, 1) };
        let conv3 = kh * kw > 1;
        let mut alpha = true;
        match kind {
            LoraKind::Lora => {
                let mut down = vec![r, i];
                let mut up = vec![o, r];
                if s.len() == 4 {
                    down.extend([kh, kw]);
                    up.extend([1, 1]);
                }
                add(name, "lora_down.weight", down, 0.14);
                add(name, "lora_up.weight", up, 0.14);
            }
            LoraKind::Loha if conv3 => {
                for w in ["1", "2"] {
                    add(name, &format!("hada_t{w}"), vec![r, r, kh, kw], 0.3);
                    add(name, &format!("hada_w{w}_a"), vec![r, o], 0.3);
                    add(name, &format!("hada_w{w}_b"), vec![r, i], 0.3);
                }
            }
            LoraKind::Loha => {
                for w in ["1", "2"] {
                    add(name, &format!("hada_w{w}_a"), vec![o, r], 0.3);
                    add(name, &format!("hada_w{w}_b"), vec![r, i * kh * kw], 0.3);
                }
            }
            LoraKind::Lokr => {
                let ((a, b), (c, d)) = (split_dim(o), split_dim(i));
                if conv3 {
                    add(name, "lokr_w1", vec![a, c], 0.3);
                    add(name, "lokr_t2", vec![r, r, kh, kw], 0.3);
                    add(name, "lokr_w2_a", vec![r, b], 0.3);
                    add(name, "lokr_w2_b", vec![r, d], 0.3);
                } else if Some(name) == proj_in_name.as_ref() {
                    let mut w2 = vec![b, d];
                    if s.len() == 4 {
                        w2.extend([1, 1]);
                    }
                    add(name, "lokr_w1", vec![a, c], 0.15);
                    add(name, "lokr_w2", w2, 0.15);
                    alpha = false;
                } else if name.starts_with("lora_te") {
                    add(name, "lokr_w1_a", vec![a, r], 0.3);
                    add(name, "lokr_w1_b", vec![r, c], 0.3);
                    add(name, "lokr_w2", vec![b, d], 0.3);
                } else {
                    add(name, "lokr_w1", vec![a, c], 0.3);
                    add(name, "lokr_w2_a", vec![b, r], 0.3);
                    add(name, "lokr_w2_b", vec![r, d], 0.3);
                }
            }
        }
        if alpha {
            alphas.push(format!("{name}.alpha"));
        }
    }
    for key in alphas {
        tensors.push((
            key,
            Dtype::F16,
            vec![],
            encode(&[r as f32 / 2.0], Dtype::F16),
        ));
    }
    let mut meta = BTreeMap::new();
    let (module, algo) = match kind {
        LoraKind::Lora => ("networks.lora", "lora"),
        LoraKind::Loha => ("lycoris.kohya", "loha"),
        LoraKind::Lokr => ("lycoris.kohya", "lokr"),
    };
    meta.insert("ss_network_module".to_string(), module.to_string());
    meta.insert(
        "ss_network_args".to_string(),
        format!("{{\"algo\": \"{algo}\"}}"),
    );
    meta.insert("ss_network_dim".to_string(), r.to_string());
    meta.insert("ss_network_alpha".to_string(), (r as f32 / 2.0).to_string());
    let base = match family {
        Family::Sd1 => "sd_v1",
        Family::Sd2 => "sd_v2",
        Family::Sdxl => "sdxl_base_v1-0",
    };
    meta.insert("ss_base_model_version".to_string(), base.to_string());
    meta.insert("sd_engine.tiny_lora".to_string(), algo.to_string());
    meta.insert("sd_engine.seed".to_string(), seed.to_string());
    // Random weights answer the SD 2.x v-prediction probe at random: say what they are.
    meta.insert(
        "sd_engine.prediction_type".to_string(),
        "epsilon".to_string(),
    );
    let bytes = serialize(&tensors, &meta)?;
    write_atomic(out, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{detect, unet_config, ModelKind};

    #[test]
    fn tiny_checkpoints_detect_and_roundtrip() {
        let dir = tempfile::tempdir().expect("tempdir");
        for fam in [Family::Sd1, Family::Sd2, Family::Sdxl] {
            for inpaint in [false, true] {
                let p = dir
                    .path()
                    .join(format!("{}-{inpaint}.safetensors", fam.as_str()));
                write_tiny_checkpoint(fam, inpaint, 7, &p).expect("write");
                let size = std::fs::metadata(&p).expect("meta").len();
                assert!(size < 48 << 20, "{fam:?} tiny checkpoint is {size} bytes");
                let h = crate::safetensors_file::read_header(&p).expect("header");
                match detect(&h) {
                    ModelKind::Checkpoint(info) => {
                        assert_eq!(info.family, fam);
                        assert_eq!(info.inpaint, inpaint);
                        assert!(!info.v_prediction);
                    }
                    other => panic!("{fam:?} detected as {other:?}"),
                }
                let cfg = unet_config(&h).expect("unet config");
                assert_eq!(cfg, TinySpec::new(fam, inpaint).unet);
            }
        }
    }

    #[test]
    fn deterministic_from_seed() {
        let t = std::time::Instant::now();
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.safetensors");
        let b = dir.path().join("b.safetensors");
        let c = dir.path().join("c.safetensors");
        write_tiny_checkpoint(Family::Sdxl, false, 1, &a).expect("a");
        eprintln!("sdxl write took {:?}", t.elapsed());
        write_tiny_checkpoint(Family::Sd1, false, 1, &a).expect("a");
        write_tiny_checkpoint(Family::Sd1, false, 1, &b).expect("b");
        write_tiny_checkpoint(Family::Sd1, false, 2, &c).expect("c");
        let (a, b, c) = (
            std::fs::read(a).expect("a"),
            std::fs::read(b).expect("b"),
            std::fs::read(c).expect("c"),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn full_vae_layout_matches_sd_vae() {
        // The real SD VAE: ch 128, mult [1,2,4,4], 2 res blocks -> 83,653,863 parameters.
        let vae = TinyVae {
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 4,
        };
        let n: usize = vae
            .params()
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum();
        assert_eq!(n, 83_653_863);
    }
}
