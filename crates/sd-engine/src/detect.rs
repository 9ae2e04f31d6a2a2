//! What a `.safetensors` file is (checkpoint, LoRA, VAE, embedding) and which family, from its
//! header alone: tensor names and shapes, plus `__metadata__` where names cannot tell.
//!
//! This runs on every file the host scans, so it never touches tensor data.

use crate::api::{CheckpointInfo, Family};
use crate::models::unet::UNetConfig;
use crate::safetensors_file::Header;
use crate::{EngineError, Result};

/// The kind of model a file holds.
#[derive(Debug, Clone)]
pub enum ModelKind {
    Checkpoint(CheckpointInfo),
    Lora { family: Option<Family> },
    Vae,
    Embedding,
    Unknown,
}

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
/// SD 1.x text encoder (OpenAI CLIP-L, transformers layout).
pub const SD1_CLIP_PREFIX: &str = "cond_stage_model.transformer.text_model.";
/// SD 2.x text encoder (OpenCLIP-H, open_clip layout).
pub const SD2_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL CLIP-L (transformers layout).
pub const SDXL_CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.text_model.";
/// SDXL OpenCLIP-G (open_clip layout).
pub const SDXL_CLIP_G_PREFIX: &str = "conditioner.embedders.1.model.";

/// Family of a single-file checkpoint, or `None` if the file has no LDM UNet.
pub fn checkpoint_family(header: &Header) -> Option<Family> {
    if !header.contains(&format!("{UNET_PREFIX}input_blocks.0.0.weight")) {
        return None;
    }
    let sdxl = header.contains(&format!("{UNET_PREFIX}label_emb.0.0.weight"))
        || header.has_prefix("conditioner.embedders.");
    if sdxl {
        return Some(Family::Sdxl);
    }
    if header.has_prefix(SD2_CLIP_PREFIX) {
        return Some(Family::Sd2);
    }
    if header.has_prefix("cond_stage_model.transformer.") {
        return Some(Family::Sd1);
    }
    // No text encoder in the file (rare "UNet-only" exports): fall back on the context width.
    let ctx = header
        .names_with_prefix(UNET_PREFIX)
        .find(|k| k.ends_with("attn2.to_k.weight"))
        .and_then(|k| header.shape(k))
        .and_then(|s| s.get(1).copied());
    match ctx {
        Some(1024) => Some(Family::Sd2),
        Some(2048) => Some(Family::Sdxl),
        _ => Some(Family::Sd1),
    }
}

/// `true`/`false` from common metadata spellings of the prediction type, if present.
fn metadata_v_prediction(header: &Header) -> Option<bool> {
    for key in [
        "prediction_type",
        "modelspec.prediction_type",
        "sd_engine.prediction_type",
        "ss_v_parameterization",
        "v_prediction",
    ] {
        if let Some(v) = header.metadata.get(key) {
            let v = v.trim().to_ascii_lowercase();
            return Some(matches!(
                v.as_str(),
                "v" | "v_prediction" | "v-prediction" | "true" | "1"
            ));
        }
    }
    None
}

/// The prediction type the file declares: `__metadata__` (`prediction_type` /
/// `modelspec.prediction_type` = `v`/`v_prediction`, or kohya's `ss_v_parameterization`), or a
/// `v_pred` tensor some trainers add. `None` when it says nothing.
pub fn declared_v_prediction(header: &Header) -> Option<bool> {
    metadata_v_prediction(header).or(header.contains("v_pred").then_some(true))
}

/// Checkpoint facts from the header. v-prediction is what the file declares, else `false`; for
/// SD 2.x files that declare nothing, [`crate::checkpoint::load`] decides by probing the UNet (the
/// 768-v and 512-base models have identical tensor names and shapes).
pub fn checkpoint_info(header: &Header) -> Option<CheckpointInfo> {
    let family = checkpoint_family(header)?;
    let inpaint = header
        .shape(&format!("{UNET_PREFIX}input_blocks.0.0.weight"))
        .and_then(|s| s.get(1).copied())
        == Some(9);
    let v_prediction = declared_v_prediction(header).unwrap_or(false);
    Some(CheckpointInfo {
        family,
        inpaint,
        v_prediction,
    })
}

fn is_lora_key(k: &str) -> bool {
    k.starts_with("lora_unet_")
        || k.starts_with("lora_te")
        || k.ends_with(".lora_down.weight")
        || k.ends_with(".lora_up.weight")
        || k.ends_with(".lora_A.weight")
        || k.ends_with(".lora_B.weight")
        || k.contains(".hada_w1_")
        || k.contains(".lokr_w1")
        || k.starts_with("lycoris_")
}

/// Family a LoRA was trained for, from the widths of the layers it targets.
fn lora_family(header: &Header) -> Option<Family> {
    let mut te2 = false;
    for (k, t) in &header.tensors {
        if k.starts_with("lora_te2_") || k.contains("text_encoder_2.") {
            te2 = true;
        }
        // Cross-attention key/value projections read the text context: its width names the family.
        let kv = k.contains("attn2_to_k")
            || k.contains("attn2_to_v")
            || k.contains("attn2.to_k")
            || k.contains("attn2.to_v");
        let down = k.ends_with("lora_down.weight") || k.ends_with("lora_A.weight");
        if kv && down {
            match t.shape.get(1) {
                Some(768) => return Some(Family::Sd1),
                Some(1024) => return Some(Family::Sd2),
                Some(2048) => return Some(Family::Sdxl),
                _ => {}
            }
        }
    }
    if te2 {
        return Some(Family::Sdxl);
    }
    // Text-encoder-only LoRAs: CLIP-L (768) vs OpenCLIP-H (1024).
    for (k, t) in &header.tensors {
        if (k.starts_with("lora_te_") || k.starts_with("lora_te1_"))
            && k.ends_with("lora_down.weight")
            && k.contains("self_attn_q_proj")
        {
            match t.shape.get(1) {
                Some(768) => return Some(Family::Sd1),
                Some(1024) => return Some(Family::Sd2),
                _ => {}
            }
        }
    }
    None
}

