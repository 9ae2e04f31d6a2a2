//! The task request (SPEC §4 Tasks), its validation, and the resolved parameters stored with a task.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::LimitsConfig;
use crate::error::{ApiError, FieldError};

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct LoraRef {
    /// Model sha256 (or `id`, the same thing; a LoRA name is accepted too).
    pub sha256: Option<String>,
    pub id: Option<String>,
    #[serde(default = "one")]
    pub weight: f32,
    /// Adds the model's trained words to the prompt with this attention weight.
    pub trigger_weight: Option<f32>,
}

fn one() -> f32 {
    1.0
}

/// `POST /api/v1/tasks` body.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct TaskRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    /// Checkpoint sha256; default: the loaded checkpoint, else `engine.default_checkpoint`.
    pub model: Option<String>,
    /// `data:image/png;base64,...` (PNG, JPEG or WebP) → img2img.
    pub init_image: Option<String>,
    /// An image already in the store → img2img.
    pub init_image_hash: Option<String>,
    /// Inpainting mask as a data URL (white = repaint).
    pub mask: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub num_images: Option<u32>,
    pub num_inference_steps: Option<u32>,
    pub guidance_scale: Option<f64>,
    pub strength: Option<f64>,
    pub scheduler: Option<String>,
    /// normal | karras | exponential
    pub schedule_type: Option<String>,
    /// null or -1 → random (the chosen seed is recorded).
    pub seed: Option<i64>,
    /// png | jpg | jpeg | webp
    pub output_format: Option<String>,
    pub callback_url: Option<String>,
    #[serde(default)]
    pub loras: Vec<LoraRef>,
    pub clip_skip: Option<u32>,
    /// A VAE from the library (sha256) to decode with instead of the checkpoint's own.
    pub vae: Option<String>,
    #[serde(default)]
    pub priority: i64,
    /// Attributes attached to every output image.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResolvedLora {
    pub sha256: String,
    pub name: String,
    pub weight: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResolvedVae {
    pub sha256: String,
    pub name: String,
}

/// What a task runs with, everything resolved (stored as the task's `params`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskParams {
    /// Prompt as given (LoRA tags included, as A1111 keeps them in infotext).
    pub prompt: String,
    /// What the engine gets: LoRA tags removed, trigger words added.
    pub engine_prompt: String,
    pub negative_prompt: String,
    pub model: String,
    pub model_name: String,
    pub family: String,
    pub width: u32,
    pub height: u32,
    pub num_images: u32,
    pub num_inference_steps: u32,
    pub guidance_scale: f64,
    /// img2img only.
    pub strength: Option<f64>,
    /// A1111 sampler name.
    pub scheduler: String,
    pub schedule_type: Option<String>,
    pub seed: u64,
    pub output_format: String,
    pub loras: Vec<ResolvedLora>,
    pub clip_skip: u32,
    /// The standalone VAE decoding instead of the checkpoint's own (`name` is the file name, as
    /// A1111's infotext records it).
    #[serde(default)]
    pub vae: Option<ResolvedVae>,
    /// Stored source image and mask (sha256 of the uploaded bytes, under `<data_dir>/inputs`).
    pub init_image: Option<String>,
    pub mask: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// A decoded, validated upload (bytes kept to store, pixels to use).
pub struct Upload {
    pub bytes: Vec<u8>,
    pub image: image::DynamicImage,
}

/// LoRAs one task may apply (request list and prompt tags together).
pub const MAX_LORAS: usize = 16;
pub const MAX_METADATA_KEYS: usize = 100;
pub const MAX_METADATA_VALUE: usize = 8192;

/// Collects every field error, so one response lists them all.
#[derive(Default)]
pub struct Errors(pub Vec<FieldError>);

