//! Images resource: bytes (ETag, Range), thumbnails, metadata and attributes, queries, batch delete,
//! the gallery stream, share links, storage stats and zip export.

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::extract::{is_sha256_hex, ApiJson, ApiQuery, HashPath};
use crate::db::images::{ImageQuery, ImageRecord};
use crate::error::{ApiError, ApiResult};
use crate::images::share::ShareCheck;
use crate::images::{store, thumbs};
use crate::state::AppState;
use crate::storage::StorageError;

/// Most ids one delete or export request may name.
const MAX_BATCH: usize = 1000;
const MAX_PER_PAGE: i64 = 200;
const MAX_ATTR_KEY: usize = 128;
const MAX_ATTRS_PER_REQUEST: usize = 100;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_images, delete_images))
        .routes(routes!(gallery_events))
        .routes(routes!(export_images))
        .routes(routes!(get_image))
        .routes(routes!(get_thumbnail))
        .routes(routes!(get_metadata, update_metadata))
        .routes(routes!(share_image))
        .routes(routes!(storage_stats))
}

fn content_type(format: &str) -> &'static str {
    match format {
        "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        _ => "image/png",
    }
}

fn extension(format: &str) -> &'static str {
    match format {
        "jpeg" => "jpg",
        "webp" => "webp",
        _ => "png",
    }
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn storage_error(e: StorageError) -> ApiError {
    match e {
        StorageError::NotFound => ApiError::NotFound("image not found".into()),
        StorageError::InvalidId => ApiError::field(&["path", "hash"], "invalid image id"),
        other => ApiError::internal(other),
    }
}

async fn record(state: &AppState, hash: &str) -> ApiResult<ImageRecord> {
    state
        .repo
        .get_image(hash)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no image {hash}")))
}

/// The JSON view of one image (`GET /images/{hash}/metadata`).
pub fn metadata_view(state: &AppState, r: &ImageRecord, attributes: Map<String, Value>) -> Value {
    let model_name = r
        .params
        .as_ref()
        .and_then(|p| p.get("model_name"))
        .cloned()
        .unwrap_or(Value::Null);
    json!({
        "hash": r.hash,
        "format": r.format,
        "width": r.width,
        "height": r.height,
        "bytes": r.bytes,
        "created_at": iso(r.created_at),
        "task_id": r.task_id,
        "model": r.model,
        "model_name": model_name,
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "seed": r.seed,
        "steps": r.steps,
        "guidance_scale": r.guidance_scale,
        "scheduler": r.scheduler,
        "attributes": attributes,
        "params": r.params,
        "url": state.image_url(&r.hash),
        "thumbnail_url": store::thumbnail_url(state, &r.hash),
    })
}

/// `?expires=&token=` on an image URL. The auth layer checks them when keys are configured; checking here
/// too makes a tampered or expired link fail the same way on a keyless server.
fn check_share_query(state: &AppState, hash: &str, query: Option<&str>) -> ApiResult<()> {
    let Some(query) = query else { return Ok(()) };
    let mut token = None;
    let mut expires = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "token" => token = Some(v.into_owned()),
            "expires" => expires = Some(v.into_owned()),
            _ => {}
        }
    }
    let Some(token) = token else { return Ok(()) };
    let Some(expires) = expires.and_then(|e| e.parse::<i64>().ok()) else {
        return Err(ApiError::Forbidden("invalid share link".into()));
    };
    match state
        .share
        .verify(hash, expires, &token, chrono::Utc::now().timestamp())
    {
        ShareCheck::Valid => Ok(()),
        ShareCheck::Expired => Err(ApiError::Forbidden("share link expired".into())),
        ShareCheck::Invalid => Err(ApiError::Forbidden("invalid share link".into())),
    }
}

/// Whether `If-None-Match` lists `etag` (or `*`); weak comparison, as RFC 9110 asks for this header.
fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

enum RangeSpec {
    Full,
    Part(u64, u64),
    Unsatisfiable,
}

/// One `bytes=` range (several ranges, other units or garbage → the whole body, as RFC 9110 allows).
fn parse_range(headers: &HeaderMap, size: u64) -> RangeSpec {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeSpec::Full;
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix range: the last N bytes.
        return match b.parse::<u64>() {
            Ok(0) => RangeSpec::Unsatisfiable,
            Ok(n) if size > 0 => RangeSpec::Part(size.saturating_sub(n), size - 1),
            Ok(_) => RangeSpec::Unsatisfiable,
            Err(_) => RangeSpec::Full,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeSpec::Full;
    };
    let end = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.min(size.saturating_sub(1)),
            Ok(_) => return RangeSpec::Full,
            Err(_) => return RangeSpec::Full,
        }
    };
    if start >= size {
        RangeSpec::Unsatisfiable
    } else {
        RangeSpec::Part(start, end)
    }
}

