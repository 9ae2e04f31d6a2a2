//! The LDM `AutoencoderKL` (SD 1.x / 2.x / SDXL VAE) in the original single-file key layout
//! (`first_stage_model.`): `encoder.down.N.block.M`, `decoder.up.N.block.M`, `mid.block_1`,
//! `mid.attn_1`, `quant_conv`, `post_quant_conv`, ...
//!
//! Decoder up-blocks keep the LDM numbering: `decoder.up.0` is the full-resolution level (the
//! last one run), which is the reverse of diffusers' `up_blocks` order.
//!
//! Memory: intermediates are dropped as soon as the next one exists, GroupNorm(+SiLU) is one fused
//! pass ([`GroupNorm`]), and the mid attention goes through the chunked [`attention::sdpa`].

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::models::attention;
use crate::models::ops::Linear;
pub use crate::models::ops::{Conv2d, GroupNorm};
use crate::safetensors_file::Header;
use crate::{EngineError, Family, Result};

/// Latent scaling factor of each family's VAE (latents fed to the UNet are `z * factor`).
pub fn scaling_factor(family: Family) -> f64 {
    match family {
        Family::Sd1 | Family::Sd2 => 0.18215,
        Family::Sdxl => 0.13025,
    }
}

const GN_GROUPS: usize = 32;
const GN_EPS: f64 = 1e-6;

/// Widths and depth of an LDM autoencoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaeConfig {
    /// Base channel count (128 in SD).
    pub ch: usize,
    /// Channel multiplier per resolution level ([1, 2, 4, 4] in SD).
    pub ch_mult: Vec<usize>,
    /// Resnet blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Latent channels (4 in SD); `embed_dim` is assumed equal, as in every SD VAE.
    pub z_channels: usize,
    pub in_channels: usize,
    pub out_channels: usize,
}

fn unknown(msg: String) -> EngineError {
    EngineError::UnknownModel(msg)
}

impl VaeConfig {
    /// The VAE of SD 1.x, 2.x and SDXL.
    pub fn sd() -> Self {
        Self {
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 4,
            in_channels: 3,
            out_channels: 3,
        }
    }

    /// Detects the configuration from the tensors under `prefix` (normally `first_stage_model.`).
    pub fn detect(header: &Header, prefix: &str) -> Result<Self> {
        Self::detect_with(&|name| header.shape(name).map(<[usize]>::to_vec), prefix)
    }