impl Errors {
    pub fn add(&mut self, field: &str, msg: impl Into<String>) {
        self.0.push(FieldError::body(field, msg));
    }
    pub fn into_result(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

/// Checks of the request alone (no database): sizes, counts, finite numbers, known names.
pub fn validate_shape(r: &TaskRequest, l: &LimitsConfig) -> Result<(), ApiError> {
    let mut e = Errors::default();
    if r.prompt.chars().count() > l.max_prompt_chars {
        e.add(
            "prompt",
            format!("at most {} characters", l.max_prompt_chars),
        );
    }
    if r.negative_prompt.chars().count() > l.max_prompt_chars {
        e.add(
            "negative_prompt",
            format!("at most {} characters", l.max_prompt_chars),
        );
    }
    for (name, v, max) in [
        ("width", r.width, l.max_width),
        ("height", r.height, l.max_height),
    ] {
        if let Some(v) = v {
            if v == 0 || v % 8 != 0 {
                e.add(name, "must be a positive multiple of 8");
            } else if v > max {
                e.add(name, format!("at most {max}"));
            }
        }
    }
    if let (Some(w), Some(h)) = (r.width, r.height) {
        if w as u64 * h as u64 > l.max_pixels {
            e.add(
                "width",
                format!("width × height must be at most {}", l.max_pixels),
            );
        }
    }
    if let Some(n) = r.num_images {
        if n == 0 || n > l.max_num_images {
            e.add("num_images", format!("must be 1..{}", l.max_num_images));
        }
    }
    if let Some(s) = r.num_inference_steps {
        if s == 0 || s > l.max_steps {
            e.add("num_inference_steps", format!("must be 1..{}", l.max_steps));
        }
    }
    if let Some(g) = r.guidance_scale {
        if !g.is_finite() || !(0.0..=100.0).contains(&g) {
            e.add("guidance_scale", "must be a finite number in 0..100");
        }
    }
    if let Some(s) = r.strength {
        if !s.is_finite() || s <= 0.0 || s > 1.0 {
            e.add("strength", "must be in (0, 1]");
        }
    }
    if let Some(c) = r.clip_skip {
        if !(1..=12).contains(&c) {
            e.add("clip_skip", "must be 1..12");
        }
    }
    if let Some(s) = &r.scheduler {
        if let Err(err) = sd_engine::sched::canonical(s) {
            e.add("scheduler", err.to_string());
        }
    }
    if let Some(st) = &r.schedule_type {
        let st = st.to_ascii_lowercase();
        if !["normal", "karras", "exponential", "automatic", "uniform"].contains(&st.as_str()) {
            e.add(
                "schedule_type",
                "unknown schedule type; valid: normal, karras, exponential",
            );
        }
    }
    if let Some(f) = &r.output_format {
        if !["png", "jpg", "jpeg", "webp"].contains(&f.to_ascii_lowercase().as_str()) {
            e.add("output_format", "must be one of png, jpg, jpeg, webp");
        }
    }
    if let Some(seed) = r.seed {
        if seed < -1 {
            e.add("seed", "must be ≥ 0 (or -1 for random)");
        }
    }
    for (field, v) in [("model", &r.model), ("vae", &r.vae)] {
        if v.as_deref()
            .is_some_and(|m| !crate::api::extract::is_sha256_hex(m))
        {
            e.add(field, "must be a SHA-256 (64 lowercase hex characters)");
        }
    }
    if r.init_image.is_some() && r.init_image_hash.is_some() {
        e.add("init_image", "give init_image or init_image_hash, not both");
    }
    if let Some(h) = &r.init_image_hash {
        if !crate::api::extract::is_sha256_hex(h) {
            e.add(
                "init_image_hash",
                "must be a SHA-256 (64 lowercase hex characters)",
            );
        }
    }
    if r.mask.is_some() && r.init_image.is_none() && r.init_image_hash.is_none() {
        e.add("mask", "a mask needs init_image");
    }
    if r.loras.len() > MAX_LORAS {
        e.add("loras", format!("at most {MAX_LORAS} LoRAs"));
    }
    if r.metadata.len() > MAX_METADATA_KEYS {
        e.add(
            "metadata",
            format!("at most {MAX_METADATA_KEYS} attributes"),
        );
    }
    for (k, v) in &r.metadata {
        if k.is_empty() || k.chars().count() > 128 || k.chars().any(char::is_control) {
            e.add(
                "metadata",
                "attribute names are 1..128 printable characters",
            );
        } else if v.to_string().len() > MAX_METADATA_VALUE {
            e.add(
                &format!("metadata.{k}"),
                format!("at most {MAX_METADATA_VALUE} bytes of JSON"),
            );
        }
    }
    for (i, lr) in r.loras.iter().enumerate() {
        if lr.sha256.is_none() && lr.id.is_none() {
            e.add(&format!("loras[{i}]"), "needs sha256 or id");
        }
        if !lr.weight.is_finite() || lr.weight.abs() > 10.0 {
            e.add(
                &format!("loras[{i}].weight"),
                "must be a finite number in -10..10",
            );
        }
        if lr
            .trigger_weight
            .is_some_and(|w| !w.is_finite() || w.abs() > 10.0)
        {
            e.add(
                &format!("loras[{i}].trigger_weight"),
                "must be a finite number in -10..10",
            );
        }
    }
    if let Some(cb) = &r.callback_url {
        if cb.len() > 2048 {
            e.add("callback_url", "too long");
        }
    }
    e.into_result()
}

/// Decodes a `data:image/...;base64,` URL (or bare base64), checking the byte size and the
/// dimensions from the header before decoding the pixels.
pub fn decode_data_url(field: &str, s: &str, l: &LimitsConfig) -> Result<Upload, ApiError> {
    let b64 = match s.strip_prefix("data:") {
        Some(rest) => {
            let (meta, data) = rest
                .split_once(',')
                .ok_or_else(|| ApiError::field(&["body", field], "malformed data URL"))?;
            if !meta.ends_with(";base64") {
                return Err(ApiError::field(&["body", field], "data URL must be base64"));
            }
            data
        }
        None => s,
    };
    // 4 base64 chars per 3 bytes: refuse before allocating the decoded buffer.
    if b64.len() / 4 * 3 > l.max_init_image_bytes + 3 {
        return Err(ApiError::PayloadTooLarge(format!(
            "{field} is larger than {} bytes",
            l.max_init_image_bytes
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| ApiError::field(&["body", field], "invalid base64"))?;
    decode_image_bytes(field, bytes, l)
}

/// Decodes PNG/JPEG/WebP bytes under the configured limits (no decompression bombs).
pub fn decode_image_bytes(
    field: &str,
    bytes: Vec<u8>,
    l: &LimitsConfig,
) -> Result<Upload, ApiError> {
    use image::ImageFormat;
    if bytes.len() > l.max_init_image_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "{field} is larger than {} bytes",
            l.max_init_image_bytes
        )));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|_| ApiError::field(&["body", field], "unreadable image"))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        _ => {
            return Err(ApiError::field(
                &["body", field],
                "not a PNG, JPEG or WebP image",
            ))
        }
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|_| ApiError::field(&["body", field], "unreadable image header"))?;
    if w == 0 || h == 0 || w > l.max_width || h > l.max_height || w as u64 * h as u64 > l.max_pixels
    {
        return Err(ApiError::field(
            &["body", field],
            format!(
                "image is {w}×{h}; the limits are {}×{} and {} pixels",
                l.max_width, l.max_height, l.max_pixels
            ),
        ));
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|_| ApiError::field(&["body", field], "unreadable image"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(l.max_width);
    limits.max_image_height = Some(l.max_height);
    limits.max_alloc = Some(l.max_pixels.saturating_mul(16));
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| ApiError::field(&["body", field], format!("cannot decode image: {e}")))?;
    Ok(Upload { bytes, image })
}

/// The `seed` rule: null or -1 → a fresh random seed in A1111's range.
pub fn resolve_seed(seed: Option<i64>) -> u64 {
    match seed {
        Some(s) if s >= 0 => s as u64,
        _ => {
            let r = uuid::Uuid::new_v4().as_u128();
            (r as u64) % 4_294_967_295
        }
    }
}

pub fn rgb_from(img: &image::DynamicImage, w: u32, h: u32) -> sd_engine::RgbImage {
    let img = if img.width() == w && img.height() == h {
        img.to_rgb8()
    } else {
        img.resize_exact(w, h, image::imageops::FilterType::Lanczos3)
            .to_rgb8()
    };
    sd_engine::RgbImage {
        width: w,
        height: h,
        data: img.into_raw(),
    }
}

pub fn gray_from(img: &image::DynamicImage, w: u32, h: u32) -> sd_engine::GrayImage {
    let img = if img.width() == w && img.height() == h {
        img.to_luma8()
    } else {
        img.resize_exact(w, h, image::imageops::FilterType::Triangle)
            .to_luma8()
    };
    sd_engine::GrayImage {
        width: w,
        height: h,
        data: img.into_raw(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LimitsConfig {
        crate::config::Config::load_from(None, &[], &Default::default())
            .unwrap()
            .limits
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::DynamicImage::new_rgb8(w, h)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn shape_errors_are_listed_per_field() {
        let r = TaskRequest {
            prompt: "x".into(),
            width: Some(513),
            num_images: Some(11),
            scheduler: Some("Bogus".into()),
            guidance_scale: Some(f64::NAN),
            ..Default::default()
        };
        let Err(ApiError::Validation(errs)) = validate_shape(&r, &limits()) else {
            panic!("expected validation error")
        };
        let fields: Vec<_> = errs.iter().map(|e| e.loc[1].as_str()).collect();
        assert_eq!(
            fields,
            ["width", "num_images", "guidance_scale", "scheduler"]
        );
        assert!(
            errs[3].msg.contains("Euler a"),
            "lists valid names: {}",
            errs[3].msg
        );
        let ok = TaskRequest {
            prompt: "x".into(),
            scheduler: Some("DPM++ 2M Karras".into()),
            ..Default::default()
        };
        assert!(validate_shape(&ok, &limits()).is_ok());
    }

    #[test]
    fn images_checked_before_decoding() {
        let l = limits();
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png(16, 8))
        );
        let up = decode_data_url("init_image", &url, &l).unwrap();
        assert_eq!((up.image.width(), up.image.height()), (16, 8));
        assert!(decode_data_url("init_image", "data:image/png;base64,!!!", &l).is_err());
        let text = base64::engine::general_purpose::STANDARD.encode(b"hello world");
        assert!(decode_data_url("init_image", &text, &l).is_err());
        let mut small = l.clone();
        small.max_width = 8;
        let err = decode_data_url("init_image", &url, &small).err().unwrap();
        assert_eq!(err.status().as_u16(), 422);
        small.max_init_image_bytes = 10;
        let err = decode_data_url("init_image", &url, &small).err().unwrap();
        assert_eq!(err.status().as_u16(), 413);
    }
}