fn cache_headers(h: &mut HeaderMap, etag: &str) {
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    // Content-addressed: the bytes behind a URL never change. `private`: the images may need an API key.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// The image file. ETag is the hash; `If-None-Match` → 304; one `Range` → 206.
#[utoipa::path(get, path = "/api/v1/images/{hash}", tag = "images",
    params(("hash" = String, Path, description = "SHA-256 of the file (64 lowercase hex)")),
    responses((status = 200, description = "the image bytes"), (status = 206, description = "a byte range"),
        (status = 304, description = "not modified"), (status = 404), (status = 416), (status = 422)))]
async fn get_image(
    State(state): State<AppState>,
    HashPath(hash): HashPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_share_query(&state, &hash, query.as_deref())?;
    let rec = record(&state, &hash).await?;
    let etag = format!("\"{hash}\"");
    let mut h = HeaderMap::new();
    cache_headers(&mut h, &etag);
    if etag_matches(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, h).into_response());
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&rec.format)),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "inline; filename=\"{hash}.{}\"",
        extension(&rec.format)
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    let size = state.blobs.size(&hash).await.map_err(storage_error)?;
    match parse_range(&headers, size) {
        RangeSpec::Full => {
            let bytes = state.blobs.get(&hash).await.map_err(storage_error)?;
            Ok((StatusCode::OK, h, bytes).into_response())
        }
        RangeSpec::Part(start, end) => {
            let bytes = state
                .blobs
                .get_range(&hash, start..end + 1)
                .await
                .map_err(storage_error)?;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            Ok((StatusCode::PARTIAL_CONTENT, h, bytes).into_response())
        }
        RangeSpec::Unsatisfiable => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                h,
                json!({"detail": "range not satisfiable"}).to_string(),
            )
                .into_response())
        }
    }
}

#[derive(Deserialize, IntoParams)]
pub struct ThumbQuery {
    /// Longer side in pixels, 16..=1024 (default 256).
    size: Option<u32>,
}

/// A JPEG thumbnail (cached after the first request).
#[utoipa::path(get, path = "/api/v1/images/{hash}/thumbnail", tag = "images",
    params(("hash" = String, Path, description = "image SHA-256"), ThumbQuery),
    responses((status = 200, description = "image/jpeg thumbnail"), (status = 304), (status = 404), (status = 422)))]
async fn get_thumbnail(
    State(state): State<AppState>,
    HashPath(hash): HashPath,
    RawQuery(query): RawQuery,
    ApiQuery(q): ApiQuery<ThumbQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_share_query(&state, &hash, query.as_deref())?;
    let size = q.size.unwrap_or(thumbs::DEFAULT_SIZE);
    if !(thumbs::MIN_SIZE..=thumbs::MAX_SIZE).contains(&size) {
        return Err(ApiError::field(
            &["query", "size"],
            format!(
                "must be between {} and {}",
                thumbs::MIN_SIZE,
                thumbs::MAX_SIZE
            ),
        ));
    }
    record(&state, &hash).await?;
    let etag = format!("\"{hash}-t{size}\"");
    let mut h = HeaderMap::new();
    cache_headers(&mut h, &etag);
    if etag_matches(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, h).into_response());
    }
    let bytes = thumbs::thumbnail(&state, &hash, size).await?;
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
    Ok((StatusCode::OK, h, bytes).into_response())
}

/// What is known about an image: generation parameters and attributes.
#[utoipa::path(get, path = "/api/v1/images/{hash}/metadata", tag = "images",
    params(("hash" = String, Path, description = "image SHA-256")),
    responses((status = 200, description = "`{hash, format, width, height, bytes, created_at, task_id, model, prompt, negative_prompt, seed, steps, guidance_scale, scheduler, attributes}`"),
        (status = 404), (status = 422)))]
async fn get_metadata(
    State(state): State<AppState>,
    HashPath(hash): HashPath,
) -> ApiResult<Json<Value>> {
    let rec = record(&state, &hash).await?;
    let attrs = state.repo.get_image_attributes(&hash).await?;
    Ok(Json(metadata_view(&state, &rec, attrs)))
}

