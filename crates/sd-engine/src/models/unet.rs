//! The Stable Diffusion UNet in the original LDM/SGM layout (`input_blocks.N.M.*`,
//! `middle_block.*`, `output_blocks.*`), with every width and depth read from tensor shapes.
//!
//! One implementation serves SD 1.x (conv proj_in/out, 8 heads), SD 2.x and SDXL (linear
//! proj_in/out, 64-wide heads; SDXL adds the `label_emb` vector conditioning).

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::api::Family;
use crate::models::ops::{self, prof, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::safetensors_file::Header;
use crate::{EngineError, Result};

/// How attention heads are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadSpec {
    /// A fixed number of heads at every level (SD 1.x: 8).
    Count(usize),
    /// A fixed head width; the count follows the channels (SD 2.x / SDXL: 64).
    Dim(usize),
}

impl HeadSpec {
    /// (heads, head_dim) for a transformer of `channels` width.
    pub fn split(self, channels: usize) -> Result<(usize, usize)> {
        let (h, d) = match self {
            HeadSpec::Count(h) => (h, channels.checked_div(h).unwrap_or(0)),
            HeadSpec::Dim(d) => (channels.checked_div(d).unwrap_or(0), d),
        };
        if h == 0 || d == 0 || h * d != channels {
            return Err(EngineError::UnknownModel(format!(
                "attention width {channels} does not split into heads as {self:?}"
            )));
        }
        Ok((h, d))
    }
}

/// UNet hyper-parameters, detected from a checkpoint's tensor shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    pub channel_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// Transformer blocks per level (0 = no attention at that level).
    pub transformer_depth: Vec<usize>,
    /// Transformer blocks in the middle block.
    pub transformer_depth_middle: usize,
    pub heads: HeadSpec,
    pub context_dim: usize,
    /// SD 2.x / SDXL use Linear proj_in/out; SD 1.x uses 1×1 convolutions.
    pub use_linear_in_transformer: bool,
    /// SDXL's vector conditioning width (2816 for the base model).
    pub adm_in_channels: Option<usize>,
}

/// Width of each of SDXL's six size/crop embeddings.
pub const SDXL_TIME_ID_DIM: usize = 256;

fn missing(what: &str) -> EngineError {
    EngineError::UnknownModel(format!("UNet: {what}"))
}

