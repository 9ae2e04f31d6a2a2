//! Loading a whole single-file checkpoint (UNet + VAE + text encoders) from the original
//! LDM/SGM key layout, converting f16/bf16 weights to f32 on the CPU.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use crate::api::{CheckpointInfo, Family};
use crate::detect::{
    self, SD1_CLIP_PREFIX, SD2_CLIP_PREFIX, SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX, UNET_PREFIX,
    VAE_PREFIX,
};
use crate::models::clip::{ClipConfig, ClipTextModel};
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::safetensors_file::{self, Header, SafetensorsFile};
use crate::text::conditioning::ChunkEncoder;
use crate::text::tokenizer::{BOS, EOS};
use crate::{EngineError, Result};

pub mod folder;

/// SD 1.x text encoder prefix in files saved with the old transformers layout.
const SD1_CLIP_PREFIX_OLD: &str = "cond_stage_model.transformer.";

/// Tokens per CLIP sequence, BOS and EOS included.
pub const SEQ_LEN: usize = 77;

/// How one text encoder turns a chunk into hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EncoderUse {
    /// Padding id after EOS: 49407 (EOS) for OpenAI CLIP-L, 0 for OpenCLIP.
    pad: u32,
    /// Layers skipped at clip_skip = 1 (0 = last layer, 1 = penultimate).
    base_skip: usize,
    final_norm: bool,
}

/// The checkpoint's text encoder(s), used through [`ChunkEncoder`].
pub struct TextEncoders {
    family: Family,
    encoders: Vec<(ClipTextModel, EncoderUse)>,
    /// Key prefix of each encoder in the file (for rebuilding and LoRA name mapping).
    prefixes: Vec<String>,
}

impl std::fmt::Debug for TextEncoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoders")
            .field("family", &self.family)
            .field("encoders", &self.encoders.len())
            .finish()
    }
}

/// Token ids for one chunk: BOS, up to 75 tokens, EOS, then padding to 77.
pub fn chunk_ids(tokens: &[u32], pad: u32) -> Result<Vec<u32>> {
    if tokens.len() > SEQ_LEN - 2 {
        return Err(EngineError::InvalidParam(format!(
            "a prompt chunk holds at most {} tokens, got {}",
            SEQ_LEN - 2,
            tokens.len()
        )));
    }
    let mut ids = Vec::with_capacity(SEQ_LEN);
    ids.push(BOS);
    ids.extend_from_slice(tokens);
    ids.push(EOS);
    ids.resize(SEQ_LEN, pad);
    Ok(ids)
}

impl TextEncoders {
    pub fn family(&self) -> Family {
        self.family
    }

    /// Each encoder's key prefix in the checkpoint (with trailing dot) and configuration.
    pub fn layouts(&self) -> Vec<(String, ClipConfig)> {
        self.prefixes
            .iter()
            .zip(&self.encoders)
            .map(|(p, (e, _))| (p.clone(), e.config().clone()))
            .collect()
    }

    /// Install textual-inversion vectors: one `[n, hidden]` table (or `None`) per encoder, in
    /// encoder order; token ids `vocab_size..vocab_size + n` then select its rows.
    pub fn set_extra_tokens(&mut self, tables: &[Option<Tensor>]) -> Result<()> {
        if tables.len() != self.encoders.len() {
            return Err(EngineError::InvalidParam(format!(
                "{} embedding tables for {} text encoders",
                tables.len(),
                self.encoders.len()
            )));
        }
        for ((enc, _), t) in self.encoders.iter_mut().zip(tables) {
            enc.set_extra_tokens(t.clone())?;
        }
        Ok(())
    }

    /// Re-load every encoder from `vb` (the checkpoint's key layout), dropping the old weights
    /// first so only one copy is resident. Extra token tables are not kept.
    fn rebuild(&mut self, vb: &VarBuilder) -> Result<()> {
        let layouts = self.layouts();
        let usages: Vec<EncoderUse> = self.encoders.drain(..).map(|(_, u)| u).collect();
        for ((prefix, cfg), usage) in layouts.into_iter().zip(usages) {
            let model = ClipTextModel::load(vb.pp(pp_name(&prefix)), &cfg)?;
            self.encoders.push((model, usage));
        }
        Ok(())
    }

