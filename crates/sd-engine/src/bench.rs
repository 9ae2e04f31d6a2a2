//! The engine's benchmark harness (`sd-host bench`, SPEC §10; issue 9).
//!
//! Builds a family's networks at full size with random weights (no file needed) or at the tiny
//! test widths, or loads a real checkpoint, and times what a generation costs: text encoding,
//! one UNet step with classifier-free guidance (batch 2, as diffusers' pipelines and the peer
//! script `peer_diffusers.py` run it), one VAE decode, and a whole image for a given step count.
//! Also reports the process's peak resident memory (VmHWM), so the random weights are real
//! allocations, not broadcast views: weight values do not change the arithmetic, but they must
//! occupy memory like a loaded checkpoint for the RSS figure to mean anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::api::{Backend, CheckpointInfo, Control, Family, GenerateParams};
use crate::checkpoint::SEQ_LEN;
use crate::detect::{UNET_PREFIX, VAE_PREFIX};
use crate::models::clip::{clip_heads_for, ClipConfig, ClipLayout, ClipTextModel};
use crate::models::unet::{sdxl_vector, UNet, UNetConfig};
use crate::models::vae::{scaling_factor, Vae, VaeConfig};
use crate::pipeline::{scheduler_config, CpuEngine};
use crate::text::conditioning::{encode_pair, ChunkEncoder};
use crate::text::tokenizer::{ClipTokenizer, BOS, EOS};
use crate::tiny::{self, TinySpec};
use crate::{EngineError, Result};

/// Prompt pair used for every timed text encode and end-to-end image.
const PROMPT: &str = "a photograph of an astronaut riding a horse on the moon, highly detailed";
const NEGATIVE: &str = "blurry, low quality";
/// Sampler for end-to-end images (the API default); its own cost is negligible next to the UNet.
const SAMPLER: &str = "DPM++ 2M";
const GUIDANCE: f64 = 7.0;

/// Network widths to build when no checkpoint is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchSize {
    /// The real architecture of the family (SD 1.5, SD 2.x, SDXL base).
    Full,
    /// The tiny test-checkpoint widths ([`crate::tiny::TinySpec`]); fast, for smoke tests.
    Tiny,
}

impl BenchSize {
    pub fn as_str(self) -> &'static str {
        match self {
            BenchSize::Full => "full",
            BenchSize::Tiny => "tiny",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(BenchSize::Full),
            "tiny" => Ok(BenchSize::Tiny),
            other => Err(EngineError::InvalidParam(format!(
                "bench size must be full or tiny, got {other:?}"
            ))),
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Architecture to build (ignored when `checkpoint` is set: the file decides).
    pub family: Family,
    pub size: BenchSize,
    /// Image edge in pixels (square); a positive multiple of 8.
    pub res: u32,
    /// Sampling steps of the end-to-end image; 0 skips the end-to-end figure.
    pub steps: u32,
    /// Timed UNet steps after one untimed warm-up step.
    pub unet_iters: u32,
    /// Load this single-file checkpoint instead of building random weights.
    pub checkpoint: Option<PathBuf>,
    /// Run one untimed VAE decode before the timed one (as the peer script does). Turning it off
    /// saves a minute per run at SDXL 1024 px.
    pub vae_warmup: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            family: Family::Sd1,
            size: BenchSize::Full,
            res: 256,
            steps: 20,
            unet_iters: 3,
            checkpoint: None,
            vae_warmup: true,
        }
    }
}

/// Everything [`run`] measured. Times are wall-clock seconds.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub family: Family,
    /// `full`, `tiny` or `checkpoint`.
    pub size: String,
    pub checkpoint: Option<String>,
    pub res: u32,
    /// Worker threads candle and the engine's kernels use (`RAYON_NUM_THREADS`, else all cores).
    pub threads: usize,
    pub steps: u32,
    /// Building the random weights, or loading the checkpoint file.
    pub load_s: f64,
    /// Encoding the prompt and the negative prompt (after one untimed warm-up encode).
    pub text_encode_s: f64,
    /// Median of `unet_step_s_all`: one UNet forward with batch 2 (CFG).
    pub unet_step_s_median: f64,
    pub unet_step_s_all: Vec<f64>,
    /// One VAE decode of a single latent to a `res`×`res` image.
    pub vae_decode_s: f64,
    /// CPU seconds (user + system, all threads) of the median UNet step and of the VAE decode:
    /// less sensitive than wall time to other processes on a busy machine (but counts spinning).
    pub unet_step_cpu_s_median: f64,
    pub vae_decode_cpu_s: f64,
    /// One image of `steps` steps: text encode + sampling + decode. `None` when `steps` is 0.
    pub end_to_end_s: Option<f64>,
    /// Peak resident set (VmHWM) of the whole process at the end.
    pub peak_rss_bytes: u64,
    /// VmHWM after loading / after the UNet steps / after the VAE decode (monotonic).
    pub peak_rss_after_load_bytes: u64,
    pub peak_rss_after_unet_bytes: u64,
    pub peak_rss_after_vae_bytes: u64,
    pub unet_params: u64,
    pub vae_params: u64,
    pub text_params: u64,
    pub total_params: u64,
}

