//! Pipeline resource (SPEC §4 Pipeline): what the engine holds, and loading a checkpoint or LoRA set
//! ahead of tasks. Loads wait behind the running task (the queue's engine lock).

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::extract::{is_sha256_hex, ApiJson, HashPath};
use crate::error::{ApiError, ApiResult, FieldError};
use crate::queue::request::ResolvedLora;
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(load_checkpoint))
        .routes(routes!(load_loras))
}

/// Resident set size of this process (Linux `/proc`; 0 elsewhere).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// `{checkpoint, loras, device, dtype, memory, queue, busy}`.
async fn status_json(state: &AppState) -> ApiResult<serde_json::Value> {
    let es = state.engine.state();
    let pending = state.repo.list_pending().await?.len();
    let running = state.queue.running().is_some();
    let dtype = match state.config.engine.dtype.as_str() {
        // CPU runs f32 (SPEC §7); GPUs pick half precision.
        "auto" if state.config.engine.device == "cpu" => "f32".to_string(),
        "auto" => "f16".to_string(),
        d => d.to_string(),
    };
    Ok(json!({
        "checkpoint": es.checkpoint.as_ref().map(|c| json!({
            "sha256": c.sha256, "name": c.name, "family": c.family,
        })),
        "loras": es.loras.iter().map(|(sha, name, w)| json!({
            "sha256": sha, "name": name, "weight": w,
        })).collect::<Vec<_>>(),
        // The standalone VAE decoding instead of the checkpoint's own (null: its own).
        "vae": es.vae,
        "device": state.config.engine.device,
        "dtype": dtype,
        "memory": {"rss_bytes": rss_bytes()},
        "queue": {"pending": pending, "running": usize::from(running), "paused": state.queue.is_paused()},
        "busy": es.busy || running,
    }))
}

/// What the engine holds now.
#[utoipa::path(get, path = "/api/v1/pipeline/status", tag = "pipeline",
    responses((status = 200, body = Object)))]
async fn status(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(status_json(&state).await?))
}

/// Loads a checkpoint (no-op if already loaded), after the running task finishes.
#[utoipa::path(post, path = "/api/v1/pipeline/load-checkpoint/{sha256}", tag = "pipeline",
    params(("sha256" = String, Path, description = "64 lowercase hex")),
    responses((status = 200, body = Object, description = "pipeline status after loading"),
        (status = 404), (status = 409, description = "model not ready"), (status = 422)))]
async fn load_checkpoint(
    State(state): State<AppState>,
    HashPath(sha): HashPath,
) -> ApiResult<Json<serde_json::Value>> {
    let m = state
        .repo
        .get_model(&sha)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("model {sha} not found")))?;
    if m.model_type != "checkpoint" {
        return Err(ApiError::Unprocessable(format!(
            "model {} is a {}, not a checkpoint",
            m.name, m.model_type
        )));
    }
    if m.status != "ready" {
        return Err(ApiError::Conflict(format!(
            "model {} is not ready ({})",
            m.name, m.status
        )));
    }
    {
        let _g = state.queue.queue().engine_lock.lock().await;
        crate::queue::ensure_checkpoint(&state, &state.engine, &sha)
            .await
            .map_err(ApiError::Unprocessable)?;
    }
    Ok(Json(status_json(&state).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraWeight {
    sha256: String,
    #[serde(default = "one")]
    weight: f32,
}

fn one() -> f32 {
    1.0
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LoadMode {
    #[default]
    Replace,
    Append,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadLoras {
    loras: Vec<LoraWeight>,
    /// replace (default) | append
    #[serde(default)]
    mode: LoadMode,
}

/// Applies a LoRA set to the loaded checkpoint (replacing it, or appending to it).
#[utoipa::path(post, path = "/api/v1/pipeline/load-loras", tag = "pipeline",
    request_body = LoadLoras,
    responses((status = 200, body = Object, description = "pipeline status after applying"),
        (status = 404), (status = 409, description = "no checkpoint loaded"), (status = 422)))]
async fn load_loras(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<LoadLoras>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut errs = Vec::new();
    for (i, l) in req.loras.iter().enumerate() {
        let idx = i.to_string();
        if !is_sha256_hex(&l.sha256) {
            errs.push(FieldError::new(
                &["body", "loras", &idx, "sha256"],
                "must be 64 lowercase hex",
                "value_error",
            ));
        }
        if !l.weight.is_finite() || l.weight.abs() > 10.0 {
            errs.push(FieldError::new(
                &["body", "loras", &idx, "weight"],
                "must be a finite number in [-10, 10]",
                "value_error",
            ));
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::Validation(errs));
    }
    let mut wanted = Vec::new();
    for l in &req.loras {
        let m = state
            .repo
            .get_model(&l.sha256)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("LoRA {} not found", l.sha256)))?;
        if !matches!(m.model_type.as_str(), "lora" | "lycoris") {
            return Err(ApiError::Unprocessable(format!(
                "model {} is a {}, not a LoRA",
                m.name, m.model_type
            )));
        }
        if m.status != "ready" {
            return Err(ApiError::Conflict(format!(
                "LoRA {} is not ready ({})",
                m.name, m.status
            )));
        }
        wanted.push(ResolvedLora {
            sha256: m.sha256,
            name: m.name,
            weight: l.weight,
        });
    }
    {
        let _g = state.queue.queue().engine_lock.lock().await;
        let es = state.engine.state();
        if es.checkpoint.is_none() {
            return Err(ApiError::Conflict(
                "no checkpoint loaded; POST /api/v1/pipeline/load-checkpoint/{sha256} first".into(),
            ));
        }
        let set = match req.mode {
            LoadMode::Replace => wanted,
            LoadMode::Append => {
                let mut cur: Vec<ResolvedLora> = es
                    .loras
                    .into_iter()
                    .map(|(sha256, name, weight)| ResolvedLora {
                        sha256,
                        name,
                        weight,
                    })
                    .collect();
                for w in wanted {
                    // Appending a LoRA already applied changes its weight instead of stacking it.
                    match cur.iter_mut().find(|c| c.sha256 == w.sha256) {
                        Some(c) => c.weight = w.weight,
                        None => cur.push(w),
                    }
                }
                cur
            }
        };
        crate::queue::apply_loras(&state, &set)
            .await
            .map_err(ApiError::Unprocessable)?;
    }
    Ok(Json(status_json(&state).await?))
}