/// Classify a file from its header.
pub fn detect(header: &Header) -> ModelKind {
    if let Some(info) = checkpoint_info(header) {
        return ModelKind::Checkpoint(info);
    }
    if header.tensors.keys().any(|k| is_lora_key(k)) {
        return ModelKind::Lora {
            family: lora_family(header),
        };
    }
    let names = || header.tensors.keys();
    if header.contains("emb_params")
        || names().any(|k| k.starts_with("string_to_param."))
        || (header.contains("clip_l") || header.contains("clip_g")) && header.tensors.len() <= 2
    {
        return ModelKind::Embedding;
    }
    let vae = names().any(|k| k.starts_with("encoder.") || k.starts_with("decoder."))
        || names().any(|k| k.starts_with(VAE_PREFIX));
    if vae {
        return ModelKind::Vae;
    }
    ModelKind::Unknown
}

/// The UNet configuration of a single-file checkpoint.
pub fn unet_config(header: &Header) -> Result<UNetConfig> {
    let family = checkpoint_family(header)
        .ok_or_else(|| EngineError::UnknownModel("no model.diffusion_model.* tensors".into()))?;
    UNetConfig::detect(header, UNET_PREFIX, family)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors_file::{Dtype, TensorInfo};

    fn header(entries: &[(&str, &[usize])]) -> Header {
        let mut h = Header::default();
        for (k, s) in entries {
            h.tensors.insert(
                k.to_string(),
                TensorInfo {
                    dtype: Dtype::F16,
                    shape: s.to_vec(),
                    data_offsets: (0, 0),
                },
            );
        }
        h
    }

    #[test]
    fn checkpoints_by_family() {
        let conv4: &[usize] = &[320, 4, 3, 3];
        let conv9: &[usize] = &[320, 9, 3, 3];
        let sd1 = header(&[
            ("model.diffusion_model.input_blocks.0.0.weight", conv4),
            (
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                &[49408, 768],
            ),
        ]);
        assert!(matches!(
            detect(&sd1),
            ModelKind::Checkpoint(CheckpointInfo {
                family: Family::Sd1,
                inpaint: false,
                v_prediction: false
            })
        ));
        let mut sd2 = header(&[
            ("model.diffusion_model.input_blocks.0.0.weight", conv9),
            (
                "cond_stage_model.model.token_embedding.weight",
                &[49408, 1024],
            ),
        ]);
        assert!(matches!(
            detect(&sd2),
            ModelKind::Checkpoint(CheckpointInfo {
                family: Family::Sd2,
                inpaint: true,
                v_prediction: false
            })
        ));
        sd2.metadata
            .insert("prediction_type".into(), "v_prediction".into());
        assert!(matches!(
            detect(&sd2),
            ModelKind::Checkpoint(CheckpointInfo {
                v_prediction: true,
                ..
            })
        ));
        let xl = header(&[
            ("model.diffusion_model.input_blocks.0.0.weight", conv4),
            ("model.diffusion_model.label_emb.0.0.weight", &[1280, 2816]),
            (
                "conditioner.embedders.1.model.token_embedding.weight",
                &[49408, 1280],
            ),
        ]);
        assert!(matches!(
            detect(&xl),
            ModelKind::Checkpoint(CheckpointInfo {
                family: Family::Sdxl,
                ..
            })
        ));
    }

    #[test]
    fn loras_embeddings_vaes() {
        let l = header(&[
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight", &[4, 2048]),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight", &[640, 4]),
        ]);
        assert!(matches!(
            detect(&l),
            ModelKind::Lora {
                family: Some(Family::Sdxl)
            }
        ));
        let l = header(&[(
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight",
            &[4, 768],
        )]);
        assert!(matches!(
            detect(&l),
            ModelKind::Lora {
                family: Some(Family::Sd1)
            }
        ));
        let l = header(&[(
            "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a",
            &[4, 4],
        )]);
        assert!(matches!(detect(&l), ModelKind::Lora { family: None }));
        let l = header(&[(
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lokr_w1",
            &[4, 4],
        )]);
        assert!(matches!(
            detect(&l),
            ModelKind::Lora {
                family: Some(Family::Sdxl)
            }
        ));
        assert!(matches!(
            detect(&header(&[("emb_params", &[2, 768])])),
            ModelKind::Embedding
        ));
        assert!(matches!(
            detect(&header(&[("string_to_param.*", &[2, 768])])),
            ModelKind::Embedding
        ));
        assert!(matches!(
            detect(&header(&[("clip_l", &[2, 768]), ("clip_g", &[2, 1280])])),
            ModelKind::Embedding
        ));
        assert!(matches!(
            detect(&header(&[("decoder.conv_in.weight", &[512, 4, 3, 3])])),
            ModelKind::Vae
        ));
        assert!(matches!(
            detect(&header(&[("foo", &[1])])),
            ModelKind::Unknown
        ));
    }
}