impl UNetConfig {
    /// The reference SD 1.5 UNet.
    pub fn sd15() -> Self {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            model_channels: 320,
            channel_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            transformer_depth: vec![1, 1, 1, 0],
            transformer_depth_middle: 1,
            heads: HeadSpec::Count(8),
            context_dim: 768,
            use_linear_in_transformer: false,
            adm_in_channels: None,
        }
    }

    /// The reference SD 2.x UNet.
    pub fn sd2() -> Self {
        UNetConfig {
            heads: HeadSpec::Dim(64),
            context_dim: 1024,
            use_linear_in_transformer: true,
            ..Self::sd15()
        }
    }

    /// The reference SDXL base UNet.
    pub fn sdxl() -> Self {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            model_channels: 320,
            channel_mult: vec![1, 2, 4],
            num_res_blocks: 2,
            transformer_depth: vec![0, 2, 10],
            transformer_depth_middle: 10,
            heads: HeadSpec::Dim(64),
            context_dim: 2048,
            use_linear_in_transformer: true,
            adm_in_channels: Some(2816),
        }
    }

    /// Detect the configuration from the tensors under `prefix` (normally
    /// `model.diffusion_model.`). Heads follow the family convention (SD 1.x: 8 heads;
    /// SD 2.x/SDXL: 64-wide heads) unless the file's `__metadata__` carries
    /// `sd_engine.unet.num_heads` or `sd_engine.unet.head_dim`.
    pub fn detect(header: &Header, prefix: &str, family: Family) -> Result<Self> {
        let p = |s: &str| format!("{prefix}{s}");
        let conv_in = header
            .shape(&p("input_blocks.0.0.weight"))
            .ok_or_else(|| missing("no input_blocks.0.0.weight"))?;
        if conv_in.len() != 4 {
            return Err(missing("input conv is not 4-D"));
        }
        let (model_channels, in_channels) = (conv_in[0], conv_in[1]);
        let out_channels = *header
            .shape(&p("out.2.weight"))
            .and_then(|s| s.first())
            .ok_or_else(|| missing("no out.2.weight"))?;

        // Walk the input blocks: res blocks (optionally followed by a transformer), with a
        // downsampler (`.0.op`) closing every level but the last.
        let mut channel_mult = Vec::new();
        let mut transformer_depth = Vec::new();
        let mut res_in_level = 0usize;
        let mut num_res_blocks = None;
        let mut level_depth = 0usize;
        let mut level_ch = model_channels;
        let mut n = 1;
        loop {
            if header.contains(&p(&format!("input_blocks.{n}.0.op.weight"))) {
                channel_mult.push(level_ch / model_channels.max(1));
                transformer_depth.push(level_depth);
                match num_res_blocks {
                    None => num_res_blocks = Some(res_in_level),
                    Some(r) if r != res_in_level => {
                        return Err(missing("levels have different numbers of res blocks"))
                    }
                    _ => {}
                }
                res_in_level = 0;
                level_depth = 0;
            } else if let Some(s) =
                header.shape(&p(&format!("input_blocks.{n}.0.out_layers.3.weight")))
            {
                level_ch = *s.first().ok_or_else(|| missing("bad res block"))?;
                res_in_level += 1;
                level_depth = count_blocks(
                    header,
                    &p(&format!("input_blocks.{n}.1.transformer_blocks.")),
                );
            } else {
                break;
            }
            n += 1;
        }
        if res_in_level == 0 {
            return Err(missing("no res blocks in the last level"));
        }
        channel_mult.push(level_ch / model_channels.max(1));
        transformer_depth.push(level_depth);
        let num_res_blocks = match num_res_blocks {
            None => res_in_level,
            Some(r) if r == res_in_level => r,
            Some(_) => return Err(missing("levels have different numbers of res blocks")),
        };
        let transformer_depth_middle =
            count_blocks(header, &p("middle_block.1.transformer_blocks."));

        // Any cross-attention tells the context width and projection kind.
        let attn_prefix = header
            .names_with_prefix(prefix)
            .find(|k| k.ends_with("attn2.to_k.weight"))
            .map(|k| {
                k.trim_end_matches("transformer_blocks.0.attn2.to_k.weight")
                    .to_string()
            });
        let (context_dim, use_linear) = match &attn_prefix {
            Some(_) => {
                let k = header
                    .names_with_prefix(prefix)
                    .find(|k| k.ends_with("attn2.to_k.weight"))
                    .and_then(|k| header.shape(k))
                    .ok_or_else(|| missing("attn2.to_k"))?;
                let proj = header
                    .names_with_prefix(prefix)
                    .find(|k| k.ends_with("proj_in.weight"))
                    .and_then(|k| header.shape(k))
                    .ok_or_else(|| missing("proj_in"))?;
                (
                    *k.get(1).ok_or_else(|| missing("attn2.to_k"))?,
                    proj.len() == 2,
                )
            }
            None => (0, false),
        };
        let adm_in_channels = header
            .shape(&p("label_emb.0.0.weight"))
            .and_then(|s| s.get(1).copied());

        let heads = if let Some(h) = meta_usize(header, "sd_engine.unet.num_heads") {
            HeadSpec::Count(h)
        } else if let Some(d) = meta_usize(header, "sd_engine.unet.head_dim") {
            HeadSpec::Dim(d)
        } else {
            match family {
                Family::Sd1 => HeadSpec::Count(8),
                Family::Sd2 | Family::Sdxl => HeadSpec::Dim(64),
            }
        };

        let cfg = UNetConfig {
            in_channels,
            out_channels,
            model_channels,
            channel_mult,
            num_res_blocks,
            transformer_depth,
            transformer_depth_middle,
            heads,
            context_dim,
            use_linear_in_transformer: use_linear,
            adm_in_channels,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check that the numbers fit together (GroupNorm groups, head split).
    pub fn validate(&self) -> Result<()> {
        if self.model_channels == 0 || self.channel_mult.is_empty() || self.num_res_blocks == 0 {
            return Err(missing("empty architecture"));
        }
        for (&m, &d) in self.channel_mult.iter().zip(&self.transformer_depth) {
            let ch = m * self.model_channels;
            if !ch.is_multiple_of(32) {
                return Err(missing(&format!("width {ch} is not a multiple of 32")));
            }
            if d > 0 {
                self.heads.split(ch)?;
            }
        }
        if self.transformer_depth.len() != self.channel_mult.len() {
            return Err(missing("depth list length differs from level count"));
        }
        if self.transformer_depth_middle > 0 {
            let ch = self.model_channels * self.channel_mult.last().copied().unwrap_or(1);
            self.heads.split(ch)?;
        }
        Ok(())
    }

    /// Every tensor the UNet loads (without the `model.diffusion_model.` prefix) and its shape,
    /// in load order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let rec = Recorder::default();
        let vb = VarBuilder::from_backend(Box::new(&rec), DType::F32, Device::Cpu);
        // Loading against the recorder cannot fail for a validated config; if it does, the
        // names recorded so far are still the right prefix of the list.
        let _ = UNet::load(vb, self);
        rec.take()
    }
}

