//! CLIP text encoders as stored in single-file Stable Diffusion checkpoints.
//!
//! Two key layouts hold the same network:
//! - [`ClipLayout::OpenAi`]: OpenAI CLIP ViT-L/14 in the Hugging Face transformers layout
//!   (SD 1.x under `cond_stage_model.transformer.text_model.`, SDXL's first encoder under
//!   `conditioner.embedders.0.transformer.text_model.`); quick-GELU MLP.
//! - [`ClipLayout::OpenClip`]: OpenCLIP (SD 2.x ViT-H under `cond_stage_model.model.`, SDXL's
//!   bigG under `conditioner.embedders.1.model.`); fused `in_proj` attention weights, exact GELU,
//!   and a `text_projection` matrix applied as `x @ text_projection`.
//!
//! Note for the checkpoint/tiny-checkpoint code: widths and depth come from tensor shapes
//! ([`ClipConfig::detect`]); the head count is not stored anywhere, so it follows
//! [`clip_heads_for`]: 64-wide heads when the width is a multiple of 64 (every real CLIP),
//! otherwise 8-wide heads (tiny test widths such as 32 → 4 heads). Tiny checkpoints and the
//! diffusers configs in `tools/fixtures/` use the same rule. [`ClipConfig::param_shapes`] lists
//! every tensor (names relative to the prefix) a generator must write.

use candle_core::{DType, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use crate::models::attention;
use crate::safetensors_file::Header;
use crate::{EngineError, Result};

/// Which key layout (and activation) a text encoder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClipLayout {
    /// HF transformers layout, quick-GELU.
    OpenAi,
    /// OpenCLIP layout, exact GELU, optional text projection.
    OpenClip,
}

/// Shape of one CLIP text transformer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipConfig {
    pub layout: ClipLayout,
    pub vocab_size: usize,
    /// Number of positions (77 in every SD checkpoint).
    pub max_position: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    /// Output width of `text_projection` (OpenCLIP only; `None` when absent).
    pub projection_dim: Option<usize>,
}

/// Head count for a text transformer of width `hidden` (see the module docs).
pub fn clip_heads_for(hidden: usize) -> usize {
    if hidden >= 64 && hidden.is_multiple_of(64) {
        hidden / 64
    } else if hidden >= 8 && hidden.is_multiple_of(8) {
        hidden / 8
    } else {
        1
    }
}

/// LayerNorm epsilon of both CLIP implementations.
const LN_EPS: f64 = 1e-5;

fn unknown(msg: String) -> EngineError {
    EngineError::UnknownModel(msg)
}

impl ClipConfig {
    /// The SD 1.x / SDXL CLIP ViT-L/14 text encoder.
    pub fn clip_l() -> Self {
        Self {
            layout: ClipLayout::OpenAi,
            vocab_size: 49408,
            max_position: 77,
            hidden: 768,
            layers: 12,
            heads: 12,
            intermediate: 3072,
            projection_dim: None,
        }
    }

    /// The SD 2.x OpenCLIP ViT-H/14 text encoder (24 blocks as stored in checkpoints).
    pub fn open_clip_h() -> Self {
        Self {
            layout: ClipLayout::OpenClip,
            vocab_size: 49408,
            max_position: 77,
            hidden: 1024,
            layers: 24,
            heads: 16,
            intermediate: 4096,
            projection_dim: Some(1024),
        }
    }

    /// SDXL's OpenCLIP ViT-bigG/14 text encoder.
    pub fn open_clip_big_g() -> Self {
        Self {
            layout: ClipLayout::OpenClip,
            vocab_size: 49408,
            max_position: 77,
            hidden: 1280,
            layers: 32,
            heads: 20,
            intermediate: 5120,
            projection_dim: Some(1280),
        }
    }

    /// Detects layout and sizes from the tensors under `prefix` (e.g.
    /// `cond_stage_model.transformer.text_model.` or `conditioner.embedders.1.model.`).
    pub fn detect(header: &Header, prefix: &str) -> Result<ClipConfig> {
        Self::detect_with(&|name| header.shape(name).map(<[usize]>::to_vec), prefix)
    }

