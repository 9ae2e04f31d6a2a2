//! The engine's public, synchronous contract. The host depends only on what is here.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Result;

/// Model families the engine recognises from tensor names and shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Sd1 => "sd1",
            Family::Sd2 => "sd2",
            Family::Sdxl => "sdxl",
        }
    }
    /// Default output edge in pixels (SPEC §4).
    pub fn default_size(self) -> u32 {
        match self {
            Family::Sd1 => 512,
            Family::Sd2 => 768,
            Family::Sdxl => 1024,
        }
    }
}

/// What a loaded checkpoint turned out to be.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub family: Family,
    /// 9-channel UNet (inpainting checkpoint).
    pub inpaint: bool,
    /// SD 2.x 768-v and similar.
    pub v_prediction: bool,
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// An 8-bit single-channel mask; 255 = repaint, 0 = keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrayImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// One generation call. `num_images` images are made with seeds `seed`, `seed + 1`, ...
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    /// Diffusers or A1111 sampler name (see [`crate::sched`] once it exists).
    pub scheduler: String,
    /// `normal`, `karras` or `exponential`; `None` = the sampler's default.
    pub schedule_type: Option<String>,
    pub seed: u64,
    pub num_images: u32,
    /// img2img source; resized by the caller to `width`×`height`.
    pub init_image: Option<RgbImage>,
    /// Inpainting mask, same size as `init_image`.
    pub mask: Option<GrayImage>,
    /// img2img denoising strength 0..=1.
    pub strength: f64,
    /// 1 = last layer (no skip), 2 = penultimate, ...
    pub clip_skip: u32,
    /// Emit a preview image every N steps (0 = never).
    pub preview_every: u32,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            steps: 20,
            guidance_scale: 7.0,
            scheduler: "DPM++ 2M".into(),
            schedule_type: None,
            seed: 0,
            num_images: 1,
            init_image: None,
            mask: None,
            strength: 0.75,
            clip_skip: 1,
            preview_every: 0,
        }
    }
}

/// Reported after every sampling step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// 1-based step just finished.
    pub step: u32,
    pub total_steps: u32,
    /// 0-based index of the image being made.
    pub image_index: u32,
    /// Small RGB preview from a linear latent projection, when due.
    pub preview: Option<RgbImage>,
}

/// The progress callback's answer at a step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop the whole call: [`crate::EngineError::Cancelled`].
    Cancel,
    /// Stop sampling the current image, decode it as it stands, and go on with the next one
    /// (A1111's "skip").
    SkipImage,
    /// Stop sampling the current image, decode it as it stands, and return the images made so
    /// far without starting another (A1111's "interrupt").
    Finish,
}

/// One LoRA-family file (LoRA, LoCon, LoHA, LoKr) to apply with a strength.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub path: PathBuf,
    /// Strength; 0 leaves the model untouched, negative values are allowed.
    pub weight: f32,
    /// Shown in reports and errors.
    pub name: String,
}

/// What one LoRA file of a [`Backend::set_loras`] call did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoraFileReport {
    pub name: String,
    pub weight: f32,
    /// Model modules the file adapts (counted even when `weight` is 0).
    pub unet_modules: usize,
    pub text_modules: usize,
    /// Adapter kinds found, sorted: `full`, `locon`, `loha`, `lokr`, `lora`.
    pub kinds: Vec<String>,
    /// Tensors the engine did not use (unknown module or unsupported part), and up to 8 of them.
    pub unknown_keys: usize,
    pub unknown_examples: Vec<String>,
}

/// Result of [`Backend::set_loras`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoraReport {
    /// One entry per requested file, in request order.
    pub loras: Vec<LoraFileReport>,
    /// Whether the UNet / text encoders were re-materialised (false when their LoRA set did
    /// not change).
    pub rebuilt_unet: bool,
    pub rebuilt_text: bool,
    /// Wall time of the call.
    pub elapsed_ms: u64,
}

/// A textual-inversion embedding file and the prompt word that triggers it (A1111 uses the
/// file stem).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingSpec {
    pub path: PathBuf,
    pub name: String,
}

/// Result of [`Backend::set_embeddings`], judged against the loaded checkpoint (all readable
/// files count as active while none is loaded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingReport {
    /// (name, vectors) usable with the loaded checkpoint.
    pub active: Vec<(String, usize)>,
    /// (name, reason) for files that were not readable or do not fit the checkpoint.
    pub skipped: Vec<(String, String)>,
}

/// The synchronous engine contract the host drives from its worker thread.
pub trait Backend: Send {
    /// Load a checkpoint, replacing (and freeing) any loaded one.
    fn load_checkpoint(&mut self, path: &Path) -> Result<CheckpointInfo>;
    /// Drop the loaded checkpoint and return its memory.
    fn unload(&mut self);
    fn loaded(&self) -> Option<&CheckpointInfo>;
    /// Make `params.num_images` images. Returns [`crate::EngineError::Cancelled`] when the
    /// callback answers [`Control::Cancel`]; [`Control::SkipImage`] cuts one image short and
    /// [`Control::Finish`] returns early with what is done.
    fn generate(
        &mut self,
        params: &GenerateParams,
        progress: &mut dyn FnMut(&Progress) -> Control,
    ) -> Result<Vec<RgbImage>>;
    /// Replace the applied LoRA set (an empty slice removes every LoRA). Files are applied in
    /// order, each with its weight; weight-0 entries are checked but change nothing. The result
    /// is exact: the same set always gives bit-identical weights, and the empty set gives the
    /// pristine checkpoint. On error (unreadable file, LoRA for another family) the previous
    /// set stays applied. [`Backend::load_checkpoint`] starts with no LoRA.
    fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<LoraReport>;
    /// Replace the textual-inversion embeddings the prompt can use by name. Kept across
    /// checkpoint loads; each generation uses those that fit the loaded checkpoint.
    fn set_embeddings(&mut self, embeddings: &[EmbeddingSpec]) -> Result<EmbeddingReport>;
    /// Decode with the standalone VAE file at `path` instead of the checkpoint's own (`None`:
    /// back to the checkpoint's). A checkpoint load always starts with its own VAE.
    fn set_vae(&mut self, path: Option<&Path>) -> Result<()> {
        let _ = path;
        Err(crate::EngineError::InvalidParam(
            "this engine cannot swap VAEs".into(),
        ))
    }
    /// The standalone VAE in use, if any.
    fn vae(&self) -> Option<&Path> {
        None
    }
}
