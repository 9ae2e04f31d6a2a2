//! Storing generated images: encode → blob (durable) → database row → gallery event.

use bytes::Bytes;

use crate::db::images::ImageRecord;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// A finished image from the engine with what produced it.
pub struct GeneratedImage {
    pub rgb: sd_engine::RgbImage,
    /// png | jpeg | webp
    pub format: String,
    pub task_id: Option<String>,
    /// Checkpoint sha256.
    pub model: Option<String>,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: i64,
    pub steps: i64,
    pub guidance_scale: f64,
    pub scheduler: String,
    /// Full parameters, stored with the row and in the file's metadata.
    pub params: serde_json::Value,
    /// Caller-supplied attributes (`metadata` on a task).
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// Serialises "blob + row" writes against deletes and the orphan sweep in this process, so a delete or a
/// sweep never removes a blob that a concurrent store of identical bytes is about to point a row at.
static STORE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Encodes and stores one image; returns its record. The row is written only after the blob is durable.
pub async fn store_generated(state: &AppState, img: GeneratedImage) -> ApiResult<ImageRecord> {
    let (w, h) = (img.rgb.width, img.rgb.height);
    // PNG/WebP encoding of a large image takes a while: keep it off the async workers.
    let (img, encoded) = tokio::task::spawn_blocking(move || {
        let encoded = encode_image(&img);
        (img, encoded)
    })
    .await
    .map_err(ApiError::internal)?;
    let encoded = encoded?;
    let bytes_len = encoded.len() as i64;
    let guard = STORE_LOCK.lock().await;
    let hash = state
        .blobs
        .put(Bytes::from(encoded))
        .await
        .map_err(ApiError::internal)?;
    let record = ImageRecord {
        hash,
        format: normalise_format(&img.format).to_string(),
        width: w as i64,
        height: h as i64,
        bytes: bytes_len,
        created_at: crate::db::now_ms(),
        task_id: img.task_id.clone(),
        model: img.model.clone(),
        prompt: Some(img.prompt.clone()),
        negative_prompt: Some(img.negative_prompt.clone()),
        seed: Some(img.seed),
        steps: Some(img.steps),
        guidance_scale: Some(img.guidance_scale),
        scheduler: Some(img.scheduler.clone()),
        params: Some(img.params.clone()),
    };
    state.repo.insert_image(&record, &img.attributes).await?;
    drop(guard);
    state
        .metrics
        .images_stored
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    state.events.publish(
        "gallery",
        "image",
        serde_json::json!({
            "hash": record.hash,
            "url": state.image_url(&record.hash),
            "thumbnail_url": thumbnail_url(state, &record.hash),
            "task_id": record.task_id,
        }),
        false,
    );
    Ok(record)
}

pub fn thumbnail_url(state: &AppState, hash: &str) -> String {
    format!("{}/thumbnail", state.image_url(hash))
}

/// Deletes rows first, then blobs and cached thumbnails, so no row ever points at a missing blob.
/// Returns (deleted, not_found). Ids must already be validated.
pub async fn delete_images(
    state: &AppState,
    hashes: &[String],
) -> ApiResult<(Vec<String>, Vec<String>)> {
    let _guard = STORE_LOCK.lock().await;
    let deleted = state.repo.delete_images(hashes).await?;
    for h in &deleted {
        if let Err(e) = state.blobs.delete(h).await {
            // The row is gone; the sweep removes the blob later.
            tracing::warn!(hash = %h, error = %e, "deleting image blob failed");
        }
        super::thumbs::remove_cached(state, h).await;
    }
    let not_found = hashes
        .iter()
        .filter(|h| !deleted.contains(h))
        .cloned()
        .collect();
    Ok((deleted, not_found))
}

/// Removes blobs that have no database row (a crash between blob write and row insert, or a failed delete).
/// `min_age` spares blobs younger than that (another process may be between its two writes).
pub async fn sweep_orphans(state: &AppState, min_age: std::time::Duration) -> ApiResult<usize> {
    let _guard = STORE_LOCK.lock().await;
    let blobs = state
        .blobs
        .list_with_age()
        .await
        .map_err(ApiError::internal)?;
    let names: Vec<String> = blobs.iter().map(|(h, _)| h.clone()).collect();
    let known = state.repo.existing_images(&names).await?;
    let mut removed = 0;
    for (hash, age) in blobs {
        if known.contains(&hash) || age < min_age {
            continue;
        }
        match state.blobs.delete(&hash).await {
            Ok(()) => {
                removed += 1;
                super::thumbs::remove_cached(state, &hash).await;
            }
            Err(e) => tracing::warn!(hash = %hash, error = %e, "sweep: deleting orphan failed"),
        }
    }
    if removed > 0 {
        tracing::info!(removed, "sweep removed image blobs without a database row");
    }
    Ok(removed)
}

pub fn normalise_format(f: &str) -> &'static str {
    match f.to_ascii_lowercase().as_str() {
        "jpg" | "jpeg" => "jpeg",
        "webp" => "webp",
        _ => "png",
    }
}