fn meta_usize(header: &Header, key: &str) -> Option<usize> {
    header.metadata.get(key).and_then(|v| v.trim().parse().ok())
}

/// Number of consecutive `{prefix}K.` blocks (K = 0, 1, ...).
fn count_blocks(header: &Header, prefix: &str) -> usize {
    let mut k = 0;
    while header.has_prefix(&format!("{prefix}{k}.")) {
        k += 1;
    }
    k
}

/// A VarBuilder backend that records requested names and shapes and hands back zero-cost
/// broadcast tensors; used to list a model's parameters without allocating them.
#[derive(Default)]
pub(crate) struct Recorder {
    seen: Mutex<Vec<(String, Vec<usize>)>>,
}

impl Recorder {
    pub(crate) fn take(&self) -> Vec<(String, Vec<usize>)> {
        match self.seen.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }
}

impl SimpleBackend for &Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut g) = self.seen.lock() {
            g.push((name.to_string(), s.dims().to_vec()));
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("recorder: unchecked get of {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

fn conv(cin: usize, cout: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::load(vb, cin, cout, k, k / 2, stride)
}

fn group_norm(ch: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::load(vb, ch, 32, eps)
}

/// Sinusoidal embedding as LDM's `timestep_embedding` / diffusers' `get_timestep_embedding`
/// with `flip_sin_to_cos=True, downscale_freq_shift=0`: `[cos(t·f), sin(t·f)]`,
/// `f_i = exp(-ln(10000)·i/half)`. Computed in f32 in the same order as PyTorch.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let scale = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((scale * i as f32) / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let mut emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    Ok(emb)
}

/// SDXL's vector conditioning `y`: the pooled CLIP-G embedding `[B, P]` followed by the
/// 256-wide sinusoidal embedding of each of (orig_h, orig_w, crop_top, crop_left, target_h,
/// target_w), as SGM's `ConcatTimestepEmbedderND` and diffusers' `add_time_ids` do.
pub fn sdxl_vector(
    pooled: &Tensor,
    orig_size: (u32, u32),
    crop: (u32, u32),
    target_size: (u32, u32),
) -> Result<Tensor> {
    let pooled = if pooled.rank() == 1 {
        pooled.unsqueeze(0)?
    } else {
        pooled.clone()
    };
    let b = pooled.dim(0)?;
    let ids = [
        orig_size.0,
        orig_size.1,
        crop.0,
        crop.1,
        target_size.0,
        target_size.1,
    ];
    let ids = Tensor::from_vec(ids.map(|v| v as f32).to_vec(), 6, pooled.device())?;
    let emb = timestep_embedding(&ids, SDXL_TIME_ID_DIM)?.reshape((1, 6 * SDXL_TIME_ID_DIM))?;
    let emb = emb.repeat((b, 1))?;
    Ok(Tensor::cat(&[&pooled.to_dtype(DType::F32)?, &emb], 1)?)
}

struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    emb: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    fn load(vb: VarBuilder, cin: usize, cout: usize, temb: usize) -> Result<Self> {
        Ok(ResBlock {
            norm1: group_norm(cin, 1e-5, vb.pp("in_layers.0"))?,
            conv1: conv(cin, cout, 3, 1, vb.pp("in_layers.2"))?,
            emb: Linear::load(vb.pp("emb_layers.1"), temb, cout, true)?,
            norm2: group_norm(cout, 1e-5, vb.pp("out_layers.0"))?,
            conv2: conv(cout, cout, 3, 1, vb.pp("out_layers.3"))?,
            skip: if cin != cout {
                Some(conv(cin, cout, 1, 1, vb.pp("skip_connection"))?)
            } else {
                None
            },
        })
    }

