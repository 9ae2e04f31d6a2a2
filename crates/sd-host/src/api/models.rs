//! Models resource (SPEC §4 Models): the SHA-256-keyed library, scans, Civitai adds and their progress.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::extract::{ApiJson, ApiQuery, HashPath};
use crate::db::{ModelFilter, ModelRecord, TaskStatus};
use crate::error::{ApiError, ApiResult};
use crate::events::{sse_response, SseEvent};
use crate::models::civitai::CivitaiError;
use crate::models::download::{topic, Ctx};
use crate::models::library::ScanReport;
use crate::models::{AddError, AddFromCivitai};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_models))
        .routes(routes!(get_model, delete_model))
        .routes(routes!(scan_models))
        .routes(routes!(scan_events))
        .routes(routes!(add_from_civitai))
        .routes(routes!(add_progress))
        .routes(routes!(civitai_lookup))
}

const TYPES: &[&str] = &[
    "checkpoint",
    "lora",
    "lycoris",
    "vae",
    "embedding",
    "unknown",
];
const FAMILIES: &[&str] = &["sd1", "sd2", "sdxl", "flux", "chroma", "zimage", "unknown"];

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// checkpoint | lora | lycoris | vae | embedding
    #[serde(rename = "type")]
    model_type: Option<String>,
    /// sd1 | sd2 | sdxl | flux | chroma | zimage | unknown
    family: Option<String>,
    /// Case-insensitive substring of the name or file name.
    q: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    models: Vec<ModelRecord>,
}

/// The library, newest first, optionally filtered.
#[utoipa::path(get, path = "/api/v1/models", tag = "models", params(ListQuery),
    responses((status = 200, body = ModelList), (status = 422, description = "unknown type or family")))]
async fn list_models(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<ModelList>> {
    if let Some(t) = q.model_type.as_deref().filter(|t| !TYPES.contains(t)) {
        return Err(ApiError::field(
            &["query", "type"],
            format!("unknown type {t:?}; one of {}", TYPES.join(", ")),
        ));
    }
    if let Some(f) = q.family.as_deref().filter(|f| !FAMILIES.contains(f)) {
        return Err(ApiError::field(
            &["query", "family"],
            format!("unknown family {f:?}; one of {}", FAMILIES.join(", ")),
        ));
    }
    let models = state
        .repo
        .list_models(&ModelFilter {
            model_type: q.model_type,
            family: q.family,
            q: q.q.filter(|s| !s.trim().is_empty()),
            status: None,
        })
        .await?;
    Ok(Json(ModelList { models }))
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
}

/// One model; with `Accept: text/event-stream`, the SSE stream of its download.
#[utoipa::path(get, path = "/api/v1/models/{sha256}", tag = "models",
    params(("sha256" = String, Path, description = "64 lowercase hex")),
    responses((status = 200, body = ModelRecord, content_type = "application/json"),
        (status = 200, description = "progress | verifying | ready | failed events", content_type = "text/event-stream"),
        (status = 404), (status = 422)))]
async fn get_model(
    State(state): State<AppState>,
    HashPath(sha): HashPath,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if wants_sse(&headers) {
        return progress_stream(&state, &sha).await;
    }
    let m = state
        .repo
        .get_model(&sha)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("model {sha} not found")))?;
    Ok(Json(m).into_response())
}

/// SSE of a model's download: the current state first, then live events until `ready` or `failed`.
async fn progress_stream(state: &AppState, sha: &str) -> ApiResult<Response> {
    // Subscribe before reading the record, so a terminal event in between is not lost.
    let live = state.events.feed(&topic(sha));
    let m = state
        .repo
        .get_model(sha)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("model {sha} not found")))?;
    let first: Vec<SseEvent> = match m.status.as_str() {
        "ready" => {
            let ev = SseEvent::new("ready", serde_json::to_value(&m).unwrap_or_default());
            return Ok(sse_response(&state.events, futures::stream::iter([ev])).into_response());
        }
        "failed" => {
            let ev = SseEvent::new(
                "failed",
                json!({"sha256": sha, "detail": m.error.unwrap_or_else(|| "download failed".into())}),
            );
            return Ok(sse_response(&state.events, futures::stream::iter([ev])).into_response());
        }
        "verifying" => vec![SseEvent::new("verifying", json!({"sha256": sha}))],
        _ => state
            .downloads
            .progress(sha)
            .map(|p| SseEvent::new("progress", p))
            .into_iter()
            .collect(),
    };
    // Ends right after a terminal event, without waiting for another one.
    let live = futures::stream::unfold((Box::pin(live), false), |(mut live, done)| async move {
        if done {
            return None;
        }
        let ev = live.next().await?;
        let end = matches!(ev.event.as_str(), "ready" | "failed" | "interrupted");
        Some((ev, (live, end)))
    });
    Ok(sse_response(&state.events, futures::stream::iter(first).chain(live)).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete even if pending tasks use the model (they fail with a reason).
    #[serde(default)]
    force: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Deleted {
    sha256: String,
    deleted: bool,
    /// Tasks failed because they used this model (`force=true`).
    failed_tasks: Vec<String>,
}

/// Deletes file and record; unloads it if loaded. 409 if pending tasks use it, unless `force=true`.
#[utoipa::path(delete, path = "/api/v1/models/{sha256}", tag = "models",
    params(("sha256" = String, Path, description = "64 lowercase hex"), DeleteQuery),
    responses((status = 200, body = Deleted), (status = 404), (status = 409)))]