    /// [`VaeConfig::detect`] over any shape lookup (full tensor name → shape).
    pub fn detect_with(
        shape_of: &dyn Fn(&str) -> Option<Vec<usize>>,
        prefix: &str,
    ) -> Result<Self> {
        let get = |rel: &str| shape_of(&format!("{prefix}{rel}"));
        let need4 = |rel: &str| -> Result<Vec<usize>> {
            match get(rel) {
                Some(s) if s.len() == 4 => Ok(s),
                Some(s) => Err(unknown(format!(
                    "{prefix}{rel} has shape {s:?}, expected a conv"
                ))),
                None => Err(unknown(format!("missing tensor {prefix}{rel}"))),
            }
        };
        let conv_in = need4("encoder.conv_in.weight")?;
        let (ch, in_channels) = (conv_in[0], conv_in[1]);
        let mut ch_mult = Vec::new();
        while let Some(s) = get(&format!(
            "encoder.down.{}.block.0.conv1.weight",
            ch_mult.len()
        )) {
            let out = s.first().copied().unwrap_or(0);
            if ch == 0 || out == 0 || !out.is_multiple_of(ch) {
                return Err(unknown(format!(
                    "VAE level {} width {out} is not a multiple of {ch}",
                    ch_mult.len()
                )));
            }
            ch_mult.push(out / ch);
        }
        if ch_mult.is_empty() {
            return Err(unknown(format!("no VAE encoder blocks under {prefix:?}")));
        }
        let mut num_res_blocks = 0;
        while get(&format!(
            "encoder.down.0.block.{num_res_blocks}.conv1.weight"
        ))
        .is_some()
        {
            num_res_blocks += 1;
        }
        let z_channels = need4("decoder.conv_in.weight")?[1];
        let quant = need4("quant_conv.weight")?;
        if quant[0] != 2 * z_channels || quant[1] != 2 * z_channels {
            return Err(unknown(format!(
                "{prefix}quant_conv.weight has shape {quant:?}; expected {} latent channels",
                z_channels
            )));
        }
        let out_channels = need4("decoder.conv_out.weight")?[0];
        let cfg = Self {
            ch,
            ch_mult,
            num_res_blocks,
            z_channels,
            in_channels,
            out_channels,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let widths = self.ch_mult.iter().map(|m| m * self.ch);
        if self.num_res_blocks == 0
            || self.z_channels == 0
            || widths
                .clone()
                .any(|w| w == 0 || !w.is_multiple_of(GN_GROUPS))
        {
            return Err(unknown(format!(
                "unsupported VAE shape {self:?} (widths must be positive multiples of {GN_GROUPS})"
            )));
        }
        Ok(())
    }

    fn width(&self, level: usize) -> usize {
        self.ch * self.ch_mult[level]
    }

    /// Every tensor with its shape, names relative to the prefix, as LDM checkpoints store them
    /// (attention projections as 1×1 convs).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<(String, Vec<usize>)> = Vec::new();
        fn conv(v: &mut Vec<(String, Vec<usize>)>, name: &str, o: usize, i: usize, k: usize) {
            v.push((format!("{name}.weight"), vec![o, i, k, k]));
            v.push((format!("{name}.bias"), vec![o]));
        }
        fn norm(v: &mut Vec<(String, Vec<usize>)>, name: &str, c: usize) {
            v.push((format!("{name}.weight"), vec![c]));
            v.push((format!("{name}.bias"), vec![c]));
        }
        fn res(v: &mut Vec<(String, Vec<usize>)>, name: &str, i: usize, o: usize) {
            norm(v, &format!("{name}.norm1"), i);
            conv(v, &format!("{name}.conv1"), o, i, 3);
            norm(v, &format!("{name}.norm2"), o);
            conv(v, &format!("{name}.conv2"), o, o, 3);
            if i != o {
                conv(v, &format!("{name}.nin_shortcut"), o, i, 1);
            }
        }
        fn mid(v: &mut Vec<(String, Vec<usize>)>, name: &str, c: usize) {
            res(v, &format!("{name}.block_1"), c, c);
            norm(v, &format!("{name}.attn_1.norm"), c);
            for p in ["q", "k", "v", "proj_out"] {
                conv(v, &format!("{name}.attn_1.{p}"), c, c, 1);
            }
            res(v, &format!("{name}.block_2"), c, c);
        }
        let levels = self.ch_mult.len();
        let top = self.width(levels - 1);
        let z = self.z_channels;

        conv(&mut v, "encoder.conv_in", self.ch, self.in_channels, 3);
        let mut cin = self.ch;
        for l in 0..levels {
            let cout = self.width(l);
            for b in 0..self.num_res_blocks {
                res(&mut v, &format!("encoder.down.{l}.block.{b}"), cin, cout);
                cin = cout;
            }
            if l + 1 != levels {
                conv(
                    &mut v,
                    &format!("encoder.down.{l}.downsample.conv"),
                    cout,
                    cout,
                    3,
                );
            }
        }
        mid(&mut v, "encoder.mid", top);
        norm(&mut v, "encoder.norm_out", top);
        conv(&mut v, "encoder.conv_out", 2 * z, top, 3);

        conv(&mut v, "decoder.conv_in", top, z, 3);
        mid(&mut v, "decoder.mid", top);
        let mut cin = top;
        for l in (0..levels).rev() {
            let cout = self.width(l);
            for b in 0..=self.num_res_blocks {
                res(&mut v, &format!("decoder.up.{l}.block.{b}"), cin, cout);
                cin = cout;
            }
            if l != 0 {
                conv(
                    &mut v,
                    &format!("decoder.up.{l}.upsample.conv"),
                    cout,
                    cout,
                    3,
                );
            }
        }
        norm(&mut v, "decoder.norm_out", self.ch);
        conv(&mut v, "decoder.conv_out", self.out_channels, self.ch, 3);

        conv(&mut v, "quant_conv", 2 * z, 2 * z, 1);
        conv(&mut v, "post_quant_conv", z, z, 1);
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Building blocks.

fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    padding: usize,
    stride: usize,
) -> Result<Conv2d> {
    Conv2d::load(vb, cin, cout, k, padding, stride)
}

fn norm(vb: VarBuilder, c: usize) -> Result<GroupNorm> {
    GroupNorm::load(vb, c, GN_GROUPS, GN_EPS)
}

struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResBlock {
    fn load(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            norm1: norm(vb.pp("norm1"), cin)?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: norm(vb.pp("norm2"), cout)?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout {
                Some(conv(vb.pp("nin_shortcut"), cin, cout, 1, 0, 1)?)
            } else {
                None
            },
        })
    }

    /// The shortcut is conv2's residual (added as the GEMM's starting value).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let n = self.norm2.forward(&h, true)?;
        drop(h);
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_with(&n, Some(&skip), None)
    }
}