    /// [`ClipConfig::detect`] over any shape lookup (full tensor name → shape).
    pub fn detect_with(
        shape_of: &dyn Fn(&str) -> Option<Vec<usize>>,
        prefix: &str,
    ) -> Result<ClipConfig> {
        let get = |rel: &str| shape_of(&format!("{prefix}{rel}"));
        let need = |rel: &str, rank: usize| -> Result<Vec<usize>> {
            let s = get(rel).ok_or_else(|| unknown(format!("missing tensor {prefix}{rel}")))?;
            if s.len() != rank {
                return Err(unknown(format!(
                    "tensor {prefix}{rel} has shape {s:?}, expected rank {rank}"
                )));
            }
            Ok(s)
        };
        let (layout, tok, pos, fc1_of): (_, _, _, fn(usize) -> String) =
            if get("embeddings.token_embedding.weight").is_some() {
                (
                    ClipLayout::OpenAi,
                    need("embeddings.token_embedding.weight", 2)?,
                    need("embeddings.position_embedding.weight", 2)?,
                    |i| format!("encoder.layers.{i}.mlp.fc1.weight"),
                )
            } else if get("token_embedding.weight").is_some() {
                (
                    ClipLayout::OpenClip,
                    need("token_embedding.weight", 2)?,
                    need("positional_embedding", 2)?,
                    |i| format!("transformer.resblocks.{i}.mlp.c_fc.weight"),
                )
            } else {
                return Err(unknown(format!("no CLIP text encoder under {prefix:?}")));
            };
        let (vocab_size, hidden) = (tok[0], tok[1]);
        if pos[1] != hidden || hidden == 0 || vocab_size == 0 || pos[0] == 0 {
            return Err(unknown(format!(
                "CLIP embeddings under {prefix:?} disagree: token {tok:?}, position {pos:?}"
            )));
        }
        let mut layers = 0;
        while get(&fc1_of(layers)).is_some() {
            layers += 1;
        }
        if layers == 0 {
            return Err(unknown(format!(
                "CLIP text encoder under {prefix:?} has no layers"
            )));
        }
        let fc1 = need(&fc1_of(0), 2)?;
        let projection_dim = match layout {
            ClipLayout::OpenAi => None,
            ClipLayout::OpenClip => match get("text_projection") {
                Some(p) if p.len() == 2 && p[0] == hidden => Some(p[1]),
                Some(p) => {
                    return Err(unknown(format!(
                        "{prefix}text_projection has shape {p:?}, expected [{hidden}, _]"
                    )))
                }
                None => None,
            },
        };
        Ok(ClipConfig {
            layout,
            vocab_size,
            max_position: pos[0],
            hidden,
            layers,
            heads: clip_heads_for(hidden),
            intermediate: fc1[0],
            projection_dim,
        })
    }