impl BenchReport {
    /// A human-readable summary, one figure per line.
    pub fn table(&self) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        let mut s = String::new();
        let mut row = |k: &str, v: String| s.push_str(&format!("{k:<26} {v}\n"));
        row(
            "model",
            format!(
                "{} ({}{})",
                self.family.as_str(),
                self.size,
                self.checkpoint
                    .as_deref()
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default()
            ),
        );
        row(
            "parameters",
            format!(
                "{:.1} M (UNet {:.1} M, VAE {:.1} M, text {:.1} M)",
                self.total_params as f64 / 1e6,
                self.unet_params as f64 / 1e6,
                self.vae_params as f64 / 1e6,
                self.text_params as f64 / 1e6
            ),
        );
        row("resolution", format!("{0}×{0}", self.res));
        row("threads", self.threads.to_string());
        row("load", format!("{:.3} s", self.load_s));
        row("text encode", format!("{:.3} s", self.text_encode_s));
        row(
            "UNet step (batch 2)",
            format!(
                "{:.3} s ({:.2} CPU s) median of {:?}",
                self.unet_step_s_median,
                self.unet_step_cpu_s_median,
                self.unet_step_s_all
                    .iter()
                    .map(|t| (t * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>()
            ),
        );
        row(
            "VAE decode",
            format!(
                "{:.3} s ({:.2} CPU s)",
                self.vae_decode_s, self.vae_decode_cpu_s
            ),
        );
        row(
            "end to end",
            match self.end_to_end_s {
                Some(t) => format!("{t:.3} s per image, {} steps", self.steps),
                None => "skipped (0 steps)".into(),
            },
        );
        row(
            "peak RSS",
            format!(
                "{:.2} GB (after load {:.2}, UNet {:.2}, VAE {:.2})",
                gb(self.peak_rss_bytes),
                gb(self.peak_rss_after_load_bytes),
                gb(self.peak_rss_after_unet_bytes),
                gb(self.peak_rss_after_vae_bytes)
            ),
        );
        s
    }
}

/// A `/proc/self/status` field in bytes (`VmHWM`, `VmRSS`); 0 where unavailable.
pub fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The process's peak resident set size so far, in bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM")
}

/// CPU time (user + system, all threads) this process has used, in seconds; 0 where
/// `/proc/self/stat` is unavailable. Clock ticks are taken as 100 Hz (Linux `USER_HZ`).
pub fn process_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are fields 14, 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

fn bad(msg: impl Into<String>) -> EngineError {
    EngineError::InvalidParam(msg.into())
}

/// How one text encoder is used (same conventions as the checkpoint loader: SD 1.x last layer
/// with final norm; SD 2.x penultimate with final norm; SDXL penultimate without, pooled from
/// OpenCLIP-G).
struct EncoderUse {
    pad: u32,
    base_skip: usize,
    final_norm: bool,
}

/// Random-weight text encoders behind the same [`ChunkEncoder`] interface the pipeline uses.
struct BenchText {
    family: Family,
    encoders: Vec<(ClipTextModel, EncoderUse)>,
}