/// The parameters written into the file: `params`, completed from the struct's own fields.
pub fn file_params(img: &GeneratedImage) -> serde_json::Value {
    let mut p = match &img.params {
        serde_json::Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    let mut fill = |k: &str, v: serde_json::Value| {
        if p.get(k).is_none_or(serde_json::Value::is_null) {
            p.insert(k.to_string(), v);
        }
    };
    fill("prompt", img.prompt.clone().into());
    fill("negative_prompt", img.negative_prompt.clone().into());
    fill("seed", img.seed.into());
    fill("num_inference_steps", img.steps.into());
    fill("guidance_scale", img.guidance_scale.into());
    fill("scheduler", img.scheduler.clone().into());
    fill("width", img.rgb.width.into());
    fill("height", img.rgb.height.into());
    if let Some(m) = &img.model {
        fill("model", m.clone().into());
    }
    serde_json::Value::Object(p)
}

/// The one encoder for generated images (server and `sd-host generate`): PNG with `parameters` (A1111
/// infotext) and `sd-host` (JSON) text chunks; JPEG/WebP with the infotext as EXIF UserComment.
pub fn encode_image(img: &GeneratedImage) -> ApiResult<Vec<u8>> {
    use image::ImageEncoder;
    let params = file_params(img);
    let info = super::infotext::infotext(&params);
    let mut out = Vec::new();
    let (w, h) = (img.rgb.width, img.rgb.height);
    if img.rgb.data.len() != (w as usize) * (h as usize) * 3 {
        return Err(ApiError::internal("image buffer does not match its size"));
    }
    match normalise_format(&img.format) {
        "jpeg" => {
            let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92);
            enc.set_exif_metadata(super::metadata::exif_user_comment(&info))
                .map_err(ApiError::internal)?;
            enc.write_image(&img.rgb.data, w, h, image::ExtendedColorType::Rgb8)
                .map_err(ApiError::internal)?;
        }
        "webp" => {
            let mut enc = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
            enc.set_exif_metadata(super::metadata::exif_user_comment(&info))
                .map_err(ApiError::internal)?;
            enc.write_image(&img.rgb.data, w, h, image::ExtendedColorType::Rgb8)
                .map_err(ApiError::internal)?;
        }
        _ => {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            for (key, text) in [
                (super::metadata::PNG_PARAMETERS_KEY, info),
                (super::metadata::PNG_SDHOST_KEY, params.to_string()),
            ] {
                // PIL's rule: tEXt when the text is Latin-1, otherwise UTF-8 iTXt.
                if super::metadata::is_latin1(&text) {
                    enc.add_text_chunk(key.to_string(), text)
                } else {
                    enc.add_itxt_chunk(key.to_string(), text)
                }
                .map_err(ApiError::internal)?;
            }
            let mut writer = enc.write_header().map_err(ApiError::internal)?;
            writer
                .write_image_data(&img.rgb.data)
                .map_err(ApiError::internal)?;
            writer.finish().map_err(ApiError::internal)?;
        }
    }
    Ok(out)
}

impl GeneratedImage {
    /// Image `index` of a task (seed `seed + index`).
    pub fn from_task(
        task_id: Option<&str>,
        p: &crate::queue::request::TaskParams,
        index: u32,
        rgb: sd_engine::RgbImage,
    ) -> Self {
        let mut params = serde_json::to_value(p).unwrap_or_default();
        let seed = p.seed + index as u64;
        if let Some(o) = params.as_object_mut() {
            o.insert("seed".into(), seed.into());
            o.insert("image_index".into(), index.into());
            o.remove("engine_prompt");
        }
        GeneratedImage {
            rgb,
            format: p.output_format.clone(),
            task_id: task_id.map(str::to_string),
            model: Some(p.model.clone()),
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            seed: seed as i64,
            steps: p.num_inference_steps as i64,
            guidance_scale: p.guidance_scale,
            scheduler: p.scheduler.clone(),
            params,
            attributes: p.metadata.clone(),
        }
    }
}