async fn delete_model(
    State(state): State<AppState>,
    HashPath(sha): HashPath,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult<Json<Deleted>> {
    let m = state
        .repo
        .get_model(&sha)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("model {sha} not found")))?;
    let active = state.repo.active_tasks_for_model(&sha).await?;
    if !active.is_empty() && !q.force {
        return Err(ApiError::Conflict(format!(
            "{} pending task(s) use model {}; pass ?force=true to delete anyway (they will fail)",
            active.len(),
            m.name
        )));
    }
    let reason = format!("model {} ({sha}) was deleted", m.name);
    let mut failed = Vec::new();
    for id in &active {
        // Failed first, then stopped: the stopped run then finds its task finished and stays
        // silent, instead of racing to record it as cancelled.
        let failed_now = state
            .repo
            .finish_task(id, TaskStatus::Failed, &[], Some(&reason))
            .await?;
        state.queue.cancel_running(Some(id));
        if failed_now {
            state.events.publish(
                &crate::queue::task_topic(id),
                "failed",
                json!({"task_id": id, "detail": reason}),
                true,
            );
            crate::queue::spawn_callback(&state, id);
            failed.push(id.clone());
        }
    }
    state.downloads.cancel(&sha);
    unload_if_resident(&state, &sha).await?;
    if let Some(p) = &m.path {
        let p = std::path::PathBuf::from(p);
        for f in [p.clone(), crate::models::download::part_path(&p)] {
            match tokio::fs::remove_file(&f).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ApiError::internal(format!("removing {}: {e}", f.display()))),
            }
        }
    }
    state.repo.delete_model(&sha).await?;
    state.events.publish(
        &topic(&sha),
        "failed",
        json!({"sha256": sha, "detail": "model deleted"}),
        true,
    );
    if !failed.is_empty() {
        state.queue.publish_snapshot(&state);
    }
    Ok(Json(Deleted {
        sha256: sha,
        deleted: true,
        failed_tasks: failed,
    }))
}

/// Unloads the checkpoint, or drops the LoRA from the applied set, if `sha` is resident.
async fn unload_if_resident(state: &AppState, sha: &str) -> ApiResult<()> {
    let es = state.engine.state();
    let is_ckpt = es.checkpoint.as_ref().is_some_and(|c| c.sha256 == sha);
    let in_loras = es.loras.iter().any(|(s, _, _)| s == sha);
    if !is_ckpt && !in_loras {
        return Ok(());
    }
    let _g = state.queue.queue().engine_lock.lock().await;
    if is_ckpt {
        state.engine.unload().await.map_err(ApiError::internal)?;
        state
            .model_loaded
            .store(false, std::sync::atomic::Ordering::Relaxed);
    } else {
        let keep: Vec<crate::queue::request::ResolvedLora> = state
            .engine
            .state()
            .loras
            .into_iter()
            .filter(|(s, _, _)| s != sha)
            .map(
                |(sha256, name, weight)| crate::queue::request::ResolvedLora {
                    sha256,
                    name,
                    weight,
                },
            )
            .collect();
        crate::queue::apply_loras(state, &keep)
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(())
}

/// Registers files dropped into `models.dir` (hashing new or changed files).
#[utoipa::path(post, path = "/api/v1/models/scan", tag = "models",
    responses((status = 200, body = ScanReport)))]