impl ChunkEncoder for BenchText {
    fn encode_chunk(&self, tokens: &[u32], clip_skip: usize) -> Result<(Tensor, Option<Tensor>)> {
        if tokens.len() > SEQ_LEN - 2 {
            return Err(bad("prompt chunk too long"));
        }
        let mut hiddens = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for (enc, usage) in &self.encoders {
            let mut ids = Vec::with_capacity(SEQ_LEN);
            ids.push(BOS);
            ids.extend_from_slice(tokens);
            ids.push(EOS);
            ids.resize(SEQ_LEN, usage.pad);
            let ids = Tensor::from_vec(ids, (1, SEQ_LEN), &Device::Cpu)?;
            let skip = usage.base_skip + clip_skip.max(1);
            if self.family == Family::Sdxl && enc.config().projection_dim.is_some() {
                let (h, p) = enc.forward(&ids, skip, usage.final_norm)?;
                hiddens.push(h.squeeze(0)?);
                pooled = Some(p.squeeze(0)?);
            } else {
                hiddens.push(
                    enc.forward_hidden(&ids, skip, usage.final_norm)?
                        .squeeze(0)?,
                );
            }
        }
        let hidden = if hiddens.len() == 1 {
            hiddens.remove(0)
        } else {
            Tensor::cat(&hiddens, 1)?
        };
        Ok((hidden, pooled))
    }

    fn hidden_parts(&self) -> Vec<usize> {
        if self.encoders.len() > 1 {
            self.encoders
                .iter()
                .map(|(e, _)| e.config().hidden)
                .collect()
        } else {
            Vec::new()
        }
    }
}

/// splitmix64, seeded per tensor from its name: fast enough to fill SDXL's 3.5 G weights in
/// seconds, and deterministic.
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

fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A real, fully allocated tensor for parameter `name`: norm scales (1-D `*weight`) are 1,
/// scalars 1, everything else uniform with standard deviation 0.02 (keeps activations tame
/// through the residual stacks, so timings are not disturbed by NaN/denormal arithmetic).
fn random_param(name: &str, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values = if shape.is_empty() || (shape.len() == 1 && name.ends_with("weight")) {
        vec![1f32; n]
    } else {
        let mut rng = SplitMix(name_seed(name));
        let a = 0.02f32 * 3f32.sqrt();
        let scale = 2.0 * a / (1u32 << 24) as f32;
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let r = rng.next_u64();
            v.push((r >> 40) as f32 * scale - a);
            if v.len() < n {
                v.push(((r >> 8) & 0xFF_FFFF) as f32 * scale - a);
            }
        }
        v
    };
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Weights made on demand, one tensor at a time as the network asks for it, like a checkpoint
/// read from its memory map: a map of every tensor made up front would sit beside the network's
/// own (repacked) copies while it is built and inflate the peak RSS the bench reports.
struct RandomBackend {
    shapes: HashMap<String, Vec<usize>>,
}

impl RandomBackend {
    fn make(&self, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        random_param(name, shape)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_dtype(dtype)
    }
}

impl candle_nn::var_builder::SimpleBackend for RandomBackend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.make(name, dtype)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name}: the network wants {s:?}, the architecture lists {:?}",
                t.shape()
            );
        }
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.make(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

fn random_vb(shapes: &[(String, Vec<usize>)]) -> Result<VarBuilder<'static>> {
    let backend = RandomBackend {
        shapes: shapes.iter().cloned().collect(),
    };
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        Device::Cpu,
    ))
}