/// Merges `{key: value}` into the attributes; a `null` value removes the key.
#[utoipa::path(post, path = "/api/v1/images/{hash}/metadata", tag = "images",
    params(("hash" = String, Path, description = "image SHA-256")),
    request_body(content = Object, description = "attributes to set (`null` removes)"),
    responses((status = 200, description = "the updated metadata"), (status = 404), (status = 422)))]
async fn update_metadata(
    State(state): State<AppState>,
    HashPath(hash): HashPath,
    ApiJson(patch): ApiJson<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    if patch.len() > MAX_ATTRS_PER_REQUEST {
        return Err(ApiError::field(
            &["body"],
            format!("at most {MAX_ATTRS_PER_REQUEST} attributes per request"),
        ));
    }
    for k in patch.keys() {
        if k.is_empty() || k.chars().count() > MAX_ATTR_KEY || k.chars().any(char::is_control) {
            return Err(ApiError::field(
                &["body", k],
                format!("attribute names are 1..{MAX_ATTR_KEY} printable characters"),
            ));
        }
    }
    let attrs = state
        .repo
        .merge_image_attributes(&hash, &patch)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no image {hash}")))?;
    let rec = record(&state, &hash).await?;
    Ok(Json(metadata_view(&state, &rec, attrs)))
}

/// A time filter: milliseconds since the epoch, or an RFC 3339 timestamp.
fn parse_time(field: &str, v: &str) -> ApiResult<i64> {
    if let Ok(ms) = v.trim().parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(v.trim())
        .map(|d| d.timestamp_millis())
        .map_err(|_| {
            ApiError::field(
                &["query", field],
                "must be milliseconds since the epoch or an RFC 3339 timestamp",
            )
        })
}

/// Query parameters of `GET /images` (documentation only: the handler reads the raw query so that any
/// number of `attr.KEY=VALUE` filters can be given).
#[derive(Deserialize, IntoParams)]
#[allow(dead_code)]
pub struct ImageListQuery {
    /// Checkpoint sha256 or a hex prefix of it.
    model: Option<String>,
    task_id: Option<String>,
    /// Case-insensitive text in the prompt.
    q: Option<String>,
    /// Created before (ms since epoch or RFC 3339).
    before: Option<String>,
    /// Created after (ms since epoch or RFC 3339).
    after: Option<String>,
    page: Option<i64>,
    per_page: Option<i64>,
}

/// Images matching every filter, newest first. Filter by attributes with `attr.KEY=VALUE` (repeatable).
#[utoipa::path(get, path = "/api/v1/images", tag = "images", params(ImageListQuery),
    responses((status = 200, description = "`{images, total, page, per_page}`"), (status = 422)))]
async fn list_images(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let mut q = ImageQuery::default();
    let mut page = 1i64;
    let mut per_page = 50i64;
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        let (k, v) = (k.into_owned(), v.into_owned());
        if let Some(key) = k.strip_prefix("attr.") {
            if key.is_empty() {
                return Err(ApiError::field(&["query", &k], "attribute name is empty"));
            }
            q.attrs.push((key.to_string(), v));
            continue;
        }
        let int = |field: &str, v: &str| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| ApiError::field(&["query", field], "must be an integer"))
        };
        match k.as_str() {
            "model" if !v.is_empty() => {
                let v = v.to_ascii_lowercase();
                if !v.bytes().all(|b| b.is_ascii_hexdigit()) || v.len() > 64 {
                    return Err(ApiError::field(
                        &["query", "model"],
                        "must be a checkpoint sha256 or a hex prefix of it",
                    ));
                }
                q.model = Some(v);
            }
            "task_id" if !v.is_empty() => q.task_id = Some(v),
            "q" if !v.is_empty() => q.q = Some(v),
            "before" if !v.is_empty() => q.before = Some(parse_time("before", &v)?),
            "after" if !v.is_empty() => q.after = Some(parse_time("after", &v)?),
            "page" => page = int("page", &v)?,
            "per_page" => per_page = int("per_page", &v)?,
            // Share-link parameters and unknown keys are ignored, as other list endpoints do.
            _ => {}
        }
    }
    if page < 1 {
        return Err(ApiError::field(&["query", "page"], "must be at least 1"));
    }
    if !(1..=MAX_PER_PAGE).contains(&per_page) {
        return Err(ApiError::field(
            &["query", "per_page"],
            format!("must be between 1 and {MAX_PER_PAGE}"),
        ));
    }
    q.limit = per_page;
    q.offset = (page - 1).saturating_mul(per_page);
    let (rows, total) = state.repo.query_images(&q).await?;
    let hashes: Vec<String> = rows.iter().map(|r| r.hash.clone()).collect();
    let mut attrs = state.repo.attributes_of(&hashes).await?;
    let images: Vec<Value> = rows
        .iter()
        .map(|r| metadata_view(&state, r, attrs.remove(&r.hash).unwrap_or_default()))
        .collect();
    Ok(Json(
        json!({"images": images, "total": total, "page": page, "per_page": per_page}),
    ))
}