    /// Every tensor of this encoder with its shape, names relative to the prefix, in the layout
    /// diffusers' single-file loader expects. `embeddings.position_ids` (an integer buffer some
    /// files carry) is not listed. OpenCLIP's `logit_scale` is a 0-d scalar.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden, self.intermediate);
        let mut v: Vec<(String, Vec<usize>)> = Vec::new();
        let mut push = |name: String, shape: &[usize]| v.push((name, shape.to_vec()));
        match self.layout {
            ClipLayout::OpenAi => {
                push(
                    "embeddings.token_embedding.weight".into(),
                    &[self.vocab_size, h],
                );
                push(
                    "embeddings.position_embedding.weight".into(),
                    &[self.max_position, h],
                );
                for l in 0..self.layers {
                    let p = format!("encoder.layers.{l}.");
                    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                        push(format!("{p}self_attn.{proj}.weight"), &[h, h]);
                        push(format!("{p}self_attn.{proj}.bias"), &[h]);
                    }
                    for ln in ["layer_norm1", "layer_norm2"] {
                        push(format!("{p}{ln}.weight"), &[h]);
                        push(format!("{p}{ln}.bias"), &[h]);
                    }
                    push(format!("{p}mlp.fc1.weight"), &[i, h]);
                    push(format!("{p}mlp.fc1.bias"), &[i]);
                    push(format!("{p}mlp.fc2.weight"), &[h, i]);
                    push(format!("{p}mlp.fc2.bias"), &[h]);
                }
                push("final_layer_norm.weight".into(), &[h]);
                push("final_layer_norm.bias".into(), &[h]);
            }
            ClipLayout::OpenClip => {
                push("token_embedding.weight".into(), &[self.vocab_size, h]);
                push("positional_embedding".into(), &[self.max_position, h]);
                for l in 0..self.layers {
                    let p = format!("transformer.resblocks.{l}.");
                    push(format!("{p}ln_1.weight"), &[h]);
                    push(format!("{p}ln_1.bias"), &[h]);
                    push(format!("{p}attn.in_proj_weight"), &[3 * h, h]);
                    push(format!("{p}attn.in_proj_bias"), &[3 * h]);
                    push(format!("{p}attn.out_proj.weight"), &[h, h]);
                    push(format!("{p}attn.out_proj.bias"), &[h]);
                    push(format!("{p}ln_2.weight"), &[h]);
                    push(format!("{p}ln_2.bias"), &[h]);
                    push(format!("{p}mlp.c_fc.weight"), &[i, h]);
                    push(format!("{p}mlp.c_fc.bias"), &[i]);
                    push(format!("{p}mlp.c_proj.weight"), &[h, i]);
                    push(format!("{p}mlp.c_proj.bias"), &[h]);
                }
                push("ln_final.weight".into(), &[h]);
                push("ln_final.bias".into(), &[h]);
                if let Some(p) = self.projection_dim {
                    push("text_projection".into(), &[h, p]);
                }
                push("logit_scale".into(), &[]);
            }
        }
        v
    }

    fn validate(&self) -> Result<()> {
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return Err(unknown(format!(
                "CLIP width {} is not divisible into {} heads",
                self.hidden, self.heads
            )));
        }
        Ok(())
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    /// q, k and v projections fused into one `[3·hidden, hidden]` matmul.
    qkv: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

fn linear(vb: &VarBuilder, out: usize, inp: usize, w: &str, b: &str) -> Result<Linear> {
    Ok(Linear::new(vb.get((out, inp), w)?, Some(vb.get(out, b)?)))
}

fn layer_norm(vb: VarBuilder, size: usize) -> Result<LayerNorm> {
    Ok(candle_nn::layer_norm(size, LN_EPS, vb)?)
}