/// One projection of the mid attention, stored as a 1×1 conv `[C, C, 1, 1]` or a linear `[C, C]`.
fn attn_proj(vb: &VarBuilder, name: &str, c: usize) -> Result<Linear> {
    let w = vb.get_unchecked(&format!("{name}.weight"))?;
    let w = match w.dims() {
        [o, i, 1, 1] | [o, i] if *o == c && *i == c => w.reshape((c, c))?,
        d => {
            return Err(unknown(format!(
                "VAE attention weight {name} has shape {d:?}, expected [{c}, {c}(, 1, 1)]"
            )))
        }
    };
    Linear::new(
        w.to_dtype(vb.dtype())?.contiguous()?,
        Some(vb.get(c, &format!("{name}.bias"))?),
    )
}

struct AttnBlock {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    proj: Linear,
}

impl AttnBlock {
    fn load(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            norm: norm(vb.pp("norm"), c)?,
            q: attn_proj(&vb, "q", c)?,
            k: attn_proj(&vb, "k", c)?,
            v: attn_proj(&vb, "v", c)?,
            proj: attn_proj(&vb, "proj_out", c)?,
        })
    }

    /// Single-head attention over the `H·W` positions; the projections read and write NCHW
    /// directly and the input is the output projection's residual.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let n = self.norm.forward(x, false)?;
        let q = self.q.forward_nchw_to_seq(&n)?.unsqueeze(1)?;
        let k = self.k.forward_nchw_to_seq(&n)?.unsqueeze(1)?;
        let v = self.v.forward_nchw_to_seq(&n)?.unsqueeze(1)?;
        drop(n);
        let o = attention::sdpa(&q, &k, &v)?.squeeze(1)?;
        drop((q, k, v));
        self.proj.forward_seq_to_nchw(&o, (h, w), Some(x))
    }
}

struct Mid {
    block_1: ResBlock,
    attn_1: AttnBlock,
    block_2: ResBlock,
}