#[derive(Deserialize, ToSchema)]
pub struct HashList {
    /// Image SHA-256s (64 lowercase hex each).
    hashes: Vec<String>,
}

fn validate_hashes(hashes: &[String]) -> ApiResult<()> {
    if hashes.len() > MAX_BATCH {
        return Err(ApiError::field(
            &["body", "hashes"],
            format!("at most {MAX_BATCH} ids per request"),
        ));
    }
    let bad: Vec<_> = hashes
        .iter()
        .enumerate()
        .filter(|(_, h)| !is_sha256_hex(h))
        .map(|(i, _)| {
            crate::error::FieldError::new(
                &["body", "hashes", &i.to_string()],
                "must be a SHA-256 as 64 lowercase hex characters",
                "value_error",
            )
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(bad))
    }
}

/// Deletes images (row, file, thumbnails). Every id is checked before anything is deleted.
#[utoipa::path(delete, path = "/api/v1/images", tag = "images", request_body = HashList,
    responses((status = 200, description = "`{deleted: [...], not_found: [...]}`"), (status = 422)))]
async fn delete_images(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<HashList>,
) -> ApiResult<Json<Value>> {
    validate_hashes(&body.hashes)?;
    let mut seen = std::collections::HashSet::new();
    let hashes: Vec<String> = body
        .hashes
        .into_iter()
        .filter(|h| seen.insert(h.clone()))
        .collect();
    let (deleted, not_found) = store::delete_images(&state, &hashes).await?;
    Ok(Json(json!({"deleted": deleted, "not_found": not_found})))
}

/// SSE: `image` events `{hash, url, thumbnail_url, task_id}` for every newly stored image.
#[utoipa::path(get, path = "/api/v1/images/events", tag = "images",
    responses((status = 200, description = "text/event-stream of `image` events", content_type = "text/event-stream")))]
async fn gallery_events(State(state): State<AppState>) -> impl IntoResponse {
    crate::events::sse_response(&state.events, state.events.feed("gallery"))
}

#[derive(Deserialize, ToSchema, Default)]
pub struct ShareRequest {
    /// Lifetime in seconds (default `images.share_ttl`; at most 30 days).
    expires_in: Option<i64>,
}

/// A signed URL that fetches the image (and its thumbnail) without an API key until it expires.
#[utoipa::path(post, path = "/api/v1/images/{hash}/share", tag = "images",
    params(("hash" = String, Path, description = "image SHA-256")),
    request_body(content = Option<ShareRequest>, description = "optional `{expires_in}`"),
    responses((status = 200, description = "`{url, thumbnail_url, expires_at}`"), (status = 404), (status = 422)))]
async fn share_image(
    State(state): State<AppState>,
    HashPath(hash): HashPath,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let req: ShareRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ShareRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::field(
                &["body"],
                format!("expected {{\"expires_in\": seconds}}: {e}"),
            )
        })?
    };
    record(&state, &hash).await?;
    let ttl = req
        .expires_in
        .unwrap_or(state.config.images.share_ttl.as_secs() as i64);
    if !(1..=30 * 24 * 3600).contains(&ttl) {
        return Err(ApiError::field(
            &["body", "expires_in"],
            "must be between 1 second and 30 days",
        ));
    }
    let expires = chrono::Utc::now().timestamp() + ttl;
    let token = state.share.sign(&hash, expires);
    let suffix = format!("?expires={expires}&token={token}");
    Ok(Json(json!({
        "url": format!("{}{suffix}", state.image_url(&hash)),
        "thumbnail_url": format!("{}{suffix}", store::thumbnail_url(&state, &hash)),
        "expires_at": iso(expires * 1000),
    })))
}

/// Totals of the image store.
#[utoipa::path(get, path = "/api/v1/storage/stats", tag = "images",
    responses((status = 200, description = "`{images, bytes, by_format, thumbnails: {files, bytes}, backend}`")))]