fn count(shapes: &[(String, Vec<usize>)]) -> u64 {
    shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

/// The architecture [`run`] builds for a family and size.
struct Arch {
    unet: UNetConfig,
    vae: VaeConfig,
    /// Text encoders in conditioning order.
    clips: Vec<(ClipConfig, EncoderUse)>,
}

fn tiny_clip_config(c: &tiny::TinyClip) -> ClipConfig {
    let layout = match c.layout {
        tiny::ClipLayout::OpenAi => ClipLayout::OpenAi,
        tiny::ClipLayout::OpenClip => ClipLayout::OpenClip,
    };
    ClipConfig {
        layout,
        vocab_size: c.vocab,
        max_position: c.max_len,
        hidden: c.hidden,
        layers: c.layers,
        heads: clip_heads_for(c.hidden),
        intermediate: c.intermediate,
        projection_dim: (layout == ClipLayout::OpenClip).then_some(c.projection),
    }
}

fn arch(family: Family, size: BenchSize) -> Arch {
    let openai = |base_skip, final_norm| EncoderUse {
        pad: EOS,
        base_skip,
        final_norm,
    };
    let openclip = |base_skip, final_norm| EncoderUse {
        pad: 0,
        base_skip,
        final_norm,
    };
    let uses = match family {
        Family::Sd1 => vec![openai(0, true)],
        Family::Sd2 => vec![openclip(1, true)],
        Family::Sdxl => vec![openai(1, false), openclip(1, false)],
    };
    match size {
        BenchSize::Full => {
            let (unet, clips) = match family {
                Family::Sd1 => (UNetConfig::sd15(), vec![ClipConfig::clip_l()]),
                Family::Sd2 => (UNetConfig::sd2(), vec![ClipConfig::open_clip_h()]),
                Family::Sdxl => (
                    UNetConfig::sdxl(),
                    vec![ClipConfig::clip_l(), ClipConfig::open_clip_big_g()],
                ),
            };
            Arch {
                unet,
                vae: VaeConfig::sd(),
                clips: clips.into_iter().zip(uses).collect(),
            }
        }
        BenchSize::Tiny => {
            let spec = TinySpec::new(family, false);
            Arch {
                unet: spec.unet.clone(),
                vae: VaeConfig {
                    ch: spec.vae.ch,
                    ch_mult: spec.vae.ch_mult.clone(),
                    num_res_blocks: spec.vae.num_res_blocks,
                    z_channels: spec.vae.z_channels,
                    in_channels: 3,
                    out_channels: 3,
                },
                clips: spec
                    .clips
                    .iter()
                    .map(|(_, c)| tiny_clip_config(c))
                    .zip(uses)
                    .collect(),
            }
        }
    }
}

/// Random-weight networks built in memory.
struct RandomModels {
    family: Family,
    unet: UNet,
    vae: Vae,
    text: BenchText,
    params: (u64, u64, u64),
}

fn build_random(family: Family, size: BenchSize) -> Result<RandomModels> {
    let a = arch(family, size);
    // One network at a time, so the transient name→tensor map never holds two models.
    let shapes = a.unet.param_shapes();
    let unet_params = count(&shapes);
    let unet = UNet::load(random_vb(&shapes)?, &a.unet)?;
    let shapes = a.vae.param_shapes();
    let vae_params = count(&shapes);
    let vae = Vae::load(random_vb(&shapes)?, &a.vae)?;
    let mut text_params = 0;
    let mut encoders = Vec::with_capacity(a.clips.len());
    for (cfg, usage) in a.clips {
        let shapes = cfg.param_shapes();
        text_params += count(&shapes);
        encoders.push((ClipTextModel::load(random_vb(&shapes)?, &cfg)?, usage));
    }
    Ok(RandomModels {
        family,
        unet,
        vae,
        text: BenchText { family, encoders },
        params: (unet_params, vae_params, text_params),
    })
}

/// Borrowed networks, from random weights or a loaded checkpoint.
struct Nets<'a> {
    family: Family,
    unet: &'a UNet,
    vae: &'a Vae,
    text: &'a dyn ChunkEncoder,
}