    /// Hidden states `[B, 77, D]` (and the pooled vector of the last encoder that has one)
    /// for chunk token lists, as diffusers' pipelines and A1111 compute them:
    /// - SD 1.x: CLIP-L output of layer `-clip_skip`, then the final layer norm;
    /// - SD 2.x: OpenCLIP-H penultimate layer (`clip_skip` 2 goes one further back), final norm;
    /// - SDXL: CLIP-L and OpenCLIP-G penultimate layers (further back with `clip_skip`), no
    ///   final norm, concatenated; pooled = OpenCLIP-G's projected last-layer EOS state.
    pub fn encode_ids(
        &self,
        chunks: &[Vec<u32>],
        clip_skip: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let clip_skip = clip_skip.max(1);
        let mut hiddens = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for (enc, usage) in &self.encoders {
            let mut flat = Vec::with_capacity(chunks.len() * SEQ_LEN);
            for c in chunks {
                flat.extend(chunk_ids(c, usage.pad)?);
            }
            let ids = Tensor::from_vec(flat, (chunks.len(), SEQ_LEN), &Device::Cpu)?;
            let skip = usage.base_skip + clip_skip;
            let wants_pooled = self.family == Family::Sdxl && enc.config().projection_dim.is_some();
            if wants_pooled {
                let (h, p) = enc.forward(&ids, skip, usage.final_norm)?;
                hiddens.push(h);
                pooled = Some(p);
            } else {
                hiddens.push(enc.forward_hidden(&ids, skip, usage.final_norm)?);
            }
        }
        let hidden = if hiddens.len() == 1 {
            hiddens.remove(0)
        } else {
            Tensor::cat(&hiddens, 2)?
        };
        Ok((hidden, pooled))
    }
}

