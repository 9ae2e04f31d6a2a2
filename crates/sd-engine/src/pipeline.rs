//! The CPU sampling pipeline: prompt → conditioning → denoising loop → VAE decode, following
//! diffusers' StableDiffusion(XL) txt2img, img2img and inpaint pipelines step for step.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::api::{
    Backend, CheckpointInfo, Control, EmbeddingReport, EmbeddingSpec, Family, GenerateParams,
    GrayImage, LoraReport, LoraSpec, Progress, RgbImage,
};
use crate::checkpoint::{self, Checkpoint};
use crate::lora::LoraState;
use crate::models::unet::sdxl_vector;
use crate::models::vae::scaling_factor;
use crate::rng::TorchRng;
use crate::sched::{self, Prediction, SchedulerConfig};
use crate::text::conditioning::encode_pair_with;
use crate::text::embedding::{self, Embedding, EmbeddingVocab};
use crate::text::tokenizer::{ClipTokenizer, VOCAB_SIZE};
use crate::{EngineError, Result};

/// The f32 CPU engine. Holds at most one checkpoint.
pub struct CpuEngine {
    ckpt: Option<Checkpoint>,
    /// Where `ckpt` came from (to reload it pristine if a LoRA rebuild fails).
    path: Option<PathBuf>,
    tokenizer: ClipTokenizer,
    loras: LoraState,
    /// Every readable embedding file of the last `set_embeddings`, and the unreadable ones.
    embeddings: Vec<Embedding>,
    unreadable: Vec<(String, String)>,
    /// Trigger tokens of the embeddings installed in the loaded checkpoint's text encoders.
    vocab: EmbeddingVocab,
    /// The standalone VAE decoding instead of the checkpoint's own.
    vae: Option<PathBuf>,
}

impl Default for CpuEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuEngine {
    pub fn new() -> Self {
        CpuEngine {
            ckpt: None,
            path: None,
            tokenizer: ClipTokenizer::new(),
            loras: LoraState::default(),
            embeddings: Vec::new(),
            unreadable: Vec::new(),
            vocab: EmbeddingVocab::default(),
            vae: None,
        }
    }

    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.ckpt.as_ref()
    }

    /// Put the embeddings that fit the loaded checkpoint into its text encoders (after every
    /// load, text-encoder rebuild and `set_embeddings`) and say which ones are active.
    fn install_embeddings(&mut self) -> Result<EmbeddingReport> {
        let mut report = EmbeddingReport {
            active: Vec::new(),
            skipped: self.unreadable.clone(),
        };
        let Some(ck) = self.ckpt.as_mut() else {
            self.vocab = EmbeddingVocab::default();
            report.active = self
                .embeddings
                .iter()
                .map(|e| (e.name.clone(), e.count()))
                .collect();
            return Ok(report);
        };
        let layouts = ck.text.layouts();
        let widths: Vec<usize> = layouts.iter().map(|(_, c)| c.hidden).collect();
        let (mut usable, mut tables, mut skipped) =
            embedding::tables_for(&self.embeddings, &widths)?;
        if layouts.iter().any(|(_, c)| c.vocab_size != VOCAB_SIZE) && !usable.is_empty() {
            // Vector ids start right after the tokenizer's vocabulary; another size cannot map them.
            for &i in &usable {
                skipped.push((
                    self.embeddings[i].name.clone(),
                    "the text encoder's vocabulary is not CLIP's".into(),
                ));
            }
            usable.clear();
            tables = vec![None; widths.len()];
        }
        ck.text.set_extra_tokens(&tables)?;
        let names: Vec<(String, usize)> = usable
            .iter()
            .map(|&i| (self.embeddings[i].name.clone(), self.embeddings[i].count()))
            .collect();
        let (vocab, dup) = EmbeddingVocab::new(&self.tokenizer, &names, VOCAB_SIZE as u32);
        report.active = vocab
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.vectors))
            .collect();
        report.skipped.extend(skipped);
        report.skipped.extend(dup);
        self.vocab = vocab;
        Ok(report)
    }
}

fn bad(msg: impl Into<String>) -> EngineError {
    EngineError::InvalidParam(msg.into())
}

/// The diffusers scheduler config of a family (SD 1.5 / SD 2.x / SDXL base `scheduler_config.json`).
pub fn scheduler_config(info: &CheckpointInfo) -> SchedulerConfig {
    let mut cfg = match info.family {
        Family::Sd1 | Family::Sd2 => SchedulerConfig::sd15(),
        Family::Sdxl => SchedulerConfig::sdxl(),
    };
    if info.v_prediction {
        cfg.prediction = Prediction::VPrediction;
    }
    cfg
}