/// CFG conditioning `[2, L, D]` (uncond, cond) and, for SDXL, the vector `[2, adm]`.
fn encode(nets: &Nets, tok: &ClipTokenizer, res: u32) -> Result<(Tensor, Option<Tensor>)> {
    let (cond, uncond) = encode_pair(tok, nets.text, PROMPT, NEGATIVE, 1)?;
    let context = Tensor::cat(&[&uncond.context, &cond.context], 0)?;
    let y = if nets.family == Family::Sdxl {
        let vec_of = |p: &Option<Tensor>| -> Result<Tensor> {
            let p = p
                .as_ref()
                .ok_or_else(|| bad("SDXL text encoder gave no pooled output"))?;
            sdxl_vector(p, (res, res), (0, 0), (res, res))
        };
        Some(Tensor::cat(
            &[&vec_of(&uncond.pooled)?, &vec_of(&cond.pooled)?],
            0,
        )?)
    } else {
        None
    };
    Ok((context, y))
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// One txt2img image with random weights, step for step as [`CpuEngine`] makes it
/// (encode, `init_noise_sigma` noise, scale → CFG UNet → guidance → scheduler step, decode).
fn random_image(nets: &Nets, tok: &ClipTokenizer, res: u32, steps: u32) -> Result<Tensor> {
    let (context, y) = encode(nets, tok, res)?;
    let info = CheckpointInfo {
        family: nets.family,
        inpaint: false,
        v_prediction: false,
    };
    let mut sched = crate::sched::create(SAMPLER, None, &scheduler_config(&info), steps as usize)?;
    let timesteps = sched.timesteps().to_vec();
    let l = res as usize / nets.vae.downscale();
    let ch = nets.unet.config().out_channels;
    let noise = Tensor::randn(0f32, 1.0, (1, ch, l, l), &Device::Cpu)?;
    let mut latents = noise.affine(sched.init_noise_sigma(), 0.0)?;
    for (i, &t) in timesteps.iter().enumerate() {
        let x = sched.scale_model_input(&latents, i)?;
        let x = Tensor::cat(&[&x, &x], 0)?;
        let t = Tensor::full(t as f32, 2, &Device::Cpu)?;
        let out = nets.unet.forward(&x, &t, &context, y.as_ref())?;
        let uncond = out.get(0)?.unsqueeze(0)?;
        let cond = out.get(1)?.unsqueeze(0)?;
        let guided = (&uncond + (cond - &uncond)?.affine(GUIDANCE, 0.0)?)?;
        latents = sched.step(&guided, i, &latents, &mut |shape: &[usize]| {
            Ok(Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?)
        })?;
    }
    let z = latents.affine(1.0 / scaling_factor(nets.family), 0.0)?;
    nets.vae.decode(&z)
}

struct Stages {
    text_encode_s: f64,
    unet_all: Vec<f64>,
    unet_cpu: Vec<f64>,
    vae_decode_s: f64,
    vae_cpu_s: f64,
    rss_unet: u64,
    rss_vae: u64,
}

/// Text encode, UNet steps and a VAE decode on already-built networks.
fn time_stages(
    nets: &Nets,
    tok: &ClipTokenizer,
    opts: &BenchOptions,
    log: &mut dyn FnMut(&str),
) -> Result<Stages> {
    encode(nets, tok, opts.res)?; // warm-up
    let t = Instant::now();
    let (context, y) = encode(nets, tok, opts.res)?;
    let text_encode_s = secs(t);
    log(&format!("text encode: {text_encode_s:.3} s"));

    let l = opts.res as usize / nets.vae.downscale();
    let ch = nets.unet.config().in_channels;
    let x = Tensor::randn(0f32, 1.0, (2, ch, l, l), &Device::Cpu)?;
    let ts = Tensor::new(&[500f32, 500.0], &Device::Cpu)?;
    let t = Instant::now();
    let out = nets.unet.forward(&x, &ts, &context, y.as_ref())?;
    check_finite(&out, "UNet output")?;
    log(&format!("UNet warm-up step: {:.3} s", secs(t)));
    let mut unet_all = Vec::with_capacity(opts.unet_iters as usize);
    let mut unet_cpu = Vec::with_capacity(opts.unet_iters as usize);
    for i in 0..opts.unet_iters.max(1) {
        let (t, c) = (Instant::now(), process_cpu_s());
        let out = nets.unet.forward(&x, &ts, &context, y.as_ref())?;
        drop(out);
        unet_all.push(secs(t));
        unet_cpu.push(process_cpu_s() - c);
        log(&format!("UNet step {}: {:.3} s", i + 1, secs(t)));
    }
    let rss_unet = peak_rss_bytes();
    drop((x, context, y));

    let z = Tensor::randn(
        0f32,
        1.0,
        (1, nets.vae.config().z_channels, l, l),
        &Device::Cpu,
    )?;
    if opts.vae_warmup {
        let t = Instant::now();
        nets.vae.decode(&z)?;
        log(&format!("VAE warm-up decode: {:.3} s", secs(t)));
    }
    let (t, c) = (Instant::now(), process_cpu_s());
    let img = nets.vae.decode(&z)?;
    let vae_decode_s = secs(t);
    let vae_cpu_s = process_cpu_s() - c;
    check_finite(&img, "VAE output")?;
    log(&format!("VAE decode: {vae_decode_s:.3} s"));
    Ok(Stages {
        text_encode_s,
        unet_all,
        unet_cpu,
        vae_decode_s,
        vae_cpu_s,
        rss_unet,
        rss_vae: peak_rss_bytes(),
    })
}

fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    let s = t.abs()?.sum_all()?.to_scalar::<f32>()?;
    if s.is_finite() {
        Ok(())
    } else {
        Err(EngineError::Tensor(candle_core::Error::Msg(format!(
            "{what} is not finite"
        ))))
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Parameter counts (UNet, VAE, text) from a checkpoint file's header.
fn file_params(path: &Path) -> Result<(u64, u64, u64)> {
    let header = crate::safetensors_file::read_header(path)?;
    let sum = |prefix: &str| -> u64 {
        header
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, t)| t.numel() as u64)
            .sum()
    };
    Ok((
        sum(UNET_PREFIX),
        sum(VAE_PREFIX),
        sum("cond_stage_model.") + sum("conditioner."),
    ))
}