impl ChunkEncoder for TextEncoders {
    fn encode_chunk(&self, tokens: &[u32], clip_skip: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (h, p) = self.encode_ids(&[tokens.to_vec()], clip_skip)?;
        let p = match p {
            Some(p) => Some(p.squeeze(0)?),
            None => None,
        };
        Ok((h.squeeze(0)?, p))
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

/// A loaded checkpoint: every network in f32 on the CPU.
pub struct Checkpoint {
    pub info: CheckpointInfo,
    pub unet: UNet,
    pub vae: Vae,
    pub text: TextEncoders,
    /// The mapped file, kept so networks can be rebuilt from pristine weights (LoRA).
    source: Option<Arc<SafetensorsFile>>,
}

impl Checkpoint {
    /// The checkpoint file the weights came from, still memory-mapped.
    pub fn source(&self) -> Option<Arc<SafetensorsFile>> {
        self.source.clone()
    }

    /// Puts back the checkpoint's own VAE (after [`load_vae`] replaced it), read again from the
    /// mapped file. Fails for diffusers folders, which keep no mapped source.
    pub fn restore_vae(&mut self) -> Result<()> {
        let file = self.source.clone().ok_or_else(|| {
            EngineError::InvalidParam("this checkpoint cannot restore its VAE in place".into())
        })?;
        let cfg = VaeConfig::detect(file.header(), VAE_PREFIX)?;
        self.vae = Vae::load(file.var_builder().pp(pp_name(VAE_PREFIX)), &cfg)?;
        Ok(())
    }

    /// Swaps in `vae` (from [`load_vae`]) if its latent space fits this checkpoint's UNet.
    pub fn replace_vae(&mut self, vae: Vae) -> Result<()> {
        let (want, got) = (self.vae.config().z_channels, vae.config().z_channels);
        if want != got || vae.downscale() != self.vae.downscale() {
            return Err(EngineError::InvalidParam(format!(
                "the VAE has {got} latent channels at 1/{} scale; this checkpoint needs {want} at 1/{}",
                vae.downscale(),
                self.vae.downscale()
            )));
        }
        self.vae = vae;
        Ok(())
    }

    /// Re-materialise the UNet and/or the text encoders from `vb`, which must serve the
    /// checkpoint's own key layout (e.g. the pristine file with LoRA deltas added). Each old
    /// network is dropped before its replacement is built, so peak memory stays at one copy;
    /// on error the checkpoint is gone and must be loaded again.
    pub fn rebuild(self, vb: &VarBuilder, unet: bool, text: bool) -> Result<Checkpoint> {
        let Checkpoint {
            info,
            unet: old_unet,
            vae,
            text: mut encoders,
            source,
        } = self;
        let unet = if unet {
            let cfg = old_unet.config().clone();
            drop(old_unet);
            UNet::load(vb.pp(pp_name(UNET_PREFIX)), &cfg)?
        } else {
            old_unet
        };
        if text {
            encoders.rebuild(vb)?;
        }
        Ok(Checkpoint {
            info,
            unet,
            vae,
            text: encoders,
            source,
        })
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("info", &self.info)
            .finish()
    }
}

/// Strip the trailing dot of a key prefix for `VarBuilder::pp`.
fn pp_name(prefix: &str) -> &str {
    prefix.strip_suffix('.').unwrap_or(prefix)
}

/// Load a checkpoint: a single-file `.safetensors` in the LDM/SGM layout, or a diffusers
/// pipeline folder (see [`folder`]).
pub fn load(path: &Path) -> Result<Checkpoint> {
    if path.is_dir() {
        return load_folder(path);
    }
    let file = Arc::new(safetensors_file::open(path)?);
    let header = file.header();
    let info = detect::checkpoint_info(header).ok_or_else(|| {
        let what = match detect::detect(header) {
            detect::ModelKind::Lora { .. } => "a LoRA",
            detect::ModelKind::Vae => "a VAE",
            detect::ModelKind::Embedding => "a textual-inversion embedding",
            _ => "not a Stable Diffusion checkpoint",
        };
        EngineError::UnknownModel(format!(
            "{} is {what} (no model.diffusion_model.* tensors)",
            path.display()
        ))
    })?;
    let unet_cfg = UNetConfig::detect(header, UNET_PREFIX, info.family)?;
    let vb = file.var_builder();
    let (unet, vae, text) = build(header, &vb, &info, unet_cfg, 1)?;
    let mut info = info;
    if info.family == Family::Sd2
        && !info.inpaint
        && detect::declared_v_prediction(header).is_none()
    {
        info.v_prediction = probe_v_prediction(&unet)?;
    }
    Ok(Checkpoint {
        info,
        unet,
        vae,
        text,
        source: Some(Arc::clone(&file)),
    })
}

/// Whether an SD 2.x UNet predicts v rather than noise, for files that do not say. The same probe
/// as A1111's: on a flat latent at the noisiest timestep, a v-model's output sits far below the
/// input (it predicts roughly `-x` there), a noise model's does not.
fn probe_v_prediction(unet: &UNet) -> Result<bool> {
    let dev = Device::Cpu;
    let x = Tensor::full(0.5f32, (1, 4, 8, 8), &dev)?;
    let t = Tensor::new(&[999f32], &dev)?;
    let context = Tensor::full(0.5f32, (1, 2, unet.config().context_dim), &dev)?;
    let out = unet.forward(&x, &t, &context, None)?;
    let mean = (out - &x)?.mean_all()?.to_scalar::<f32>()?;
    Ok(mean < -1.0)
}

/// Loads a standalone VAE file (A1111's `sd_vae`): the single-file (LDM) names, bare
/// (`encoder.*`, `decoder.*`, `quant_conv.*`) or under `first_stage_model.`, or diffusers'
/// `AutoencoderKL` names (`encoder.down_blocks.*`).
pub fn load_vae(path: &Path) -> Result<Vae> {
    let file = safetensors_file::open(path)?;
    let header = file.header();
    let prefix = if header.contains("encoder.conv_in.weight") {
        ""
    } else if header.contains(&format!("{VAE_PREFIX}encoder.conv_in.weight")) {
        VAE_PREFIX
    } else {
        return Err(EngineError::UnknownModel(format!(
            "{} is not a VAE (no encoder.conv_in.weight)",
            path.display()
        )));
    };
    if prefix.is_empty()
        && header
            .tensors
            .keys()
            .any(|k| k.starts_with("encoder.down_blocks."))
    {
        // diffusers' AutoencoderKL names: read through the single-file names.
        let view = folder::open_vae_file(path)?;
        let cfg = VaeConfig::detect(view.header(), VAE_PREFIX)?;
        return Vae::load(view.var_builder().pp(pp_name(VAE_PREFIX)), &cfg);
    }
    let cfg = VaeConfig::detect(header, prefix)?;
    let vb = file.var_builder();
    let vb = if prefix.is_empty() {
        vb
    } else {
        vb.pp(pp_name(prefix))
    };
    Vae::load(vb, &cfg)
}

/// Load a diffusers folder through its LDM-named view. LoRA needs the single-file layout
/// (`source` stays `None`).
fn load_folder(path: &Path) -> Result<Checkpoint> {
    let folder = folder::open(path)?;
    let header = folder.header();
    let info = folder.info()?;
    let unet_cfg = UNetConfig::detect(header, UNET_PREFIX, info.family)?;
    folder.check_unet_names(&unet_cfg)?;
    let vb = folder.var_builder();
    // diffusers folders of SD 2.x drop OpenCLIP-H's last block and use the last remaining
    // layer, which is the single file's penultimate one.
    let sd2_skip = 0;
    let (unet, vae, text) = build(header, &vb, &info, unet_cfg, sd2_skip)?;
    Ok(Checkpoint {
        info,
        unet,
        vae,
        text,
        source: None,
    })
}

/// Build the three networks from LDM-named tensors. `sd2_base_skip`: OpenCLIP-H layers
/// skipped at clip_skip 1 for SD 2.x.
fn build(
    header: &Header,
    vb: &VarBuilder,
    info: &CheckpointInfo,
    unet_cfg: UNetConfig,
    sd2_base_skip: usize,
) -> Result<(UNet, Vae, TextEncoders)> {
    let vae_cfg = VaeConfig::detect(header, VAE_PREFIX)?;
    let openai = EncoderUse {
        pad: EOS,
        base_skip: 0,
        final_norm: true,
    };
    let clip_specs: Vec<(&str, EncoderUse)> = match info.family {
        Family::Sd1 => vec![(SD1_CLIP_PREFIX, openai)],
        Family::Sd2 => vec![(
            SD2_CLIP_PREFIX,
            EncoderUse {
                pad: 0,
                base_skip: sd2_base_skip,
                final_norm: true,
            },
        )],
        Family::Sdxl => vec![
            (
                SDXL_CLIP_L_PREFIX,
                EncoderUse {
                    pad: EOS,
                    base_skip: 1,
                    final_norm: false,
                },
            ),
            (
                SDXL_CLIP_G_PREFIX,
                EncoderUse {
                    pad: 0,
                    base_skip: 1,
                    final_norm: false,
                },
            ),
        ],
    };
    let mut encoders = Vec::with_capacity(clip_specs.len());
    let mut prefixes = Vec::with_capacity(clip_specs.len());
    for (prefix, usage) in clip_specs {
        // Some older SD 1.x files lack the `text_model.` level (pre-4.x transformers layout).
        let prefix = if prefix == SD1_CLIP_PREFIX
            && !header.has_prefix(prefix)
            && header.has_prefix(SD1_CLIP_PREFIX_OLD)
        {
            SD1_CLIP_PREFIX_OLD
        } else {
            prefix
        };
        let cfg = ClipConfig::detect(header, prefix)?;
        encoders.push((ClipTextModel::load(vb.pp(pp_name(prefix)), &cfg)?, usage));
        prefixes.push(prefix.to_string());
    }
    let text = TextEncoders {
        family: info.family,
        encoders,
        prefixes,
    };
    if info.family == Family::Sdxl {
        check_sdxl_widths(&unet_cfg, &text)?;
    } else if let Some((e, _)) = text.encoders.first() {
        if e.config().hidden != unet_cfg.context_dim {
            return Err(EngineError::UnknownModel(format!(
                "text encoder width {} does not match the UNet's context width {}",
                e.config().hidden,
                unet_cfg.context_dim
            )));
        }
    }
    let unet = UNet::load(vb.pp(pp_name(UNET_PREFIX)), &unet_cfg)?;
    let vae = Vae::load(vb.pp(pp_name(VAE_PREFIX)), &vae_cfg)?;
    Ok((unet, vae, text))
}

fn check_sdxl_widths(unet: &UNetConfig, text: &TextEncoders) -> Result<()> {
    let ctx: usize = text.encoders.iter().map(|(e, _)| e.config().hidden).sum();
    let pooled = text
        .encoders
        .last()
        .and_then(|(e, _)| e.config().projection_dim)
        .ok_or_else(|| {
            EngineError::UnknownModel("SDXL OpenCLIP-G has no text_projection".into())
        })?;
    let adm = pooled + 6 * crate::models::unet::SDXL_TIME_ID_DIM;
    if ctx != unet.context_dim || Some(adm) != unet.adm_in_channels {
        return Err(EngineError::UnknownModel(format!(
            "SDXL text encoders give context {ctx} / vector {adm}, UNet expects {} / {:?}",
            unet.context_dim, unet.adm_in_channels
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::write_tiny_checkpoint;

    #[test]
    fn chunk_ids_pad() {
        let ids = chunk_ids(&[320, 1125], EOS).expect("ids");
        assert_eq!(ids.len(), 77);
        assert_eq!(&ids[..4], &[BOS, 320, 1125, EOS]);
        assert!(ids[4..].iter().all(|&i| i == EOS));
        let ids = chunk_ids(&[320], 0).expect("ids");
        assert_eq!(&ids[..4], &[BOS, 320, EOS, 0]);
        assert!(chunk_ids(&[1; 76], 0).is_err());
    }

    /// A tiny SD 2.x file that declares no prediction type, its UNet's last conv replaced by a
    /// constant output `bias` (zero weights), so the probe's answer is known.
    fn sd2_with_constant_output(dir: &Path, bias: f32) -> std::path::PathBuf {
        use crate::safetensors_file::{serialize, Dtype};
        let src = dir.join("src.safetensors");
        write_tiny_checkpoint(Family::Sd2, false, 5, &src).expect("write");
        let file = safetensors_file::open(&src).expect("open");
        let mut tensors = Vec::new();
        for (name, info) in &file.header().tensors {
            let (_, raw) = file.raw(name).expect("raw");
            let bytes = match name.as_str() {
                "model.diffusion_model.out.2.weight" => vec![0u8; raw.len()],
                "model.diffusion_model.out.2.bias" => {
                    assert_eq!(info.dtype, Dtype::F16);
                    let h = half::f16::from_f32(bias).to_le_bytes();
                    h.repeat(info.numel())
                }
                _ => raw.to_vec(),
            };
            tensors.push((name.clone(), info.dtype, info.shape.clone(), bytes));
        }
        let mut meta = file.header().metadata.clone();
        assert!(meta.remove("sd_engine.prediction_type").is_some());
        let out = dir.join(format!("sd2-{bias}.safetensors"));
        std::fs::write(&out, serialize(&tensors, &meta).expect("serialize")).expect("write");
        out
    }

    #[test]
    fn sd2_without_a_declared_prediction_type_is_probed() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Output -3 everywhere: far below the 0.5 input, as a v-model's is.
        let v = load(&sd2_with_constant_output(dir.path(), -3.0)).expect("load");
        assert!(v.info.v_prediction);
        let eps = load(&sd2_with_constant_output(dir.path(), 0.0)).expect("load");
        assert!(!eps.info.v_prediction);
        // A declared type is taken as it is, without probing.
        let declared = dir.path().join("declared.safetensors");
        write_tiny_checkpoint(Family::Sd2, false, 5, &declared).expect("write");
        assert!(!load(&declared).expect("load").info.v_prediction);
    }

    #[test]
    fn loads_every_tiny_family() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (fam, d, pooled) in [
            (Family::Sd1, 64, None),
            (Family::Sd2, 64, None),
            (Family::Sdxl, 192, Some(64)),
        ] {
            let p = dir.path().join(format!("{}.safetensors", fam.as_str()));
            write_tiny_checkpoint(fam, false, 3, &p).expect("write");
            let ck = load(&p).expect("load");
            assert_eq!(ck.info.family, fam);
            let (h, pool) = ck.text.encode_chunk(&[320, 1125, 539], 1).expect("encode");
            assert_eq!(h.dims(), &[77, d]);
            assert_eq!(pool.map(|p| p.dims().to_vec()), pooled.map(|p| vec![p]));
            assert_eq!(
                ck.text.hidden_parts().len(),
                if fam == Family::Sdxl { 2 } else { 0 }
            );
        }
    }

    #[test]
    fn old_sd1_text_layout_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("new.safetensors");
        write_tiny_checkpoint(Family::Sd1, false, 3, &p).expect("write");
        let f = safetensors_file::open(&p).expect("open");
        let tensors: Vec<_> = f
            .header()
            .tensors
            .keys()
            .map(|k| {
                let (info, bytes) = f.raw(k).expect("raw");
                let name = k.replace(SD1_CLIP_PREFIX, SD1_CLIP_PREFIX_OLD);
                (name, info.dtype, info.shape.clone(), bytes.to_vec())
            })
            .collect();
        let old = dir.path().join("old.safetensors");
        let bytes = safetensors_file::serialize(&tensors, &Default::default()).expect("ser");
        std::fs::write(&old, bytes).expect("write");
        let a = load(&p)
            .expect("new")
            .text
            .encode_chunk(&[320], 1)
            .expect("a")
            .0;
        let b = load(&old)
            .expect("old")
            .text
            .encode_chunk(&[320], 1)
            .expect("b")
            .0;
        let diff = (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn refuses_non_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.ckpt");
        std::fs::write(&p, b"\x80\x02}q\x00.").expect("write");
        assert!(matches!(load(&p), Err(EngineError::UnsafeFormat(_))));
        let p = dir.path().join("lora.safetensors");
        let bytes = crate::safetensors_file::serialize(
            &[(
                "lora_unet_a.lora_down.weight".to_string(),
                crate::safetensors_file::Dtype::F32,
                vec![1],
                vec![0; 4],
            )],
            &Default::default(),
        )
        .expect("serialize");
        std::fs::write(&p, bytes).expect("write");
        let e = load(&p).expect_err("lora");
        assert!(e.to_string().contains("LoRA"), "{e}");
    }
}