async fn scan_models(State(state): State<AppState>) -> ApiResult<Json<ScanReport>> {
    let _g = state.downloads.scan_lock().lock().await;
    let events = state.events.clone();
    let last = std::sync::Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    let progress = move |p: crate::models::library::ScanProgress| {
        // Same ~4/s cap as downloads; the last block of a file always goes out.
        let mut g = last.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if p.hashed_bytes < p.total_bytes
            && g.is_some_and(|t| now - t < std::time::Duration::from_millis(250))
        {
            return;
        }
        *g = Some(now);
        events.publish(
            "models:scan",
            "progress",
            serde_json::to_value(&p).unwrap_or_default(),
            false,
        );
    };
    let (_, report) =
        crate::models::library::scan_with(&state.repo, &state.config.models_dir(), progress)
            .await
            .map_err(ApiError::internal)?;
    Ok(Json(report))
}

/// SSE of scan progress while a `POST /api/v1/models/scan` hashes files: `progress` events
/// (`{file, hashed_bytes, total_bytes, ...}`, at most ~4/s per file, the last block always).
#[utoipa::path(get, path = "/api/v1/models/scan/events", tag = "models",
    responses((status = 200, content_type = "text/event-stream")))]
async fn scan_events(State(state): State<AppState>) -> impl IntoResponse {
    sse_response(&state.events, state.events.feed("models:scan"))
}

#[derive(Serialize, ToSchema)]
pub struct AddResponse {
    sha256: String,
    /// ready | downloading | verifying
    status: String,
    /// SSE progress of this download.
    tracking_url: String,
}

impl From<AddError> for ApiError {
    fn from(e: AddError) -> Self {
        match e {
            AddError::Db(d) => d.into(),
            AddError::NotInLibrary(m) => ApiError::NotFound(m),
            AddError::Busy(m) => ApiError::Conflict(m),
            AddError::Civitai(c) => match c {
                CivitaiError::Invalid(m) => ApiError::field(&["body"], m),
                CivitaiError::Unsupported(m) => ApiError::Unprocessable(m),
                CivitaiError::Policy(p) => ApiError::Unprocessable(p.to_string()),
                CivitaiError::NotFound(m) => ApiError::NotFound(m),
                CivitaiError::Upstream(m) => ApiError::Unavailable(m),
            },
        }
    }
}

/// Adds a model from Civitai: 202 while it downloads, 200 if it is already in the library.
#[utoipa::path(post, path = "/api/v1/models/add-from-civitai", tag = "models",
    request_body = AddFromCivitai,
    responses((status = 202, body = AddResponse), (status = 200, body = AddResponse),
        (status = 404), (status = 422, description = "bad reference, pickle format, unsupported type or private target"),
        (status = 503, description = "Civitai unreachable")))]
async fn add_from_civitai(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<AddFromCivitai>,
) -> ApiResult<Response> {
    let added = crate::models::add_from_civitai(&Ctx::from(&state), &req).await?;
    let sha = added.record.sha256.clone();
    let body = AddResponse {
        tracking_url: format!("{}/api/v1/models/add-from-civitai/{sha}", state.base_url),
        status: added.record.status.clone(),
        sha256: sha,
    };
    let code = if added.already_ready {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((code, Json(body)).into_response())
}

/// SSE download progress: `progress`, `verifying`, then `ready` or `failed`.
#[utoipa::path(get, path = "/api/v1/models/add-from-civitai/{sha256}", tag = "models",
    params(("sha256" = String, Path, description = "64 lowercase hex")),
    responses((status = 200, content_type = "text/event-stream"), (status = 404)))]
async fn add_progress(
    State(state): State<AppState>,
    HashPath(sha): HashPath,
) -> ApiResult<Response> {
    progress_stream(&state, &sha).await
}

/// Looks a model already in the library (e.g. found by a scan) up on Civitai by its SHA-256 and
/// keeps the same metadata an add from Civitai keeps (`source.civitai`: model and version id,
/// name, type, base model, trained words, AIR); returns the updated record. Its name stays; a
/// type or family the file's header left `unknown` comes from Civitai.
#[utoipa::path(post, path = "/api/v1/models/{sha256}/civitai-lookup", tag = "models",
    params(("sha256" = String, Path, description = "64 lowercase hex")),
    responses((status = 200, body = ModelRecord),
        (status = 404, description = "not in the library, or Civitai knows no file with this hash"),
        (status = 409, description = "the model is still downloading"),
        (status = 422, description = "bad hash, or the Civitai host is refused by the network policy"),
        (status = 503, description = "Civitai unreachable")))]
async fn civitai_lookup(
    State(state): State<AppState>,
    HashPath(sha): HashPath,
) -> ApiResult<Json<ModelRecord>> {
    Ok(Json(
        crate::models::civitai_lookup(&Ctx::from(&state), &sha).await?,
    ))
}