/// Runs the benchmark; `log` receives a line per stage as it finishes.
pub fn run(opts: &BenchOptions, log: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    if opts.res == 0 || !opts.res.is_multiple_of(8) {
        return Err(bad(format!(
            "resolution must be a positive multiple of 8, got {}",
            opts.res
        )));
    }
    let threads = candle_core::utils::get_num_threads();
    let tok = ClipTokenizer::new();
    let t = Instant::now();
    let (report_base, stages, e2e) = match &opts.checkpoint {
        None => {
            log(&format!(
                "building {} {} networks with random weights",
                opts.family.as_str(),
                opts.size.as_str()
            ));
            let m = build_random(opts.family, opts.size)?;
            let load_s = secs(t);
            let rss_load = peak_rss_bytes();
            log(&format!(
                "built in {load_s:.2} s, peak RSS {:.2} GB",
                rss_load as f64 / 1e9
            ));
            let nets = Nets {
                family: m.family,
                unet: &m.unet,
                vae: &m.vae,
                text: &m.text,
            };
            let stages = time_stages(&nets, &tok, opts, log)?;
            let e2e = if opts.steps > 0 {
                let t = Instant::now();
                let img = random_image(&nets, &tok, opts.res, opts.steps)?;
                check_finite(&img, "image")?;
                Some(secs(t))
            } else {
                None
            };
            (
                (
                    opts.family,
                    opts.size.as_str().to_string(),
                    None,
                    load_s,
                    rss_load,
                    m.params,
                ),
                stages,
                e2e,
            )
        }
        Some(path) => {
            log(&format!("loading {}", path.display()));
            let params = file_params(path)?;
            let mut engine = CpuEngine::new();
            let info = engine.load_checkpoint(path)?;
            let load_s = secs(t);
            let rss_load = peak_rss_bytes();
            log(&format!(
                "loaded {} in {load_s:.2} s, peak RSS {:.2} GB",
                info.family.as_str(),
                rss_load as f64 / 1e9
            ));
            let stages = {
                let ck = engine.checkpoint().ok_or(EngineError::NoCheckpoint)?;
                let nets = Nets {
                    family: ck.info.family,
                    unet: &ck.unet,
                    vae: &ck.vae,
                    text: &ck.text,
                };
                time_stages(&nets, &tok, opts, log)?
            };
            let e2e = if opts.steps > 0 {
                let p = GenerateParams {
                    prompt: PROMPT.into(),
                    negative_prompt: NEGATIVE.into(),
                    width: opts.res,
                    height: opts.res,
                    steps: opts.steps,
                    guidance_scale: GUIDANCE,
                    scheduler: SAMPLER.into(),
                    ..Default::default()
                };
                let t = Instant::now();
                engine.generate(&p, &mut |_| Control::Continue)?;
                Some(secs(t))
            } else {
                None
            };
            (
                (
                    info.family,
                    "checkpoint".to_string(),
                    Some(path.display().to_string()),
                    load_s,
                    rss_load,
                    params,
                ),
                stages,
                e2e,
            )
        }
    };
    if let Some(e) = e2e {
        log(&format!("end to end ({} steps): {e:.3} s", opts.steps));
    }
    let (family, size, checkpoint, load_s, rss_load, (unet_params, vae_params, text_params)) =
        report_base;
    Ok(BenchReport {
        family,
        size,
        checkpoint,
        res: opts.res,
        threads,
        steps: opts.steps,
        load_s,
        text_encode_s: stages.text_encode_s,
        unet_step_s_median: median(&stages.unet_all),
        unet_step_s_all: stages.unet_all,
        vae_decode_s: stages.vae_decode_s,
        unet_step_cpu_s_median: median(&stages.unet_cpu),
        vae_decode_cpu_s: stages.vae_cpu_s,
        end_to_end_s: e2e,
        peak_rss_bytes: peak_rss_bytes(),
        peak_rss_after_load_bytes: rss_load,
        peak_rss_after_unet_bytes: stages.rss_unet,
        peak_rss_after_vae_bytes: stages.rss_vae,
        unet_params,
        vae_params,
        text_params,
        total_params: unet_params + vae_params + text_params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sane(r: &BenchReport) {
        let times = [
            r.load_s,
            r.text_encode_s,
            r.unet_step_s_median,
            r.vae_decode_s,
        ];
        for t in times.iter().chain(&r.unet_step_s_all) {
            assert!(t.is_finite() && *t > 0.0, "{r:?}");
        }
        assert!(r.unet_step_cpu_s_median >= 0.0 && r.vae_decode_cpu_s >= 0.0);
        assert!(process_cpu_s() > 0.0, "reads /proc/self/stat");
        let e2e = r.end_to_end_s.expect("end to end");
        assert!(e2e.is_finite() && e2e > r.unet_step_s_median, "{r:?}");
        assert!(r.peak_rss_bytes >= r.peak_rss_after_load_bytes);
        assert!(r.peak_rss_after_load_bytes > 0);
        assert!(r.threads >= 1);
        assert_eq!(r.total_params, r.unet_params + r.vae_params + r.text_params);
        let json = serde_json::to_value(r).expect("json");
        assert!(json["unet_step_s_median"].as_f64().is_some());
    }

    #[test]
    fn tiny_bench_reports_sane_figures() {
        for family in [Family::Sd1, Family::Sdxl] {
            let opts = BenchOptions {
                family,
                size: BenchSize::Tiny,
                res: 64,
                steps: 2,
                unet_iters: 2,
                ..Default::default()
            };
            let mut lines = 0;
            let r = run(&opts, &mut |_| lines += 1).expect("bench");
            sane(&r);
            assert!(lines >= 5);
            assert_eq!((r.family, r.res, r.steps), (family, 64, 2));
            assert_eq!(r.unet_step_s_all.len(), 2);
            assert_eq!(r.size, "tiny");
            // The tiny networks are what the tiny checkpoint holds.
            let spec = TinySpec::new(family, false);
            let want: u64 = spec
                .unet
                .param_shapes()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(r.unet_params, want);
        }
    }

    #[test]
    fn checkpoint_bench_uses_the_engine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sd1.safetensors");
        tiny::write_tiny_checkpoint(Family::Sd1, false, 5, &p).expect("write");
        let opts = BenchOptions {
            res: 64,
            steps: 2,
            unet_iters: 1,
            checkpoint: Some(p),
            vae_warmup: false,
            ..Default::default()
        };
        let r = run(&opts, &mut |_| {}).expect("bench");
        sane(&r);
        assert_eq!(r.size, "checkpoint");
        let random = run(
            &BenchOptions {
                checkpoint: None,
                size: BenchSize::Tiny,
                ..opts
            },
            &mut |_| {},
        )
        .expect("random");
        // Same architecture either way.
        assert_eq!(r.unet_params, random.unet_params);
        assert_eq!(r.vae_params, random.vae_params);
    }

    #[test]
    fn full_size_parameter_counts_match_the_real_models() {
        // SD 1.5: UNet 859.5 M, VAE 83.7 M, CLIP-L 123.1 M (diffusers' counts).
        let a = arch(Family::Sd1, BenchSize::Full);
        let m = |v: u64| (v as f64 / 1e6).round() as u64;
        assert_eq!(m(count(&a.unet.param_shapes())), 860);
        assert_eq!(m(count(&a.vae.param_shapes())), 84);
        assert_eq!(m(count(&a.clips[0].0.param_shapes())), 123);
        let a = arch(Family::Sdxl, BenchSize::Full);
        assert_eq!(m(count(&a.unet.param_shapes())), 2567);
    }

    #[test]
    fn rejects_bad_resolution_and_size() {
        let opts = BenchOptions {
            res: 60,
            size: BenchSize::Tiny,
            ..Default::default()
        };
        assert!(matches!(
            run(&opts, &mut |_| {}),
            Err(EngineError::InvalidParam(_))
        ));
        assert_eq!(BenchSize::parse("Tiny").expect("tiny"), BenchSize::Tiny);
        assert!(BenchSize::parse("huge").is_err());
    }
}