    /// `emb` is the already-SiLU'd time embedding `[B, temb]`. The time projection is added as
    /// a per-image channel bias of conv1 and the skip as conv2's residual, so neither costs a
    /// pass of its own.
    fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let e = self.emb.forward(emb)?;
        let h = {
            let n = self.norm1.forward(x, true)?;
            self.conv1.forward_with(&n, None, Some(&e))?
        };
        let n = self.norm2.forward(&h, true)?;
        drop(h);
        let skip = match &self.skip {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_with(&n, Some(&skip), None)
    }
}

/// The input projections of one attention layer.
enum Qkv {
    /// Self-attention: one GEMM for `[q | k | v]` (weights concatenated at load).
    SelfFused(Linear),
    /// Cross-attention: q from the tokens, one GEMM for `[k | v]` from the context.
    CrossFused { q: Linear, kv: Linear },
    /// Weights that cannot be concatenated here (not f32 on the CPU, or only recorded).
    Separate { q: Linear, k: Linear, v: Linear },
}

struct CrossAttention {
    qkv: Qkv,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl CrossAttention {
    fn load(
        vb: VarBuilder,
        dim: usize,
        ctx: usize,
        heads: usize,
        head_dim: usize,
        self_attn: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let wq = vb.get((inner, dim), "to_q.weight")?;
        let wk = vb.get((inner, ctx), "to_k.weight")?;
        let wv = vb.get((inner, ctx), "to_v.weight")?;
        let fusable = [&wq, &wk, &wv]
            .iter()
            .all(|w| w.device().is_cpu() && w.dtype() == DType::F32 && w.is_contiguous());
        let qkv = if !fusable {
            Qkv::Separate {
                q: Linear::new(wq, None)?,
                k: Linear::new(wk, None)?,
                v: Linear::new(wv, None)?,
            }
        } else if self_attn {
            Qkv::SelfFused(Linear::new(Tensor::cat(&[&wq, &wk, &wv], 0)?, None)?)
        } else {
            Qkv::CrossFused {
                q: Linear::new(wq, None)?,
                kv: Linear::new(Tensor::cat(&[&wk, &wv], 0)?, None)?,
            }
        };
        Ok(CrossAttention {
            qkv,
            to_out: Linear::load(vb.pp("to_out.0"), inner, dim, true)?,
            heads,
            head_dim,
        })
    }

    /// `[B, L, parts·H·D]` → the `parts` views `[B, H, L, D]` (no copies).
    fn heads_of(&self, t: &Tensor, parts: usize) -> Result<Vec<Tensor>> {
        let (b, l, _) = t.dims3()?;
        let t = t.reshape((b, l, parts, self.heads, self.head_dim))?;
        (0..parts)
            .map(|i| Ok(t.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?))
            .collect()
    }

    /// Attention of the normalised tokens `n` over `ctx` (themselves when `None`), plus the
    /// residual. Heads are read from the projections' outputs in place and the attention
    /// output comes back token-major, so there are no head split/merge copies.
    fn forward_add(&self, n: &Tensor, ctx: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
        let ctx_or_self = ctx.unwrap_or(n);
        let (q, k, v) = match &self.qkv {
            Qkv::SelfFused(w) if ctx.is_none() => {
                let mut p = self.heads_of(&w.forward(n)?, 3)?;
                let (v, k, q) = (p.pop(), p.pop(), p.pop());
                (q, k, v)
            }
            Qkv::CrossFused { q, kv } if ctx.is_some() => {
                let mut p = self.heads_of(&kv.forward(ctx_or_self)?, 2)?;
                let (v, k) = (p.pop(), p.pop());
                (self.heads_of(&q.forward(n)?, 1)?.pop(), k, v)
            }
            Qkv::Separate { q, k, v } => (
                self.heads_of(&q.forward(n)?, 1)?.pop(),
                self.heads_of(&k.forward(ctx_or_self)?, 1)?.pop(),
                self.heads_of(&v.forward(ctx_or_self)?, 1)?.pop(),
            ),
            _ => {
                return Err(EngineError::InvalidParam(
                    "attention layer called with the wrong kind of context".into(),
                ))
            }
        };
        let (Some(q), Some(k), Some(v)) = (q, k, v) else {
            return Err(missing("attention head bookkeeping"));
        };
        let o = {
            let _p = prof::scope("sdpa");
            attention(&q, &k, &v)?
        };
        drop((q, k, v));
        let (b, h, l, d) = o.dims4()?;
        let o = {
            let _p = prof::scope("heads split/merge");
            // A view of the kernel's token-major output on CPU (free); a copy elsewhere.
            o.transpose(1, 2)?.reshape((b, l, h * d))?
        };
        self.to_out.forward_with(&o, Some(residual))
    }
}

/// Scaled dot-product attention over `[B, heads, L, head_dim]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    crate::models::attention::sdpa(q, k, v)
}

struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: Linear::load(vb.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::load(vb.pp("net.2"), inner, dim, true)?,
        })
    }

    /// GEGLU (the projection's first half gated by exact-erf GELU of its second half), then the
    /// output projection with the residual folded in.
    fn forward_add(&self, n: &Tensor, residual: &Tensor) -> Result<Tensor> {
        ops::geglu_feed_forward(n, &self.proj, &self.out, Some(residual))
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn load(vb: VarBuilder, dim: usize, ctx: usize, heads: usize, head_dim: usize) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, 1e-5)?,
            attn1: CrossAttention::load(vb.pp("attn1"), dim, dim, heads, head_dim, true)?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, 1e-5)?,
            attn2: CrossAttention::load(vb.pp("attn2"), dim, ctx, heads, head_dim, false)?,
            norm3: LayerNorm::load(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let x = self.attn1.forward_add(&self.norm1.forward(x)?, None, x)?;
        let x = self
            .attn2
            .forward_add(&self.norm2.forward(&x)?, Some(ctx), &x)?;
        self.ff.forward_add(&self.norm3.forward(&x)?, &x)
    }
}

struct SpatialTransformer {
    norm: GroupNorm,
    /// A 1×1 conv (SD 1.x) or a linear layer (SD 2.x / SDXL): the same matrix either way.
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    fn load(vb: VarBuilder, ch: usize, depth: usize, cfg: &UNetConfig) -> Result<Self> {
        let (heads, head_dim) = cfg.heads.split(ch)?;
        let inner = heads * head_dim;
        let proj = |cin: usize, cout: usize, vb: VarBuilder| -> Result<Linear> {
            if cfg.use_linear_in_transformer {
                Linear::load(vb, cin, cout, true)
            } else {
                Linear::load_conv1x1(vb, cin, cout)
            }
        };
        let blocks = (0..depth)
            .map(|i| {
                TransformerBlock::load(
                    vb.pp(format!("transformer_blocks.{i}")),
                    inner,
                    cfg.context_dim,
                    heads,
                    head_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SpatialTransformer {
            norm: group_norm(ch, 1e-6, vb.pp("norm"))?,
            proj_in: proj(ch, inner, vb.pp("proj_in"))?,
            blocks,
            proj_out: proj(inner, ch, vb.pp("proj_out"))?,
        })
    }

    /// The projections read and write NCHW directly; the input is the residual of proj_out.
    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut s = {
            let hn = self.norm.forward(x, false)?;
            self.proj_in.forward_nchw_to_seq(&hn)?
        };
        for blk in &self.blocks {
            s = blk.forward(&s, ctx)?;
        }
        self.proj_out.forward_seq_to_nchw(&s, (h, w), Some(x))
    }
}

/// One `input_blocks.N` / `output_blocks.N` entry.
enum Layer {
    Res(Box<ResBlock>),
    Attn(SpatialTransformer),
    Down(Conv2d),
    Up(Conv2d),
}

impl Layer {
    fn res(vb: VarBuilder, cin: usize, cout: usize, temb: usize) -> Result<Self> {
        Ok(Layer::Res(Box::new(ResBlock::load(vb, cin, cout, temb)?)))
    }