impl EncoderLayer {
    fn load(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden, cfg.intermediate);
        Ok(match cfg.layout {
            ClipLayout::OpenAi => {
                let a = vb.pp("self_attn");
                let w = Tensor::cat(
                    &[
                        a.get((h, h), "q_proj.weight")?,
                        a.get((h, h), "k_proj.weight")?,
                        a.get((h, h), "v_proj.weight")?,
                    ],
                    0,
                )?;
                let b = Tensor::cat(
                    &[
                        a.get(h, "q_proj.bias")?,
                        a.get(h, "k_proj.bias")?,
                        a.get(h, "v_proj.bias")?,
                    ],
                    0,
                )?;
                Self {
                    ln1: layer_norm(vb.pp("layer_norm1"), h)?,
                    qkv: Linear::new(w, Some(b)),
                    out: linear(&a, h, h, "out_proj.weight", "out_proj.bias")?,
                    ln2: layer_norm(vb.pp("layer_norm2"), h)?,
                    fc1: linear(&vb, i, h, "mlp.fc1.weight", "mlp.fc1.bias")?,
                    fc2: linear(&vb, h, i, "mlp.fc2.weight", "mlp.fc2.bias")?,
                }
            }
            ClipLayout::OpenClip => Self {
                ln1: layer_norm(vb.pp("ln_1"), h)?,
                qkv: linear(&vb, 3 * h, h, "attn.in_proj_weight", "attn.in_proj_bias")?,
                out: linear(&vb, h, h, "attn.out_proj.weight", "attn.out_proj.bias")?,
                ln2: layer_norm(vb.pp("ln_2"), h)?,
                fc1: linear(&vb, i, h, "mlp.c_fc.weight", "mlp.c_fc.bias")?,
                fc2: linear(&vb, h, i, "mlp.c_proj.weight", "mlp.c_proj.bias")?,
            },
        })
    }

    fn forward(&self, x: &Tensor, heads: usize, layout: ClipLayout) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let dh = h / heads;
        let qkv = self.qkv.forward(&self.ln1.forward(x)?)?;
        // [B, L, 3, H, Dh] -> [3, B, H, L, Dh]
        let qkv = qkv
            .reshape((b, l, 3, heads, dh))?
            .permute((2, 0, 3, 1, 4))?;
        let attn = attention::sdpa_causal(&qkv.get(0)?, &qkv.get(1)?, &qkv.get(2)?)?;
        let attn = attn.transpose(1, 2)?.reshape((b, l, h))?;
        let x = (x + self.out.forward(&attn)?)?;
        let m = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let m = match layout {
            // quick_gelu: x·σ(1.702x)
            ClipLayout::OpenAi => (&m * candle_nn::ops::sigmoid(&(&m * 1.702)?)?)?,
            ClipLayout::OpenClip => m.gelu_erf()?,
        };
        Ok((x + self.fc2.forward(&m)?)?)
    }
}

/// A CLIP text transformer with loaded weights.
pub struct ClipTextModel {
    cfg: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    /// `[hidden, projection_dim]`, applied as `x @ text_projection`.
    text_projection: Option<Tensor>,
    /// Textual-inversion vectors `[n, hidden]` addressed by token ids `vocab_size..+n`.
    extra_tokens: Option<Tensor>,
}