async fn storage_stats(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let rows = state.repo.image_stats().await?;
    let mut by_format = Map::new();
    let (mut count, mut bytes) = (0i64, 0i64);
    for (format, n, b) in rows {
        count += n;
        bytes += b;
        by_format.insert(format, json!({"images": n, "bytes": b}));
    }
    let (thumb_files, thumb_bytes) = thumbs::cache_usage(&state).await;
    Ok(Json(json!({
        "images": count,
        "bytes": bytes,
        "by_format": by_format,
        "thumbnails": {"files": thumb_files, "bytes": thumb_bytes},
        "backend": "local",
    })))
}

/// A zip of the chosen images, each with `<hash>.json` (its metadata), plus `manifest.json`.
#[utoipa::path(post, path = "/api/v1/images/export", tag = "images", request_body = HashList,
    responses((status = 200, description = "application/zip", content_type = "application/zip"), (status = 422)))]
async fn export_images(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<HashList>,
) -> ApiResult<Response> {
    validate_hashes(&body.hashes)?;
    let mut seen = std::collections::HashSet::new();
    let mut entries: Vec<(ImageRecord, Value)> = Vec::new();
    let mut not_found = Vec::new();
    for h in body.hashes.into_iter().filter(|h| seen.insert(h.clone())) {
        match state.repo.get_image(&h).await? {
            Some(rec) => {
                let attrs = state.repo.get_image_attributes(&h).await?;
                let view = metadata_view(&state, &rec, attrs);
                entries.push((rec, view));
            }
            None => not_found.push(h),
        }
    }
    let manifest = json!({
        "exported": entries.iter().map(|(r, _)| r.hash.clone()).collect::<Vec<_>>(),
        "not_found": not_found,
    });
    let blobs = state.blobs.clone();
    let rt = tokio::runtime::Handle::current();
    // Written to an anonymous temp file (deleted on close) so memory stays flat however many images.
    let file = tokio::task::spawn_blocking(move || -> ApiResult<std::fs::File> {
        use std::io::{Seek, Write};
        let mut file = tempfile::tempfile().map_err(ApiError::internal)?;
        let mut zip = zip::ZipWriter::new(&mut file);
        // Images are already compressed; stored entries keep the export fast.
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(false);
        let mut add = |name: String, data: &[u8]| -> ApiResult<()> {
            zip.start_file(name, opts).map_err(ApiError::internal)?;
            zip.write_all(data).map_err(ApiError::internal)
        };
        for (rec, view) in &entries {
            let bytes = rt.block_on(blobs.get(&rec.hash)).map_err(storage_error)?;
            add(format!("{}.{}", rec.hash, extension(&rec.format)), &bytes)?;
            let meta = serde_json::to_vec_pretty(view).map_err(ApiError::internal)?;
            add(format!("{}.json", rec.hash), &meta)?;
        }
        let manifest = serde_json::to_vec_pretty(&manifest).map_err(ApiError::internal)?;
        add("manifest.json".into(), &manifest)?;
        zip.finish().map_err(ApiError::internal)?;
        file.rewind().map_err(ApiError::internal)?;
        Ok(file)
    })
    .await
    .map_err(ApiError::internal)??;
    let file = tokio::fs::File::from_std(file);
    let stream = futures::stream::try_unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), f)))
    });
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zip"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"sd-host-images.zip\""),
    );
    Ok((StatusCode::OK, h, Body::from_stream(stream)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(range: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(range).unwrap());
        h
    }

    #[test]
    fn ranges() {
        assert!(matches!(
            parse_range(&headers("bytes=0-9"), 100),
            RangeSpec::Part(0, 9)
        ));
        assert!(matches!(
            parse_range(&headers("bytes=90-"), 100),
            RangeSpec::Part(90, 99)
        ));
        assert!(matches!(
            parse_range(&headers("bytes=-10"), 100),
            RangeSpec::Part(90, 99)
        ));
        assert!(matches!(
            parse_range(&headers("bytes=50-1000"), 100),
            RangeSpec::Part(50, 99)
        ));
        assert!(matches!(
            parse_range(&headers("bytes=100-"), 100),
            RangeSpec::Unsatisfiable
        ));
        assert!(matches!(
            parse_range(&headers("bytes=0-1,5-6"), 100),
            RangeSpec::Full
        ));
        assert!(matches!(
            parse_range(&headers("items=0-1"), 100),
            RangeSpec::Full
        ));
        assert!(matches!(
            parse_range(&HeaderMap::new(), 100),
            RangeSpec::Full
        ));
    }

    #[test]
    fn etags() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"abc\""),
        );
        assert!(etag_matches(&h, "\"abc\""));
        assert!(!etag_matches(&h, "\"abd\""));
    }
}
