//! Thumbnails: made on first request from the stored image, cached on local disk by (hash, size).

use std::path::PathBuf;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub const DEFAULT_SIZE: u32 = 256;
pub const MIN_SIZE: u32 = 16;
pub const MAX_SIZE: u32 = 1024;
const QUALITY: u8 = 82;

fn cache_dir(state: &AppState) -> PathBuf {
    state.config.data_dir.join("thumbnails")
}

/// `<data_dir>/thumbnails/ab/<hash>-<size>.jpg`; `hash` is validated by the caller (64 lowercase hex).
fn cache_path(state: &AppState, hash: &str, size: u32) -> PathBuf {
    cache_dir(state)
        .join(&hash[..2])
        .join(format!("{hash}-{size}.jpg"))
}

/// JPEG thumbnail whose longer side is `size` (never upscaled). Served from the cache when present.
pub async fn thumbnail(state: &AppState, hash: &str, size: u32) -> ApiResult<Vec<u8>> {
    if !crate::api::extract::is_sha256_hex(hash) {
        return Err(ApiError::field(&["path", "hash"], "invalid image id"));
    }
    let path = cache_path(state, hash, size);
    // symlink_metadata: a link planted in the cache is never followed.
    if let Ok(meta) = tokio::fs::symlink_metadata(&path).await {
        if meta.is_file() {
            if let Ok(bytes) = tokio::fs::read(&path).await {
                return Ok(bytes);
            }
        }
    }
    let original = state.blobs.get(hash).await.map_err(|e| match e {
        crate::storage::StorageError::NotFound => ApiError::NotFound("image not found".into()),
        other => ApiError::internal(other),
    })?;
    let bytes = tokio::task::spawn_blocking(move || make_thumbnail(&original, size))
        .await
        .map_err(ApiError::internal)??;
    let to_write = bytes.clone();
    let write =
        tokio::task::spawn_blocking(move || crate::util::write_file_atomic(&path, &to_write)).await;
    if let Ok(Err(e)) | Err(e) = write.map_err(std::io::Error::other) {
        // A cache write failing only costs a re-render next time.
        tracing::warn!(error = %e, "caching thumbnail failed");
    }
    Ok(bytes)
}

pub fn make_thumbnail(original: &[u8], size: u32) -> ApiResult<Vec<u8>> {
    use image::ImageEncoder;
    let img = image::load_from_memory(original).map_err(ApiError::internal)?;
    let (w, h) = (img.width(), img.height());
    let img = if w.max(h) > size {
        img.resize(size, size, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    let rgb = img.to_rgb8();
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, QUALITY)
        .write_image(
            rgb.as_raw(),
            rgb.width(),
            rgb.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(ApiError::internal)?;
    Ok(out)
}

/// Drops every cached size of `hash`.
pub async fn remove_cached(state: &AppState, hash: &str) {
    if !crate::api::extract::is_sha256_hex(hash) {
        return;
    }
    let dir = cache_dir(state).join(&hash[..2]);
    let Ok(mut rd) = tokio::fs::read_dir(&dir).await else {
        return;
    };
    let prefix = format!("{hash}-");
    while let Ok(Some(entry)) = rd.next_entry().await {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

/// (files, bytes) in the thumbnail cache.
pub async fn cache_usage(state: &AppState) -> (u64, u64) {
    let root = cache_dir(state);
    tokio::task::spawn_blocking(move || {
        let (mut n, mut bytes) = (0u64, 0u64);
        let Ok(shards) = std::fs::read_dir(&root) else {
            return (0, 0);
        };
        for shard in shards.flatten() {
            let Ok(files) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            for f in files.flatten() {
                if let Ok(m) = f.metadata() {
                    if m.is_file() {
                        n += 1;
                        bytes += m.len();
                    }
                }
            }
        }
        (n, bytes)
    })
    .await
    .unwrap_or((0, 0))
}