    /// `up_to`: the spatial size an upsampler must produce (the next skip connection's), so
    /// sizes that are not a multiple of the total downscale still line up, as in diffusers.
    fn forward(
        &self,
        x: &Tensor,
        emb: &Tensor,
        ctx: &Tensor,
        up_to: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        match self {
            Layer::Res(r) => r.forward(x, emb),
            Layer::Attn(t) => t.forward(x, ctx),
            Layer::Down(c) => c.forward(x),
            Layer::Up(c) => {
                let (_, _, h, w) = x.dims4()?;
                let (th, tw) = up_to.unwrap_or((h * 2, w * 2));
                let u = {
                    let _p = prof::scope("upsample");
                    x.upsample_nearest2d(th, tw)?
                };
                c.forward(&u)
            }
        }
    }
}

fn run(
    layers: &[Layer],
    x: &Tensor,
    emb: &Tensor,
    ctx: &Tensor,
    up_to: Option<(usize, usize)>,
) -> Result<Tensor> {
    let mut h = x.clone();
    for l in layers {
        h = l.forward(&h, emb, ctx, up_to)?;
    }
    Ok(h)
}

/// The denoising UNet.
pub struct UNet {
    cfg: UNetConfig,
    time_embed: (Linear, Linear),
    label_emb: Option<(Linear, Linear)>,
    conv_in: Conv2d,
    input_blocks: Vec<Vec<Layer>>,
    middle: Vec<Layer>,
    output_blocks: Vec<Vec<Layer>>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
}

impl UNet {
    /// Load from a VarBuilder rooted at the UNet (e.g. `vb.pp("model.diffusion_model")`).
    pub fn load(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate()?;
        let mc = cfg.model_channels;
        let temb = mc * 4;
        let time_embed = (
            Linear::load(vb.pp("time_embed.0"), mc, temb, true)?,
            Linear::load(vb.pp("time_embed.2"), temb, temb, true)?,
        );
        let label_emb = match cfg.adm_in_channels {
            Some(adm) => Some((
                Linear::load(vb.pp("label_emb.0.0"), adm, temb, true)?,
                Linear::load(vb.pp("label_emb.0.2"), temb, temb, true)?,
            )),
            None => None,
        };
        let conv_in = conv(cfg.in_channels, mc, 3, 1, vb.pp("input_blocks.0.0"))?;

        let mut input_blocks = Vec::new();
        let mut skip_chans = vec![mc];
        let mut ch = mc;
        let mut n = 1;
        let levels = cfg.channel_mult.len();
        for (level, (&mult, &depth)) in cfg
            .channel_mult
            .iter()
            .zip(&cfg.transformer_depth)
            .enumerate()
        {
            for _ in 0..cfg.num_res_blocks {
                let bvb = vb.pp(format!("input_blocks.{n}"));
                let out = mult * mc;
                let mut layers = vec![Layer::res(bvb.pp("0"), ch, out, temb)?];
                ch = out;
                if depth > 0 {
                    layers.push(Layer::Attn(SpatialTransformer::load(
                        bvb.pp("1"),
                        ch,
                        depth,
                        cfg,
                    )?));
                }
                input_blocks.push(layers);
                skip_chans.push(ch);
                n += 1;
            }
            if level + 1 < levels {
                let c = conv(ch, ch, 3, 2, vb.pp(format!("input_blocks.{n}.0.op")))?;
                input_blocks.push(vec![Layer::Down(c)]);
                skip_chans.push(ch);
                n += 1;
            }
        }

        let mvb = vb.pp("middle_block");
        let mut middle = vec![Layer::res(mvb.pp("0"), ch, ch, temb)?];
        if cfg.transformer_depth_middle > 0 {
            middle.push(Layer::Attn(SpatialTransformer::load(
                mvb.pp("1"),
                ch,
                cfg.transformer_depth_middle,
                cfg,
            )?));
            middle.push(Layer::res(mvb.pp("2"), ch, ch, temb)?);
        } else {
            middle.push(Layer::res(mvb.pp("1"), ch, ch, temb)?);
        }

        let mut output_blocks = Vec::new();
        let mut n = 0;
        for level in (0..levels).rev() {
            let out = cfg.channel_mult[level] * mc;
            let depth = cfg.transformer_depth[level];
            for j in 0..=cfg.num_res_blocks {
                let bvb = vb.pp(format!("output_blocks.{n}"));
                let skip = skip_chans
                    .pop()
                    .ok_or_else(|| missing("skip connection bookkeeping"))?;
                let mut layers = vec![Layer::res(bvb.pp("0"), ch + skip, out, temb)?];
                ch = out;
                if depth > 0 {
                    layers.push(Layer::Attn(SpatialTransformer::load(
                        bvb.pp("1"),
                        ch,
                        depth,
                        cfg,
                    )?));
                }
                if level > 0 && j == cfg.num_res_blocks {
                    let idx = layers.len();
                    let c = conv(ch, ch, 3, 1, bvb.pp(format!("{idx}.conv")))?;
                    layers.push(Layer::Up(c));
                }
                output_blocks.push(layers);
                n += 1;
            }
        }

        Ok(UNet {
            cfg: cfg.clone(),
            time_embed,
            label_emb,
            conv_in,
            input_blocks,
            middle,
            output_blocks,
            out_norm: group_norm(ch, 1e-5, vb.pp("out.0"))?,
            out_conv: conv(ch, cfg.out_channels, 3, 1, vb.pp("out.2"))?,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Predict noise (or v) for `x` `[B, C, H, W]` at `timesteps` `[B]` given `context`
    /// `[B, L, context_dim]` and, for SDXL, the vector conditioning `y` `[B, adm_in_channels]`.
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        y: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.cfg.in_channels {
            return Err(EngineError::InvalidParam(format!(
                "UNet expects {} input channels, got {c}",
                self.cfg.in_channels
            )));
        }
        if h == 0 || w == 0 {
            return Err(EngineError::InvalidParam("empty latent".into()));
        }
        let t = if timesteps.dims().is_empty() || timesteps.dim(0)? == 1 && b > 1 {
            timesteps.flatten_all()?.repeat(b)?
        } else {
            timesteps.clone()
        };
        let temb = timestep_embedding(&t, self.cfg.model_channels)?;
        let mut emb = self
            .time_embed
            .1
            .forward(&self.time_embed.0.forward(&temb)?.silu()?)?;
        if let Some((l0, l2)) = &self.label_emb {
            let y = y.ok_or_else(|| {
                EngineError::InvalidParam("this UNet needs vector conditioning (SDXL y)".into())
            })?;
            emb = (emb + l2.forward(&l0.forward(y)?.silu()?)?)?;
        }
        // Every ResBlock applies SiLU before its projection; do it once.
        let emb = emb.silu()?;

        let mut skips = Vec::with_capacity(self.input_blocks.len() + 1);
        let mut hs = self.conv_in.forward(x)?;
        skips.push(hs.clone());
        for blk in &self.input_blocks {
            hs = run(blk, &hs, &emb, context, None)?;
            skips.push(hs.clone());
        }
        hs = run(&self.middle, &hs, &emb, context, None)?;
        for blk in &self.output_blocks {
            let skip = skips
                .pop()
                .ok_or_else(|| missing("skip connection bookkeeping"))?;
            let cat = {
                let _p = prof::scope("cat");
                Tensor::cat(&[&hs, &skip], 1)?
            };
            drop(skip);
            let up_to = match skips.last() {
                Some(next) => {
                    let (_, _, sh, sw) = next.dims4()?;
                    Some((sh, sw))
                }
                None => None,
            };
            hs = run(blk, &cat, &emb, context, up_to)?;
        }
        let out = self.out_norm.forward(&hs, true)?;
        drop(hs);
        self.out_conv.forward(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::UNET_PREFIX;
    use std::collections::BTreeMap;

    fn header_from(shapes: &[(String, Vec<usize>)]) -> Header {
        let mut h = Header::default();
        for (k, s) in shapes {
            h.tensors.insert(
                format!("{UNET_PREFIX}{k}"),
                crate::safetensors_file::TensorInfo {
                    dtype: crate::safetensors_file::Dtype::F16,
                    shape: s.clone(),
                    data_offsets: (0, 0),
                },
            );
        }
        h
    }

    #[test]
    fn detect_roundtrips_reference_configs() {
        for (cfg, fam) in [
            (UNetConfig::sd15(), Family::Sd1),
            (UNetConfig::sd2(), Family::Sd2),
            (UNetConfig::sdxl(), Family::Sdxl),
        ] {
            let shapes = cfg.param_shapes();
            let h = header_from(&shapes);
            let got = UNetConfig::detect(&h, UNET_PREFIX, fam).expect("detect");
            assert_eq!(got, cfg);
        }
    }

    #[test]
    fn sd15_param_count_and_names() {
        let shapes = UNetConfig::sd15().param_shapes();
        let n: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // SD 1.5's UNet has 859,520,964 parameters.
        assert_eq!(n, 859_520_964);
        let names: BTreeMap<_, _> = shapes.into_iter().collect();
        assert_eq!(
            names["output_blocks.2.1.conv.weight"],
            vec![1280, 1280, 3, 3]
        );
        assert_eq!(
            names["input_blocks.1.1.proj_in.weight"],
            vec![320, 320, 1, 1]
        );
        assert_eq!(
            names["middle_block.1.transformer_blocks.0.attn2.to_k.weight"],
            vec![1280, 768]
        );
        assert_eq!(names["output_blocks.8.2.conv.weight"], vec![640, 640, 3, 3]);
    }

    #[test]
    fn sdxl_param_count() {
        let shapes = UNetConfig::sdxl().param_shapes();
        let n: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // SDXL base UNet: 2,567,463,684 parameters.
        assert_eq!(n, 2_567_463_684);
    }

    #[test]
    fn timestep_embedding_is_cos_then_sin() {
        let t = Tensor::new(&[0f32, 10.0], &Device::Cpu).expect("t");
        let e = timestep_embedding(&t, 8)
            .expect("emb")
            .to_vec2::<f32>()
            .expect("v");
        assert_eq!(&e[0][..4], &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!(&e[0][4..], &[0.0, 0.0, 0.0, 0.0]);
        // i = 1: f = 10000^(-1/4) = 0.1 → arg 1.0
        assert!((e[1][1] - 1f32.cos()).abs() < 1e-6);
        assert!((e[1][5] - 1f32.sin()).abs() < 1e-6);
        let y = sdxl_vector(
            &Tensor::zeros(4, DType::F32, &Device::Cpu).expect("z"),
            (1024, 1024),
            (0, 0),
            (1024, 1024),
        )
        .expect("y");
        assert_eq!(y.dims(), &[1, 4 + 6 * 256]);
    }
}