impl Mid {
    fn load(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            block_1: ResBlock::load(vb.pp("block_1"), c, c)?,
            attn_1: AttnBlock::load(vb.pp("attn_1"), c)?,
            block_2: ResBlock::load(vb.pp("block_2"), c, c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(x)?;
        let h = self.attn_1.forward(&h)?;
        self.block_2.forward(&h)
    }
}

struct Level {
    blocks: Vec<ResBlock>,
    /// Downsample (encoder) or upsample (decoder) conv.
    resample: Option<Conv2d>,
}

struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let levels = cfg.ch_mult.len();
        let mut down = Vec::with_capacity(levels);
        let mut cin = cfg.ch;
        for l in 0..levels {
            let cout = cfg.width(l);
            let lvb = vb.pp(format!("down.{l}"));
            let mut blocks = Vec::with_capacity(cfg.num_res_blocks);
            for b in 0..cfg.num_res_blocks {
                blocks.push(ResBlock::load(lvb.pp(format!("block.{b}")), cin, cout)?);
                cin = cout;
            }
            // Stride-2 conv without padding; forward pads right/bottom by one first.
            let resample = if l + 1 != levels {
                Some(conv(lvb.pp("downsample.conv"), cout, cout, 3, 0, 2)?)
            } else {
                None
            };
            down.push(Level { blocks, resample });
        }
        let top = cfg.width(levels - 1);
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cfg.in_channels, cfg.ch, 3, 1, 1)?,
            down,
            mid: Mid::load(vb.pp("mid"), top)?,
            norm_out: norm(vb.pp("norm_out"), top)?,
            conv_out: conv(vb.pp("conv_out"), top, 2 * cfg.z_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            for block in &level.blocks {
                h = block.forward(&h)?;
            }
            if let Some(ds) = &level.resample {
                h = ds.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward(&h, true)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    /// Indexed by LDM level: `up[0]` is full resolution and runs last.
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let levels = cfg.ch_mult.len();
        let top = cfg.width(levels - 1);
        let mut up: Vec<Option<Level>> = (0..levels).map(|_| None).collect();
        let mut cin = top;
        for l in (0..levels).rev() {
            let cout = cfg.width(l);
            let lvb = vb.pp(format!("up.{l}"));
            let mut blocks = Vec::with_capacity(cfg.num_res_blocks + 1);
            for b in 0..=cfg.num_res_blocks {
                blocks.push(ResBlock::load(lvb.pp(format!("block.{b}")), cin, cout)?);
                cin = cout;
            }
            let resample = if l != 0 {
                Some(conv(lvb.pp("upsample.conv"), cout, cout, 3, 1, 1)?)
            } else {
                None
            };
            up[l] = Some(Level { blocks, resample });
        }
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cfg.z_channels, top, 3, 1, 1)?,
            mid: Mid::load(vb.pp("mid"), top)?,
            up: up.into_iter().flatten().collect(),
            norm_out: norm(vb.pp("norm_out"), cfg.ch)?,
            conv_out: conv(vb.pp("conv_out"), cfg.ch, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid.forward(&h)?;
        for level in self.up.iter().rev() {
            for block in &level.blocks {
                h = block.forward(&h)?;
            }
            if let Some(us) = &level.resample {
                let (_, _, hh, ww) = h.dims4()?;
                let up = h.upsample_nearest2d(hh * 2, ww * 2)?;
                drop(h);
                h = us.forward(&up)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&h, true)?)
    }
}

/// The autoencoder with loaded weights.
pub struct Vae {
    cfg: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
}