impl std::fmt::Debug for ClipTextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTextModel")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl ClipTextModel {
    /// Loads the weights; `vb` is already prefixed (e.g. `vb.pp("cond_stage_model.model")`).
    pub fn load(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden;
        let (tok, pos, layers_vb, final_name) = match cfg.layout {
            ClipLayout::OpenAi => (
                vb.get((cfg.vocab_size, h), "embeddings.token_embedding.weight")?,
                vb.get(
                    (cfg.max_position, h),
                    "embeddings.position_embedding.weight",
                )?,
                vb.pp("encoder.layers"),
                "final_layer_norm",
            ),
            ClipLayout::OpenClip => (
                vb.get((cfg.vocab_size, h), "token_embedding.weight")?,
                vb.get((cfg.max_position, h), "positional_embedding")?,
                vb.pp("transformer.resblocks"),
                "ln_final",
            ),
        };
        let layers = (0..cfg.layers)
            .map(|i| EncoderLayer::load(layers_vb.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let text_projection = match (cfg.layout, cfg.projection_dim) {
            (ClipLayout::OpenClip, Some(p)) => Some(vb.get((h, p), "text_projection")?),
            _ => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            token_embedding: tok,
            position_embedding: pos,
            layers,
            final_norm: layer_norm(vb.pp(final_name), h)?,
            text_projection,
            extra_tokens: None,
        })
    }

    /// Append textual-inversion vectors `[n, hidden]` to the vocabulary: token id
    /// `vocab_size + i` then embeds as row `i`. `None` removes them. Positions holding such ids
    /// count as id 0 when the pooled output's end-of-text position is found, as A1111's
    /// placeholder tokens do.
    pub fn set_extra_tokens(&mut self, extra: Option<Tensor>) -> Result<()> {
        if let Some(t) = &extra {
            let (_, h) = t.dims2()?;
            if h != self.cfg.hidden {
                return Err(EngineError::InvalidParam(format!(
                    "embedding vectors are {h} wide, the text encoder is {}",
                    self.cfg.hidden
                )));
            }
        }
        self.extra_tokens = match extra {
            Some(t) => Some(t.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        Ok(())
    }

    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// Encodes token ids `[B, L]` (u32, `L <= max_position`).
    ///
    /// `hidden` (`[B, L, hidden]`) is the output of layer `layers + 1 - skip` (skip 1 = last
    /// layer, 2 = penultimate, ...; clamped to `1..=layers`), passed through the final layer norm
    /// when `final_norm`. `pooled` (`[B, projection_dim or hidden]`) is the last layer's
    /// final-normed state at the end-of-text position (the first position holding the largest id,
    /// as both CLIP implementations pick it), projected by `text_projection` when present.
    pub fn forward(&self, ids: &Tensor, skip: usize, final_norm: bool) -> Result<(Tensor, Tensor)> {
        let (hidden, pooled) = self.run(ids, skip, final_norm, true)?;
        let pooled = pooled
            .ok_or_else(|| EngineError::InvalidParam("CLIP produced no pooled output".into()))?;
        Ok((hidden, pooled))
    }

    /// Only the `hidden` part of [`ClipTextModel::forward`]; stops after the layer it needs.
    pub fn forward_hidden(&self, ids: &Tensor, skip: usize, final_norm: bool) -> Result<Tensor> {
        Ok(self.run(ids, skip, final_norm, false)?.0)
    }

    fn run(
        &self,
        ids: &Tensor,
        skip: usize,
        final_norm: bool,
        want_pooled: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, l) = ids.dims2()?;
        if l == 0 || l > self.cfg.max_position {
            return Err(EngineError::InvalidParam(format!(
                "CLIP takes 1..={} tokens per sequence, got {l}",
                self.cfg.max_position
            )));
        }
        let ids = ids.to_dtype(DType::U32)?;
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        let vocab = self.cfg.vocab_size;
        let n_extra = self
            .extra_tokens
            .as_ref()
            .map_or(0, |t| t.dim(0).unwrap_or(0));
        let mut eos = Vec::with_capacity(b);
        let mut any_extra = false;
        for row in &rows {
            if let Some(&bad) = row.iter().find(|&&t| t as usize >= vocab + n_extra) {
                return Err(EngineError::InvalidParam(format!(
                    "token id {bad} outside the CLIP vocabulary ({vocab} + {n_extra} embedding vectors)"
                )));
            }
            // First occurrence of the maximum, like torch.argmax; embedding ids count as 0.
            let base = |t: u32| if t as usize >= vocab { 0 } else { t };
            let mut best = 0;
            for (i, &t) in row.iter().enumerate() {
                any_extra |= t as usize >= vocab;
                if base(t) > base(row[best]) {
                    best = i;
                }
            }
            eos.push(best);
        }

        let tok = match (&self.extra_tokens, any_extra) {
            (Some(extra), true) => {
                // Look up ordinary ids in the vocabulary and embedding ids in the extra table,
                // then pick per position (a select, so ordinary rows stay bit-exact).
                let flat: Vec<u32> = rows.iter().flatten().copied().collect();
                let is_extra: Vec<u8> = flat.iter().map(|&t| (t as usize >= vocab) as u8).collect();
                let base_ids: Vec<u32> = flat
                    .iter()
                    .map(|&t| if t as usize >= vocab { 0 } else { t })
                    .collect();
                let extra_ids: Vec<u32> = flat
                    .iter()
                    .map(|&t| (t as usize).saturating_sub(vocab) as u32)
                    .collect();
                let dev = ids.device();
                let n = flat.len();
                let base = self
                    .token_embedding
                    .index_select(&Tensor::from_vec(base_ids, n, dev)?, 0)?;
                let ext = extra.index_select(&Tensor::from_vec(extra_ids, n, dev)?, 0)?;
                let mask =
                    Tensor::from_vec(is_extra, (n, 1), dev)?.broadcast_as((n, self.cfg.hidden))?;
                mask.where_cond(&ext, &base)?
                    .reshape((b, l, self.cfg.hidden))?
            }
            _ => self
                .token_embedding
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, l, self.cfg.hidden))?,
        };
        let pos = self.position_embedding.narrow(0, 0, l)?.unsqueeze(0)?;
        let mut x = tok.broadcast_add(&pos)?;

        let n = self.layers.len();
        let target = n + 1 - skip.clamp(1, n);
        let last = if want_pooled { n } else { target };
        let mut hidden = None;
        for (i, layer) in self.layers[..last].iter().enumerate() {
            x = layer.forward(&x, self.cfg.heads, self.cfg.layout)?;
            if i + 1 == target {
                hidden = Some(x.clone());
            }
        }
        let hidden =
            hidden.ok_or_else(|| EngineError::InvalidParam("CLIP layer out of range".into()))?;
        let pooled = if want_pooled {
            let normed = self.final_norm.forward(&x)?;
            let picked = eos
                .iter()
                .enumerate()
                .map(|(bi, &p)| normed.get(bi)?.get(p))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let pooled = Tensor::stack(&picked, 0)?;
            Some(match &self.text_projection {
                Some(p) => pooled.matmul(p)?,
                None => pooled,
            })
        } else {
            None
        };
        let hidden = if final_norm {
            self.final_norm.forward(&hidden)?
        } else {
            hidden
        };
        Ok((hidden, pooled))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, HashMap};

    use candle_core::Device;

    use super::*;
    use crate::safetensors_file::{Dtype, TensorInfo};

    /// Deterministic pseudo-random tensors for every parameter (LayerNorm weights near 1).
    pub(crate) fn random_weights(
        shapes: &[(String, Vec<usize>)],
        prefix: &str,
        seed: u64,
    ) -> HashMap<String, Tensor> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        shapes
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let fan_in = if shape.len() >= 2 {
                    shape[1..].iter().product::<usize>()
                } else {
                    1
                };
                let is_norm_weight = shape.len() == 1
                    && name.ends_with("weight")
                    && (name.contains("norm") || name.contains("ln_"));
                let data: Vec<f32> = (0..n)
                    .map(|_| {
                        let r = next();
                        if is_norm_weight {
                            1.0 + 0.2 * r
                        } else {
                            2.0 * r / (fan_in as f32).sqrt()
                        }
                    })
                    .collect();
                let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu).expect("tensor");
                (format!("{prefix}{name}"), t)
            })
            .collect()
    }

    pub(crate) fn header_of(shapes: &[(String, Vec<usize>)], prefix: &str) -> Header {
        let mut tensors = BTreeMap::new();
        for (name, shape) in shapes {
            tensors.insert(
                format!("{prefix}{name}"),
                TensorInfo {
                    dtype: Dtype::F32,
                    shape: shape.clone(),
                    data_offsets: (0, 0),
                },
            );
        }
        Header {
            tensors,
            ..Default::default()
        }
    }

    fn tiny(layout: ClipLayout) -> ClipConfig {
        ClipConfig {
            layout,
            vocab_size: 100,
            max_position: 12,
            hidden: 32,
            layers: 3,
            heads: 4,
            intermediate: 48,
            projection_dim: (layout == ClipLayout::OpenClip).then_some(24),
        }
    }

    fn model(cfg: &ClipConfig, seed: u64) -> ClipTextModel {
        let w = random_weights(&cfg.param_shapes(), "", seed);
        let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
        ClipTextModel::load(vb, cfg).expect("load")
    }

    fn ids(rows: &[Vec<u32>]) -> Tensor {
        Tensor::new(rows.to_vec(), &Device::Cpu).expect("ids")
    }

    fn close(a: &Tensor, b: &Tensor) -> bool {
        let d = (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max");
        d.to_scalar::<f32>().expect("scalar") < 1e-5
    }

    #[test]
    fn heads_rule() {
        assert_eq!(clip_heads_for(768), 12);
        assert_eq!(clip_heads_for(1024), 16);
        assert_eq!(clip_heads_for(1280), 20);
        assert_eq!(clip_heads_for(32), 4);
        assert_eq!(clip_heads_for(5), 1);
    }

    #[test]
    fn detect_round_trips_param_shapes() {
        for (cfg, prefix) in [
            (
                tiny(ClipLayout::OpenAi),
                "cond_stage_model.transformer.text_model.",
            ),
            (tiny(ClipLayout::OpenClip), "conditioner.embedders.1.model."),
            (
                ClipConfig::clip_l(),
                "conditioner.embedders.0.transformer.text_model.",
            ),
            (ClipConfig::open_clip_h(), "cond_stage_model.model."),
            (
                ClipConfig::open_clip_big_g(),
                "conditioner.embedders.1.model.",
            ),
        ] {
            let header = header_of(&cfg.param_shapes(), prefix);
            assert_eq!(ClipConfig::detect(&header, prefix).expect("detect"), cfg);
        }
        let empty = Header::default();
        assert!(ClipConfig::detect(&empty, "cond_stage_model.model.").is_err());
    }

    #[test]
    fn detect_rejects_inconsistent_shapes() {
        let cfg = tiny(ClipLayout::OpenClip);
        let mut shapes = cfg.param_shapes();
        for (name, shape) in &mut shapes {
            if name == "positional_embedding" {
                *shape = vec![12, 31];
            }
        }
        assert!(ClipConfig::detect(&header_of(&shapes, "p."), "p.").is_err());
    }

    #[test]
    fn forward_shapes_skip_and_pooling() {
        for layout in [ClipLayout::OpenAi, ClipLayout::OpenClip] {
            let cfg = tiny(layout);
            let m = model(&cfg, 7);
            let t = ids(&[
                vec![98, 5, 6, 99, 0, 0, 0, 0],
                vec![98, 7, 99, 99, 99, 99, 99, 99],
            ]);
            let (h1, pooled) = m.forward(&t, 1, true).expect("forward");
            assert_eq!(h1.dims(), &[2, 8, 32]);
            let pdim = cfg.projection_dim.unwrap_or(cfg.hidden);
            assert_eq!(pooled.dims(), &[2, pdim]);
            // Pooled is the final-normed last layer at the first max id, then projected.
            let h1_b0 = h1.get(0).expect("b").get(3).expect("p");
            let h1_b1 = h1.get(1).expect("b").get(2).expect("p");
            let want = Tensor::stack(&[h1_b0, h1_b1], 0).expect("stack");
            let want = match &m.text_projection {
                Some(p) => want.matmul(p).expect("proj"),
                None => want,
            };
            assert!(close(&pooled, &want), "{layout:?}");
            // Skip 2 differs from skip 1, and forward_hidden agrees with forward.
            let h2 = m.forward_hidden(&t, 2, false).expect("skip2");
            let (h2b, _) = m.forward(&t, 2, false).expect("skip2");
            assert!(close(&h2, &h2b));
            assert!(!close(&h2, &h1));
            // Oversized skips clamp to the first layer instead of failing.
            let h_big = m.forward_hidden(&t, 99, false).expect("clamped");
            let h_first = m.forward_hidden(&t, cfg.layers, false).expect("first");
            assert!(close(&h_big, &h_first));
        }
    }

    #[test]
    fn attention_is_causal() {
        let m = model(&tiny(ClipLayout::OpenAi), 3);
        let a = m
            .forward_hidden(&ids(&[vec![98, 5, 6, 7, 99]]), 1, true)
            .expect("a");
        let b = m
            .forward_hidden(&ids(&[vec![98, 5, 6, 8, 99]]), 1, true)
            .expect("b");
        let prefix = |t: &Tensor| t.narrow(1, 0, 3).expect("narrow");
        assert!(close(&prefix(&a), &prefix(&b)));
        assert!(!close(&a, &b));
    }

    #[test]
    fn bad_ids_are_errors() {
        let m = model(&tiny(ClipLayout::OpenClip), 1);
        assert!(m.forward(&ids(&[vec![1, 100]]), 1, true).is_err());
        assert!(m.forward(&ids(&[vec![1; 13]]), 1, true).is_err());
    }
}