/// RGB bytes → `[1, 3, H, W]` in -1..1 (diffusers: `x / 255 * 2 - 1`).
pub fn image_to_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = (img.width as usize, img.height as usize);
    if img.data.len() != w * h * 3 {
        return Err(bad(format!(
            "image data has {} bytes, expected {}×{}×3",
            img.data.len(),
            w,
            h
        )));
    }
    let mut v = vec![0f32; 3 * w * h];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            v[c * w * h + i] = (px[c] as f32 / 255.0) * 2.0 - 1.0;
        }
    }
    Ok(Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu)?)
}

/// `[1, 3, H, W]` in -1..1 → RGB bytes (diffusers: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`).
pub fn tensor_to_image(t: &Tensor) -> Result<RgbImage> {
    let (_, c, h, w) = t.dims4()?;
    if c != 3 {
        return Err(bad(format!("decoded image has {c} channels")));
    }
    let v = t
        .get(0)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut data = vec![0u8; h * w * 3];
    for i in 0..h * w {
        for ch in 0..3 {
            let x = (v[ch * h * w + i] / 2.0 + 0.5).clamp(0.0, 1.0);
            data[i * 3 + ch] = (x * 255.0).round() as u8;
        }
    }
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        data,
    })
}

/// Binarised mask (≥ 50% → 1 = repaint) at full size `[1, 1, H, W]` and at latent size
/// `[1, 1, H/f, W/f]` (nearest, picking pixel `f·i`, as `F.interpolate(mode="nearest")`).
fn mask_tensors(mask: &GrayImage, f: usize) -> Result<(Tensor, Tensor)> {
    let (w, h) = (mask.width as usize, mask.height as usize);
    if mask.data.len() != w * h {
        return Err(bad("mask data length does not match its size"));
    }
    let bin: Vec<f32> = mask
        .data
        .iter()
        .map(|&m| if m as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    let (lh, lw) = (h / f, w / f);
    let mut small = vec![0f32; lh * lw];
    for y in 0..lh {
        for x in 0..lw {
            small[y * lw + x] = bin[(y * f) * w + x * f];
        }
    }
    Ok((
        Tensor::from_vec(bin, (1, 1, h, w), &Device::Cpu)?,
        Tensor::from_vec(small, (1, 1, lh, lw), &Device::Cpu)?,
    ))
}

/// diffusers `get_timesteps`: the index of the first step for img2img strength `s`.
pub fn img2img_start(steps: usize, strength: f64) -> usize {
    let init = ((steps as f64 * strength) as usize).min(steps);
    steps.saturating_sub(init)
}

/// What stays the same for every image of one call.
struct Prepared {
    /// `[2 or 1, L, D]`: (uncond, cond) when guidance is on, else cond only.
    context: Tensor,
    /// SDXL vector conditioning, batched like `context`.
    y: Option<Tensor>,
    /// img2img/inpaint source latents (scaled).
    image_latents: Option<Tensor>,
    /// Inpaint: latent-size mask (1 = repaint) and, for 9-channel UNets, masked-image latents.
    mask: Option<Tensor>,
    masked_latents: Option<Tensor>,
    cfg: bool,
}

impl CpuEngine {
    fn prepare(&self, ck: &Checkpoint, p: &GenerateParams) -> Result<Prepared> {
        let (cond, uncond) = encode_pair_with(
            &self.tokenizer,
            &ck.text,
            &p.prompt,
            &p.negative_prompt,
            p.clip_skip.max(1) as usize,
            &self.vocab,
        )?;
        let cfg = p.guidance_scale > 1.0;
        let context = if cfg {
            Tensor::cat(&[&uncond.context, &cond.context], 0)?
        } else {
            cond.context.clone()
        };
        let y = if ck.info.family == Family::Sdxl {
            let size = (p.height, p.width);
            let vec_of = |pooled: &Option<Tensor>| -> Result<Tensor> {
                let pooled = pooled
                    .as_ref()
                    .ok_or_else(|| bad("SDXL text encoder gave no pooled output"))?;
                sdxl_vector(pooled, size, (0, 0), size)
            };
            let yc = vec_of(&cond.pooled)?;
            Some(if cfg {
                Tensor::cat(&[&vec_of(&uncond.pooled)?, &yc], 0)?
            } else {
                yc
            })
        } else {
            None
        };

        let f = ck.vae.downscale();
        let scale = scaling_factor(ck.info.family);
        let encode = |img: &Tensor| -> Result<Tensor> {
            // The distribution's mean: deterministic, and what diffusers' "argmax" mode gives.
            let (mean, _) = ck.vae.encode(img)?;
            Ok(mean.affine(scale, 0.0)?)
        };
        let inpaint_unet = ck.unet.config().in_channels == 9;
        let mut image_latents = None;
        let mut mask = None;
        let mut masked_latents = None;
        match (&p.init_image, &p.mask) {
            (None, Some(_)) => return Err(bad("a mask needs an init image")),
            (None, None) => {
                if inpaint_unet {
                    // Inpainting checkpoint used for txt2img: repaint everything.
                    let (lh, lw) = (p.height as usize / f, p.width as usize / f);
                    mask = Some(Tensor::ones((1, 1, lh, lw), DType::F32, &Device::Cpu)?);
                    let gray = Tensor::zeros(
                        (1, 3, p.height as usize, p.width as usize),
                        DType::F32,
                        &Device::Cpu,
                    )?;
                    masked_latents = Some(encode(&gray)?);
                }
            }
            (Some(img), m) => {
                if img.width != p.width || img.height != p.height {
                    return Err(bad(format!(
                        "init image is {}×{}, expected {}×{}",
                        img.width, img.height, p.width, p.height
                    )));
                }
                let x = image_to_tensor(img)?;
                image_latents = Some(encode(&x)?);
                let (full, small) = match m {
                    Some(m) => {
                        if m.width != p.width || m.height != p.height {
                            return Err(bad("mask size differs from the init image"));
                        }
                        let (full, small) = mask_tensors(m, f)?;
                        (Some(full), Some(small))
                    }
                    None if inpaint_unet => {
                        let (h, w) = (p.height as usize, p.width as usize);
                        (
                            Some(Tensor::ones((1, 1, h, w), DType::F32, &Device::Cpu)?),
                            Some(Tensor::ones(
                                (1, 1, h / f, w / f),
                                DType::F32,
                                &Device::Cpu,
                            )?),
                        )
                    }
                    None => (None, None),
                };
                if inpaint_unet {
                    if let Some(full) = &full {
                        // Masked image: the known pixels, zero (mid-gray) where we repaint.
                        let keep = full.affine(-1.0, 1.0)?;
                        masked_latents = Some(encode(&x.broadcast_mul(&keep)?)?);
                    }
                }
                mask = small;
            }
        }
        Ok(Prepared {
            context,
            y,
            image_latents,
            mask,
            masked_latents,
            cfg,
        })
    }

    fn generate_one(
        &self,
        ck: &Checkpoint,
        p: &GenerateParams,
        prep: &Prepared,
        index: u32,
        progress: &mut dyn FnMut(&Progress) -> Control,
    ) -> Result<(Tensor, Tensor)> {
        let f = ck.vae.downscale();
        let (lh, lw) = (p.height as usize / f, p.width as usize / f);
        let latent_ch = ck.unet.config().out_channels;
        let mut rng = TorchRng::new(p.seed.wrapping_add(index as u64));
        let noise = rng.randn_tensor(&[1, latent_ch, lh, lw])?;
        let mut sched = sched::create(
            &p.scheduler,
            p.schedule_type.as_deref(),
            &scheduler_config(&ck.info),
            p.steps as usize,
        )?;
        let timesteps: Vec<f64> = sched.timesteps().to_vec();

        let (start, mut latents) = match &prep.image_latents {
            Some(img) if p.strength < 1.0 => {
                let t_start = img2img_start(p.steps as usize, p.strength) * sched.order();
                if t_start >= timesteps.len() {
                    return Err(bad(format!(
                        "strength {} leaves no denoising steps out of {}",
                        p.strength, p.steps
                    )));
                }
                (t_start, sched.add_noise(img, &noise, t_start)?)
            }
            _ => (0, noise.affine(sched.init_noise_sigma(), 0.0)?),
        };
        // A normal (4-channel) checkpoint inpaints by pasting the re-noised known region back.
        let blend = match (&prep.mask, &prep.image_latents) {
            (Some(m), Some(img)) if prep.masked_latents.is_none() => Some((m, img)),
            _ => None,
        };
        let total = (timesteps.len() - start) as u32;
        let batch = if prep.cfg { 2 } else { 1 };
        for i in start..timesteps.len() {
            let x = sched.scale_model_input(&latents, i)?;
            let x = match (&prep.mask, &prep.masked_latents) {
                (Some(m), Some(ml)) => Tensor::cat(&[&x, m, ml], 1)?,
                _ => x,
            };
            let x = if batch == 2 {
                Tensor::cat(&[&x, &x], 0)?
            } else {
                x
            };
            let t = Tensor::full(timesteps[i] as f32, batch, &Device::Cpu)?;
            let out = ck.unet.forward(&x, &t, &prep.context, prep.y.as_ref())?;
            drop(x);
            let guided = if prep.cfg {
                let uncond = out.get(0)?.unsqueeze(0)?;
                let cond = out.get(1)?.unsqueeze(0)?;
                let diff = (cond - &uncond)?;
                (uncond + diff.affine(p.guidance_scale, 0.0)?)?
            } else {
                out
            };
            latents = sched.step(&guided, i, &latents, &mut |shape: &[usize]| {
                rng.randn_tensor(shape)
            })?;
            if let Some((m, img)) = blend {
                let known = if i + 1 < timesteps.len() {
                    sched.add_noise(img, &noise, i + 1)?
                } else {
                    img.clone()
                };
                let keep = m.affine(-1.0, 1.0)?;
                latents = (known.broadcast_mul(&keep)? + latents.broadcast_mul(m)?)?;
            }
            let step = (i - start + 1) as u32;
            let preview = if p.preview_every > 0 && step.is_multiple_of(p.preview_every) {
                Some(crate::preview::latent_to_rgb(ck.info.family, &latents)?)
            } else {
                None
            };
            let report = Progress {
                step,
                total_steps: total,
                image_index: index,
                preview,
            };
            match progress(&report) {
                Control::Continue => {}
                Control::Cancel => return Err(EngineError::Cancelled),
                // Finish is turned into a skip by generate_tensors, which then stops.
                Control::SkipImage | Control::Finish => break,
            }
        }
        let z = latents.affine(1.0 / scaling_factor(ck.info.family), 0.0)?;
        let img = ck.vae.decode(&z)?;
        // An idle server should not hold the decoder's scratch until the next task.
        crate::models::ops::release_scratch();
        Ok((latents, img))
    }

    /// [`Backend::generate`] returning, per image, the final latents `[1, 4, h, w]` and the
    /// decoded image `[1, 3, H, W]` in -1..1 before quantisation (for parity tests and tools).
    pub fn generate_tensors(
        &mut self,
        params: &GenerateParams,
        progress: &mut dyn FnMut(&Progress) -> Control,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let ck = self.ckpt.as_ref().ok_or(EngineError::NoCheckpoint)?;
        validate(ck, params)?;
        let prep = self.prepare(ck, params)?;
        let mut out = Vec::with_capacity(params.num_images as usize);
        let finish = std::cell::Cell::new(false);
        let mut step = |p: &Progress| match progress(p) {
            Control::Finish => {
                finish.set(true);
                Control::SkipImage
            }
            other => other,
        };
        for i in 0..params.num_images {
            out.push(self.generate_one(ck, params, &prep, i, &mut step)?);
            if finish.get() {
                break;
            }
        }
        Ok(out)
    }
}

fn validate(ck: &Checkpoint, params: &GenerateParams) -> Result<()> {
    let f = ck.vae.downscale() as u32;
    if params.width == 0
        || params.height == 0
        || !params.width.is_multiple_of(f)
        || !params.height.is_multiple_of(f)
    {
        return Err(bad(format!(
            "width and height must be positive multiples of {f}, got {}×{}",
            params.width, params.height
        )));
    }
    if params.steps == 0 {
        return Err(bad("steps must be at least 1"));
    }
    if params.num_images == 0 {
        return Err(bad("num_images must be at least 1"));
    }
    if !params.guidance_scale.is_finite() {
        return Err(bad("guidance_scale must be a finite number"));
    }
    if !(params.strength > 0.0 && params.strength <= 1.0) {
        return Err(bad("strength must be in (0, 1]"));
    }
    Ok(())
}

impl Backend for CpuEngine {
    fn load_checkpoint(&mut self, path: &Path) -> Result<CheckpointInfo> {
        // Free the old model first so two are never resident together.
        self.ckpt = None;
        self.path = None;
        self.vae = None;
        self.loras.reset();
        let ck = checkpoint::load(path)?;
        let info = ck.info.clone();
        self.ckpt = Some(ck);
        self.path = Some(path.to_path_buf());
        self.install_embeddings()?;
        Ok(info)
    }

    fn unload(&mut self) {
        crate::models::ops::release_scratch();
        self.ckpt = None;
        self.path = None;
        self.vae = None;
        self.loras.reset();
        self.vocab = EmbeddingVocab::default();
    }

    fn loaded(&self) -> Option<&CheckpointInfo> {
        self.ckpt.as_ref().map(|c| &c.info)
    }

    fn generate(
        &mut self,
        params: &GenerateParams,
        progress: &mut dyn FnMut(&Progress) -> Control,
    ) -> Result<Vec<RgbImage>> {
        self.generate_tensors(params, progress)?
            .iter()
            .map(|(_, img)| tensor_to_image(img))
            .collect()
    }

    fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<LoraReport> {
        let result = self.loras.apply(&mut self.ckpt, loras);
        if self.ckpt.is_none() {
            // A failed rebuild consumed the model: reload it pristine (no LoRA).
            if let Some(path) = self.path.clone() {
                self.loras.reset();
                self.vae = None;
                match checkpoint::load(&path) {
                    Ok(ck) => self.ckpt = Some(ck),
                    Err(_) => self.path = None,
                }
            }
        }
        // A text-encoder rebuild drops the embedding vectors; put them back.
        if self.ckpt.is_some() {
            self.install_embeddings()?;
        }
        result
    }

    fn set_vae(&mut self, path: Option<&Path>) -> Result<()> {
        if self.vae.as_deref() == path {
            return Ok(());
        }
        let ck = self.ckpt.as_mut().ok_or(EngineError::NoCheckpoint)?;
        if path.is_some() && ck.source().is_none() {
            // Its own VAE could not be read back afterwards.
            return Err(EngineError::InvalidParam(
                "a separate VAE needs a single-file checkpoint (not a diffusers folder)".into(),
            ));
        }
        match path {
            Some(p) => {
                ck.replace_vae(checkpoint::load_vae(p)?)?;
                self.vae = Some(p.to_path_buf());
            }
            None => {
                ck.restore_vae()?;
                self.vae = None;
            }
        }
        Ok(())
    }

    fn vae(&self) -> Option<&Path> {
        self.vae.as_deref()
    }

    fn set_embeddings(&mut self, embeddings: &[EmbeddingSpec]) -> Result<EmbeddingReport> {
        self.embeddings.clear();
        self.unreadable.clear();
        for spec in embeddings {
            match embedding::load_embedding(&spec.path, &spec.name) {
                Ok(e) => self.embeddings.push(e),
                Err(e) => self.unreadable.push((spec.name.clone(), e.to_string())),
            }
        }
        self.install_embeddings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::write_tiny_checkpoint;

    fn engine(fam: Family, inpaint: bool, dir: &Path) -> CpuEngine {
        let p = dir.join(format!("{}-{inpaint}.safetensors", fam.as_str()));
        write_tiny_checkpoint(fam, inpaint, 11, &p).expect("write");
        let mut e = CpuEngine::new();
        let info = e.load_checkpoint(&p).expect("load");
        assert_eq!(info.family, fam);
        assert_eq!(info.inpaint, inpaint);
        e
    }

    fn params(w: u32, h: u32) -> GenerateParams {
        GenerateParams {
            prompt: "a (photo:1.2) of a cat".into(),
            negative_prompt: "blurry".into(),
            width: w,
            height: h,
            steps: 3,
            guidance_scale: 5.0,
            scheduler: "Euler a".into(),
            seed: 42,
            ..Default::default()
        }
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        let data = (0..w * h)
            .flat_map(|i| [(i % 251) as u8, (i * 7 % 253) as u8, 128])
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    fn half_mask(w: u32, h: u32) -> GrayImage {
        let data = (0..w * h)
            .map(|i| if i % w < w / 2 { 255 } else { 0 })
            .collect();
        GrayImage {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn txt2img_img2img_inpaint_every_family() {
        let dir = tempfile::tempdir().expect("tempdir");
        for fam in [Family::Sd1, Family::Sd2, Family::Sdxl] {
            let mut e = engine(fam, false, dir.path());
            let mut steps = 0;
            let mut p = params(64, 48);
            p.num_images = 2;
            p.preview_every = 1;
            let imgs = e
                .generate(&p, &mut |pr| {
                    steps += 1;
                    assert!(pr.preview.is_some());
                    Control::Continue
                })
                .expect("txt2img");
            assert_eq!(steps, 6);
            assert_eq!(imgs.len(), 2);
            for img in &imgs {
                assert_eq!(
                    (img.width, img.height, img.data.len()),
                    (64, 48, 64 * 48 * 3)
                );
            }
            assert_ne!(imgs[0], imgs[1], "seed + 1 must give another image");

            let mut p = params(64, 48);
            p.init_image = Some(gradient(64, 48));
            p.strength = 0.6;
            let mut seen = Vec::new();
            let imgs = e
                .generate(&p, &mut |pr| {
                    seen.push((pr.step, pr.total_steps));
                    Control::Continue
                })
                .expect("img2img");
            assert_eq!(seen, vec![(1, 1)], "3 steps at strength 0.6 run the last 1");
            assert_eq!((imgs[0].width, imgs[0].height), (64, 48));

            p.mask = Some(half_mask(64, 48));
            p.strength = 1.0;
            let imgs = e.generate(&p, &mut |_| Control::Continue).expect("inpaint");
            assert_eq!((imgs[0].width, imgs[0].height), (64, 48));
        }
    }

    #[test]
    fn inpainting_checkpoint_and_determinism() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut e = engine(Family::Sd1, true, dir.path());
        let mut p = params(32, 40);
        p.scheduler = "DPM++ 2M".into();
        p.init_image = Some(gradient(32, 40));
        p.mask = Some(half_mask(32, 40));
        p.strength = 0.8;
        let a = e.generate(&p, &mut |_| Control::Continue).expect("a");
        let b = e.generate(&p, &mut |_| Control::Continue).expect("b");
        assert_eq!(a, b, "same inputs must give bit-identical output");
        assert_eq!((a[0].width, a[0].height), (32, 40));
        // Inpainting checkpoint for plain txt2img works too.
        p.init_image = None;
        p.mask = None;
        let c = e.generate(&p, &mut |_| Control::Continue).expect("txt2img");
        assert_eq!((c[0].width, c[0].height), (32, 40));
    }

    #[test]
    fn cancel_stops_within_one_step_and_bad_params_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut e = engine(Family::Sd1, false, dir.path());
        let mut calls = 0;
        let mut p = params(32, 32);
        p.steps = 10;
        let r = e.generate(&p, &mut |_| {
            calls += 1;
            Control::Cancel
        });
        assert!(matches!(r, Err(EngineError::Cancelled)));
        assert_eq!(calls, 1);
        let mut bad_size = params(30, 32);
        assert!(matches!(
            e.generate(&bad_size, &mut |_| Control::Continue),
            Err(EngineError::InvalidParam(_))
        ));
        bad_size.width = 32;
        bad_size.scheduler = "nope".into();
        assert!(e.generate(&bad_size, &mut |_| Control::Continue).is_err());
        e.unload();
        assert!(e.loaded().is_none());
        assert!(matches!(
            e.generate(&p, &mut |_| Control::Continue),
            Err(EngineError::NoCheckpoint)
        ));
    }

    #[test]
    fn a_standalone_vae_decodes_instead_and_switching_back_is_exact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut e = engine(Family::Sd1, false, dir.path());
        let p = params(32, 32);
        let own = e.generate(&p, &mut |_| Control::Continue).expect("own vae");
        let vae = dir.path().join("vae.safetensors");
        crate::tiny::write_tiny_vae(Family::Sd1, 77, &vae).expect("write vae");
        e.set_vae(Some(&vae)).expect("set vae");
        assert_eq!(e.vae(), Some(vae.as_path()));
        let other = e
            .generate(&p, &mut |_| Control::Continue)
            .expect("other vae");
        assert_ne!(other, own, "the other VAE decoded");
        e.set_vae(None).expect("back");
        assert_eq!(e.vae(), None);
        let back = e
            .generate(&p, &mut |_| Control::Continue)
            .expect("own again");
        assert_eq!(back, own, "the checkpoint's own VAE, bit for bit");
        // Not a VAE: refused, the model keeps working.
        let not_vae = dir.path().join("lora.safetensors");
        let ckpt = dir.path().join("sd1-false.safetensors");
        crate::tiny::write_tiny_lora(&ckpt, crate::lora::LoraKind::Lora, 1, &not_vae)
            .expect("lora");
        assert!(e.set_vae(Some(&not_vae)).is_err());
        assert_eq!(e.vae(), None);
        // An SDXL VAE file fits an SD 1.x model's latent space (same architecture).
        let xl_vae = dir.path().join("xl_vae.safetensors");
        crate::tiny::write_tiny_vae(Family::Sdxl, 3, &xl_vae).expect("write");
        e.set_vae(Some(&xl_vae)).expect("fits");
        // A load starts from the checkpoint's own VAE again.
        e.load_checkpoint(&ckpt).expect("reload");
        assert_eq!(e.vae(), None);
        assert_eq!(e.generate(&p, &mut |_| Control::Continue).expect("g"), own);
    }

    #[test]
    fn skip_cuts_one_image_short_and_the_next_is_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut e = engine(Family::Sd1, false, dir.path());
        let mut p = params(32, 32);
        p.steps = 4;
        p.num_images = 2;
        let full = e.generate(&p, &mut |_| Control::Continue).expect("full");
        let mut steps_seen = vec![];
        let skipped = e
            .generate(&p, &mut |r| {
                steps_seen.push((r.image_index, r.step));
                if r.image_index == 0 && r.step == 1 {
                    Control::SkipImage
                } else {
                    Control::Continue
                }
            })
            .expect("skipped");
        assert_eq!(skipped.len(), 2);
        assert_eq!(steps_seen, [(0, 1), (1, 1), (1, 2), (1, 3), (1, 4)]);
        assert_ne!(skipped[0], full[0], "image 0 stopped after one step");
        assert_eq!(skipped[1], full[1], "image 1 is untouched by the skip");
    }

    #[test]
    fn finish_returns_the_images_so_far_with_the_current_one_cut_short() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut e = engine(Family::Sd1, false, dir.path());
        let mut p = params(32, 32);
        p.steps = 4;
        p.num_images = 3;
        let full = e.generate(&p, &mut |_| Control::Continue).expect("full");
        let mut seen = vec![];
        let done = e
            .generate(&p, &mut |r| {
                seen.push((r.image_index, r.step));
                if (r.image_index, r.step) == (1, 2) {
                    Control::Finish
                } else {
                    Control::Continue
                }
            })
            .expect("finished early");
        assert_eq!(done.len(), 2, "image 2 was never started");
        assert_eq!(seen.last(), Some(&(1, 2)));
        assert_eq!(done[0], full[0], "image 0 had finished");
        assert_ne!(done[1], full[1], "image 1 stopped after two of four steps");
    }

    /// An embedding file whose vectors are the checkpoint's own token embeddings of `words`,
    /// so `trigger` must condition exactly like `words`.
    fn embedding_of_words(e: &CpuEngine, ckpt: &Path, words: &str, out: &Path) {
        use crate::safetensors_file::{open, serialize, Dtype};
        let tok = ClipTokenizer::new();
        let ids = tok.encode(words);
        let file = open(ckpt).expect("open");
        let ck = e.checkpoint().expect("ckpt");
        let mut tensors = Vec::new();
        let layouts = ck.text.layouts();
        for (i, (prefix, cfg)) in layouts.iter().enumerate() {
            let key = match cfg.layout {
                crate::models::clip::ClipLayout::OpenAi => {
                    format!("{prefix}embeddings.token_embedding.weight")
                }
                crate::models::clip::ClipLayout::OpenClip => {
                    format!("{prefix}token_embedding.weight")
                }
            };
            let table = file.tensor_f32(&key).expect("table");
            let idx = Tensor::new(ids.as_slice(), &Device::Cpu).expect("idx");
            let rows = table.index_select(&idx, 0).expect("rows");
            let v: Vec<f32> = rows.flatten_all().and_then(|r| r.to_vec1()).expect("v");
            let name = match (layouts.len(), i) {
                (1, _) => "emb_params",
                (_, 0) => "clip_l",
                _ => "clip_g",
            };
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push((
                name.to_string(),
                Dtype::F32,
                vec![ids.len(), cfg.hidden],
                bytes,
            ));
        }
        std::fs::write(out, serialize(&tensors, &Default::default()).expect("ser")).expect("write");
    }

    fn context(e: &CpuEngine, prompt: &str) -> Vec<u32> {
        let ck = e.checkpoint().expect("ckpt");
        let mut p = params(32, 32);
        p.prompt = prompt.into();
        let prep = e.prepare(ck, &p).expect("prepare");
        let mut v: Vec<u32> = prep
            .context
            .flatten_all()
            .and_then(|c| c.to_vec1::<f32>())
            .expect("v")
            .into_iter()
            .map(f32::to_bits)
            .collect();
        if let Some(y) = prep.y {
            v.extend(
                y.flatten_all()
                    .and_then(|c| c.to_vec1::<f32>())
                    .expect("y")
                    .into_iter()
                    .map(f32::to_bits),
            );
        }
        v
    }

    #[test]
    fn embeddings_replace_their_trigger_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        for fam in [Family::Sd1, Family::Sdxl] {
            let mut e = engine(fam, false, dir.path());
            let ckpt = dir
                .path()
                .join(format!("{}-false.safetensors", fam.as_str()));
            let emb = dir
                .path()
                .join(format!("{}-redcat.safetensors", fam.as_str()));
            embedding_of_words(&e, &ckpt, "red cat", &emb);
            let plain = context(&e, "a (photo:1.2) of a dog");
            let words = context(&e, "a (photo:1.2) of a red cat");
            let missing = dir.path().join("missing.safetensors");
            let r = e
                .set_embeddings(&[
                    EmbeddingSpec {
                        path: emb.clone(),
                        name: "redcat".into(),
                    },
                    EmbeddingSpec {
                        path: missing,
                        name: "gone".into(),
                    },
                ])
                .expect("set");
            assert_eq!(r.active, vec![("redcat".to_string(), 2)]);
            assert_eq!(r.skipped.len(), 1);
            assert_eq!(r.skipped[0].0, "gone");
            // A prompt without the trigger is unchanged; the trigger gives the words' vectors.
            assert_eq!(context(&e, "a (photo:1.2) of a dog"), plain);
            let with = context(&e, "a (photo:1.2) of a redcat");
            assert_eq!(
                with, words,
                "{fam:?}: embedding must equal its source tokens"
            );
            assert_ne!(with, plain);
            // Weighted like any token.
            assert_eq!(
                context(&e, "a (photo:1.2) of a (redcat:1.3)"),
                context(&e, "a (photo:1.2) of a (red cat:1.3)")
            );
            let mut p = params(32, 32);
            p.prompt = "a redcat".into();
            let a = e.generate(&p, &mut |_| Control::Continue).expect("a");
            p.prompt = "a red cat".into();
            let b = e.generate(&p, &mut |_| Control::Continue).expect("b");
            assert_eq!(a, b);
            // Survives a text-encoder rebuild (LoRA) and a reload of the checkpoint.
            let lora = dir
                .path()
                .join(format!("{}-lora.safetensors", fam.as_str()));
            crate::tiny::write_tiny_lora(&ckpt, crate::lora::LoraKind::Lora, 4, &lora)
                .expect("lora");
            let spec = LoraSpec {
                path: lora,
                weight: 1.0,
                name: "l".into(),
            };
            let r = e.set_loras(std::slice::from_ref(&spec)).expect("lora");
            assert!(r.rebuilt_text);
            assert_ne!(context(&e, "a redcat"), context(&e, "a dog"));
            e.set_loras(&[]).expect("no lora");
            assert_eq!(context(&e, "a (photo:1.2) of a redcat"), words);
            e.load_checkpoint(&ckpt).expect("reload");
            assert_eq!(context(&e, "a (photo:1.2) of a redcat"), words);
            // Removing the embeddings makes the word plain text again.
            e.set_embeddings(&[]).expect("clear");
            assert_ne!(context(&e, "a (photo:1.2) of a redcat"), words);
        }
    }

    #[test]
    fn embeddings_of_another_family_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd1 = engine(Family::Sd1, false, dir.path());
        let emb = dir.path().join("sd1emb.safetensors");
        embedding_of_words(&sd1, &dir.path().join("sd1-false.safetensors"), "red", &emb);
        let mut xl = engine(Family::Sdxl, false, dir.path());
        let before = context(&xl, "a sd1emb");
        let r = xl
            .set_embeddings(&[EmbeddingSpec {
                path: emb,
                name: "sd1emb".into(),
            }])
            .expect("set");
        assert!(r.active.is_empty());
        assert_eq!(r.skipped.len(), 1, "{r:?}");
        assert_eq!(context(&xl, "a sd1emb"), before);
        // With no checkpoint loaded every readable file is listed as active.
        let mut none = CpuEngine::new();
        let r = none
            .set_embeddings(&[EmbeddingSpec {
                path: dir.path().join("sd1emb.safetensors"),
                name: "sd1emb".into(),
            }])
            .expect("set");
        assert_eq!(r.active, vec![("sd1emb".to_string(), 1)]);
        assert!(none.set_loras(&[]).expect("empty").loras.is_empty());
    }

    #[test]
    fn strength_start_index_matches_diffusers() {
        assert_eq!(img2img_start(20, 0.75), 5);
        assert_eq!(img2img_start(20, 1.0), 0);
        assert_eq!(img2img_start(3, 0.6), 2);
        assert_eq!(img2img_start(10, 0.05), 10);
    }
}