impl std::fmt::Debug for Vae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vae")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Vae {
    /// Loads the weights; `vb` is already prefixed (`vb.pp("first_stage_model")`).
    pub fn load(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let z = cfg.z_channels;
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Encoder::load(vb.pp("encoder"), cfg)?,
            decoder: Decoder::load(vb.pp("decoder"), cfg)?,
            quant_conv: conv(vb.pp("quant_conv"), 2 * z, 2 * z, 1, 0, 1)?,
            post_quant_conv: conv(vb.pp("post_quant_conv"), z, z, 1, 0, 1)?,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Size multiple that images must have (8 for SD's four levels).
    pub fn downscale(&self) -> usize {
        1 << (self.cfg.ch_mult.len() - 1)
    }

    /// Encodes images `[B, in_channels, H, W]` in -1..1 (H, W multiples of [`Vae::downscale`])
    /// into the latent distribution's `(mean, logvar)`, each `[B, z, H/f, W/f]`, unscaled.
    /// `logvar` is clamped to -30..20 as LDM's `DiagonalGaussianDistribution` does.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, h, w) = x.dims4()?;
        let f = self.downscale();
        if c != self.cfg.in_channels || h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            return Err(EngineError::InvalidParam(format!(
                "VAE encode needs [B, {}, H, W] with H, W multiples of {f}; got {:?}",
                self.cfg.in_channels,
                x.dims()
            )));
        }
        let moments = self.quant_conv.forward(&self.encoder.forward(x)?)?;
        let z = self.cfg.z_channels;
        let mean = moments.narrow(1, 0, z)?.contiguous()?;
        let logvar = moments.narrow(1, z, z)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Decodes latents `[B, z, h, w]` (already divided by the scaling factor) into images
    /// `[B, out_channels, h·f, w·f]`, nominally in -1..1 (not clamped).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        // The scratch pooled by the UNet steps has the wrong sizes for the decoder: holding it
        // through the decode (the peak of a generation) would only add to peak RSS.
        crate::models::ops::release_scratch();
        let (_, c, _, _) = z.dims4()?;
        if c != self.cfg.z_channels {
            return Err(EngineError::InvalidParam(format!(
                "VAE decode needs {} latent channels, got {:?}",
                self.cfg.z_channels,
                z.dims()
            )));
        }
        let z = self.post_quant_conv.forward(z)?;
        self.decoder.forward(&z)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::models::clip::tests::{header_of, random_weights};

    fn tiny() -> VaeConfig {
        VaeConfig {
            ch: 32,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            z_channels: 4,
            in_channels: 3,
            out_channels: 3,
        }
    }

    fn rand_input(shape: &[usize], seed: u64) -> Tensor {
        let w = random_weights(&[("x".into(), shape.to_vec())], "", seed);
        (w["x"].clone() * 4.0).expect("scale")
    }

    #[test]
    fn scaling_factors() {
        assert_eq!(scaling_factor(Family::Sd1), 0.18215);
        assert_eq!(scaling_factor(Family::Sd2), 0.18215);
        assert_eq!(scaling_factor(Family::Sdxl), 0.13025);
    }

    #[test]
    fn detect_round_trips_param_shapes() {
        for cfg in [tiny(), VaeConfig::sd()] {
            let header = header_of(&cfg.param_shapes(), "first_stage_model.");
            assert_eq!(
                VaeConfig::detect(&header, "first_stage_model.").expect("detect"),
                cfg
            );
        }
        let shapes = VaeConfig::sd().param_shapes();
        // 248 tensors in the SD VAE, like real checkpoints.
        assert_eq!(shapes.len(), 248);
        assert!(VaeConfig::detect(&Header::default(), "first_stage_model.").is_err());
    }

    #[test]
    fn encode_decode_shapes_and_linear_attention_weights() {
        let cfg = tiny();
        let mut w = random_weights(&cfg.param_shapes(), "", 11);
        let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
        let vae = Vae::load(vb, &cfg).expect("load");
        let x = rand_input(&[1, 3, 16, 8], 1).tanh().expect("tanh");
        let (mean, logvar) = vae.encode(&x).expect("encode");
        assert_eq!(mean.dims(), &[1, 4, 8, 4]);
        assert_eq!(logvar.dims(), &[1, 4, 8, 4]);
        let img = vae.decode(&mean).expect("decode");
        assert_eq!(img.dims(), &[1, 3, 16, 8]);

        // The same weights with attention projections stored as [C, C] give the same result.
        for (name, t) in w.iter_mut() {
            if name.contains("attn_1.") && name.ends_with("weight") && t.rank() == 4 {
                *t = t.squeeze(3).expect("sq").squeeze(2).expect("sq");
            }
        }
        let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
        let vae2 = Vae::load(vb, &cfg).expect("load linear");
        let img2 = vae2.decode(&mean).expect("decode");
        let diff = (&img - &img2)
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max");
        assert_eq!(diff.to_scalar::<f32>().expect("s"), 0.0);

        // Wrong input shapes are errors, not panics.
        assert!(vae.encode(&rand_input(&[1, 3, 15, 8], 2)).is_err());
        assert!(vae.decode(&rand_input(&[1, 3, 4, 4], 2)).is_err());
    }
}
