//! Seed-004 dialect under `/api` (SPEC §6): job submission, job status and SSE, the gallery and
//! `/api/info`. Thin aliases: submission goes through `queue.submit`, job views through the native task
//! view, and image bytes, thumbnails and listings through the native image handlers themselves.

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tower::ServiceExt;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::extract::{ApiJson, TaskIdPath};
use crate::db::ModelFilter;
use crate::error::{ApiError, ApiResult};
use crate::events::{sse_response, SseEvent};
use crate::queue::request::TaskRequest;
use crate::queue::QUEUE_TOPIC;
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(generate))
        .routes(routes!(get_job))
        .routes(routes!(job_events))
        .routes(routes!(gallery_events))
        .routes(routes!(list_images))
        .routes(routes!(get_image))
        .routes(routes!(get_thumb))
        .routes(routes!(info))
}

#[derive(Serialize, ToSchema)]
pub struct JobSubmitted {
    job_id: String,
    status: &'static str,
    queue_position: usize,
}

/// Queue a generation job (the native task request; `loras: [{id, weight, trigger_weight}]`).
#[utoipa::path(post, path = "/api/generate", tag = "dialect", request_body = TaskRequest,
    responses((status = 200, body = JobSubmitted), (status = 422, description = "invalid request; nothing queued")))]
async fn generate(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TaskRequest>,
) -> ApiResult<Json<JobSubmitted>> {
    let (rec, position) = state.queue.submit(&state, req).await?;
    Ok(Json(JobSubmitted {
        job_id: rec.id,
        status: "pending",
        queue_position: position,
    }))
}

/// A job: the native task view plus `job_id` and the dialect's image URLs.
#[utoipa::path(get, path = "/api/jobs/{job_id}", tag = "dialect",
    params(("job_id" = String, Path, description = "job (task) UUID")),
    responses((status = 200, description = "the job"), (status = 404)))]
async fn get_job(
    State(state): State<AppState>,
    TaskIdPath(id): TaskIdPath,
) -> ApiResult<Json<Value>> {
    let t = state
        .repo
        .get_task(&id.to_string())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let mut v = crate::api::tasks::task_view(&state, &t).await;
    let filenames = image_filenames(&state, &t.images).await?;
    if let Some(o) = v.as_object_mut() {
        o.insert("job_id".into(), json!(t.id));
        o.insert(
            "image_urls".into(),
            json!(filenames
                .iter()
                .map(|f| format!("/api/images/{f}"))
                .collect::<Vec<_>>()),
        );
    }
    Ok(Json(v))
}

/// `<hash>.<ext>` for each stored image (the dialect names images by file name).
async fn image_filenames(state: &AppState, hashes: &[String]) -> ApiResult<Vec<String>> {
    let mut out = Vec::with_capacity(hashes.len());
    for h in hashes {
        let format = state
            .repo
            .get_image(h)
            .await?
            .map(|r| r.format)
            .unwrap_or_else(|| "png".into());
        out.push(filename(h, &format));
    }
    Ok(out)
}

fn filename(hash: &str, format: &str) -> String {
    let ext = match format {
        "jpeg" => "jpg",
        "webp" => "webp",
        _ => "png",
    };
    format!("{hash}.{ext}")
}

/// A native task event as the dialect's `{status, step, total_steps, preview, queue_position}`.
fn job_update(ev: &SseEvent, total_steps: u32) -> Option<Value> {
    let d = &ev.data;
    let v = match ev.event.as_str() {
        "queued" => json!({"status": "pending", "step": 0, "total_steps": total_steps,
                           "preview": null, "queue_position": d["position"]}),
        "started" => json!({"status": "processing", "step": 0, "total_steps": d["total_steps"],
                            "preview": null, "queue_position": 0}),
        "progress" => {
            json!({"status": "processing", "step": d["step"], "total_steps": d["total_steps"],
                             "image_index": d["image_index"], "preview": d["preview"], "queue_position": 0})
        }
        "completed" => {
            let images: Vec<Value> = d["images"].as_array().cloned().unwrap_or_default();
            json!({"status": "completed", "step": total_steps, "total_steps": total_steps,
                   "preview": null, "queue_position": null, "images": images})
        }
        "failed" => json!({"status": "failed", "step": null, "total_steps": total_steps,
                           "preview": null, "queue_position": null, "error": d["detail"]}),
        "cancelled" => json!({"status": "cancelled", "step": null, "total_steps": total_steps,
                              "preview": null, "queue_position": null}),
        _ => return None,
    };
    Some(v)
}

/// SSE of one job as unnamed (`message`) events `{status, step, total_steps, preview, queue_position}`;
/// while it waits, a new `queue_position` is sent whenever the queue moves. Ends when the job ends.
#[utoipa::path(get, path = "/api/sse/{job_id}", tag = "dialect",
    params(("job_id" = String, Path, description = "job (task) UUID")),
    responses((status = 200, content_type = "text/event-stream"), (status = 404)))]
async fn job_events(
    State(state): State<AppState>,
    TaskIdPath(id): TaskIdPath,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let id = id.to_string();
    let (t, task) = crate::api::tasks::task_stream(&state, &id, &headers, "job").await?;
    let total_steps = serde_json::from_value::<crate::queue::request::TaskParams>(t.params.clone())
        .map(|p| crate::queue::effective_steps(&p))
        .unwrap_or(0);
    let task = task.boxed();
    let queue = state.events.feed(QUEUE_TOPIC).boxed();
    let stream = merge_positions(task, queue, id, total_steps);
    Ok(sse_response(&state.events, stream))
}

/// The task's own events, plus position changes from queue snapshots while it is pending.
fn merge_positions(
    task: futures::stream::BoxStream<'static, SseEvent>,
    queue: futures::stream::BoxStream<'static, SseEvent>,
    id: String,
    total_steps: u32,
) -> impl Stream<Item = SseEvent> + Send {
    struct St {
        task: futures::stream::BoxStream<'static, SseEvent>,
        queue: Option<futures::stream::BoxStream<'static, SseEvent>>,
        id: String,
        total: u32,
        last_position: Option<u64>,
    }
    let st = St {
        task,
        queue: Some(queue),
        id,
        total: total_steps,
        last_position: None,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            let next_queue = async {
                match st.queue.as_mut() {
                    Some(q) => q.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = st.task.next() => {
                    let ev = ev?;
                    if ev.event != "queued" {
                        // Started or finished: queue positions no longer apply.
                        st.queue = None;
                    }
                    if let Some(mut data) = job_update(&ev, st.total) {
                        if let Some(p) = data["queue_position"].as_u64() {
                            if ev.event == "queued" {
                                st.last_position = Some(p);
                            }
                        }
                        data["job_id"] = json!(st.id);
                        let mut out = SseEvent::new("message", data);
                        out.id = ev.id;
                        return Some((out, st));
                    }
                }
                snap = next_queue => {
                    let Some(snap) = snap else {
                        st.queue = None;
                        continue;
                    };
                    let pos = snap.data["pending"].as_array().and_then(|p| {
                        p.iter().find(|e| e["task_id"] == st.id.as_str()).and_then(|e| e["position"].as_u64())
                    });
                    if let Some(pos) = pos {
                        if st.last_position != Some(pos) {
                            st.last_position = Some(pos);
                            let data = json!({"job_id": st.id, "status": "pending", "step": 0,
                                              "total_steps": st.total, "preview": null, "queue_position": pos});
                            return Some((SseEvent::new("message", data), st));
                        }
                    }
                }
            }
        }
    })
}

/// SSE of newly stored images as unnamed (`message`) events `{filename, url, thumb_url, hash, task_id}`.
#[utoipa::path(get, path = "/api/sse/gallery", tag = "dialect",
    responses((status = 200, content_type = "text/event-stream")))]
async fn gallery_events(State(state): State<AppState>) -> impl IntoResponse {
    let st = state.clone();
    let stream = state.events.feed("gallery").then(move |ev| {
        let st = st.clone();
        async move {
            let hash = ev.data["hash"].as_str().unwrap_or("").to_string();
            let format = st
                .repo
                .get_image(&hash)
                .await
                .ok()
                .flatten()
                .map(|r| r.format)
                .unwrap_or_else(|| "png".into());
            let name = filename(&hash, &format);
            let mut data = ev.data.clone();
            if let Some(o) = data.as_object_mut() {
                o.insert("filename".into(), json!(name));
                o.insert("url".into(), json!(format!("/api/images/{name}")));
                o.insert("thumb_url".into(), json!(format!("/api/thumbs/{name}")));
            }
            let mut out = SseEvent::new("message", data);
            out.id = ev.id;
            out
        }
    });
    sse_response(&state.events, stream)
}

/// Runs a request through the native image routes (same handlers, same headers: ETag, Range, ...).
async fn native_images(state: &AppState, req: Request, path_and_query: String) -> Response {
    let uri: Uri = match path_and_query.parse() {
        Ok(u) => u,
        Err(_) => return ApiError::BadRequest("bad image path".into()).into_response(),
    };
    // A fresh request: the outer route's path parameters live in the extensions and would confuse the
    // native handlers' path extractors.
    let (parts, body) = req.into_parts();
    let mut fresh = Request::new(body);
    *fresh.method_mut() = parts.method;
    *fresh.uri_mut() = uri;
    *fresh.version_mut() = parts.version;
    *fresh.headers_mut() = parts.headers;
    let router = crate::api::images::routes()
        .split_for_parts()
        .0
        .with_state(state.clone());
    match router.oneshot(fresh).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// `<hash>` or `<hash>.<ext>` → the hash, checked before any lookup.
fn hash_of(filename: &str) -> ApiResult<String> {
    let stem = filename
        .rsplit_once('.')
        .map(|(s, _)| s)
        .unwrap_or(filename);
    if crate::api::extract::is_sha256_hex(stem) {
        Ok(stem.to_string())
    } else {
        Err(ApiError::field(
            &["path", "filename"],
            "must be <sha256>.<png|jpg|webp> as listed by GET /api/images",
        ))
    }
}

/// Gallery, newest first: `?page=&per_page=` (and the native filters); each image gains `filename`,
/// `url` and `thumb_url` in the dialect's paths.
#[utoipa::path(get, path = "/api/images", tag = "dialect",
    responses((status = 200, description = "`{images, total, page, per_page}`")))]
async fn list_images(State(state): State<AppState>, req: Request) -> Response {
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let resp = native_images(&state, req, format!("/api/v1/images{query}")).await;
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let mut v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    if let Some(images) = v["images"].as_array_mut() {
        for img in images {
            let name = filename(
                img["hash"].as_str().unwrap_or(""),
                img["format"].as_str().unwrap_or("png"),
            );
            if let Some(o) = img.as_object_mut() {
                o.insert("url".into(), json!(format!("/api/images/{name}")));
                o.insert("thumb_url".into(), json!(format!("/api/thumbs/{name}")));
                o.insert("filename".into(), json!(name));
            }
        }
    }
    let mut resp = Json(v).into_response();
    *resp.status_mut() = parts.status;
    resp
}

/// Full-size image by file name (the native `GET /api/v1/images/{hash}`).
#[utoipa::path(get, path = "/api/images/{filename}", tag = "dialect",
    params(("filename" = String, Path, description = "`<sha256>.<ext>`")),
    responses((status = 200, description = "the image bytes"), (status = 404)))]
async fn get_image(
    State(state): State<AppState>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    match hash_of(&name) {
        Ok(h) => native_images(&state, req, format!("/api/v1/images/{h}")).await,
        Err(e) => e.into_response(),
    }
}

/// Thumbnail by file name (the native `GET /api/v1/images/{hash}/thumbnail`; `?size=` passes through).
#[utoipa::path(get, path = "/api/thumbs/{filename}", tag = "dialect",
    params(("filename" = String, Path, description = "`<sha256>.<ext>`")),
    responses((status = 200, description = "the thumbnail"), (status = 404)))]
async fn get_thumb(
    State(state): State<AppState>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    match hash_of(&name) {
        Ok(h) => native_images(&state, req, format!("/api/v1/images/{h}/thumbnail{query}")).await,
        Err(e) => e.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------------
// `/api/info`

/// JSON Schema (draft 2020-12) of `POST /api/generate` for the current checkpoint: family-specific
/// defaults, the configured limits, the sampler enum and the LoRAs that fit the checkpoint.
#[utoipa::path(get, path = "/api/info", tag = "dialect",
    responses((status = 200, description = "a JSON Schema (draft 2020-12)", body = Object)))]
async fn info(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let checkpoint = crate::queue::submit::default_checkpoint(&state).await?;
    let family = checkpoint
        .as_ref()
        .map(|m| m.family.clone())
        .unwrap_or_else(|| "unknown".into());
    let mut loras = state
        .repo
        .list_models(&ModelFilter::default())
        .await?
        .into_iter()
        .filter(|m| {
            (m.model_type == "lora" || m.model_type == "lycoris")
                && m.status == "ready"
                && (m.family == "unknown" || family == "unknown" || m.family == family)
        })
        .collect::<Vec<_>>();
    loras.sort_by_key(|m| m.name.to_lowercase());
    Ok(Json(schema(&state, checkpoint.as_ref(), &family, &loras)))
}

pub fn schema(
    state: &AppState,
    checkpoint: Option<&crate::db::ModelRecord>,
    family: &str,
    loras: &[crate::db::ModelRecord],
) -> Value {
    let l = &state.config.limits;
    let size = crate::queue::submit::family_default_size(family);
    let samplers = sd_engine::sched::valid_names();
    let dim = |max: u32| json!({"type": "integer", "minimum": 8, "maximum": max, "multipleOf": 8, "default": size});
    let weight = json!({"type": "number", "minimum": -10, "maximum": 10});
    let lora_list: Vec<Value> = loras
        .iter()
        .map(|m| {
            json!({"id": m.sha256, "name": m.name, "family": m.family,
                   "trigger_words": crate::queue::submit::trained_words(m)})
        })
        .collect();
    let lora_id = if loras.is_empty() {
        // No LoRA fits: nothing is a valid id.
        json!({"type": "string", "not": {}})
    } else {
        json!({
            "type": "string",
            "oneOf": loras.iter().map(|m| {
                let words = crate::queue::submit::trained_words(m);
                let mut o = json!({"const": m.sha256, "title": m.name});
                if !words.is_empty() {
                    o["description"] = json!(format!("trigger words: {}", words.join(", ")));
                    o["examples"] = json!([words]);
                }
                o
            }).collect::<Vec<_>>(),
        })
    };
    let mut model = json!({"type": "string", "pattern": "^[0-9a-f]{64}$",
                           "description": "checkpoint sha256; default: the current checkpoint"});
    if let Some(c) = checkpoint {
        model["default"] = json!(c.sha256);
    }
    let mut props = Map::new();
    let mut put = |k: &str, v: Value| {
        props.insert(k.into(), v);
    };
    put(
        "prompt",
        json!({"type": "string", "maxLength": l.max_prompt_chars,
                   "description": "prompt; (word:1.2) weighting and <lora:name:weight> tags work"}),
    );
    put(
        "negative_prompt",
        json!({"type": "string", "maxLength": l.max_prompt_chars, "default": ""}),
    );
    put("model", model);
    put("width", dim(l.max_width));
    put("height", dim(l.max_height));
    put(
        "num_images",
        json!({"type": "integer", "minimum": 1, "maximum": l.max_num_images, "default": 1}),
    );
    put(
        "num_inference_steps",
        json!({"type": "integer", "minimum": 1, "maximum": l.max_steps, "default": 20}),
    );
    put(
        "guidance_scale",
        json!({"type": "number", "minimum": 0, "maximum": 100, "default": 7.0}),
    );
    put(
        "scheduler",
        json!({"type": "string", "enum": samplers, "default": "DPM++ 2M",
                   "description": "sampler (A1111 names; diffusers class names are accepted too)"}),
    );
    put(
        "schedule_type",
        json!({"type": ["string", "null"], "enum": ["normal", "karras", "exponential", null], "default": null}),
    );
    put(
        "seed",
        json!({"type": ["integer", "null"], "minimum": -1, "default": null,
                   "description": "null or -1: random (the chosen seed is recorded)"}),
    );
    put(
        "init_image",
        json!({"type": "string", "description": "data:image/...;base64 URL → img2img"}),
    );
    put(
        "init_image_hash",
        json!({"type": "string", "pattern": "^[0-9a-f]{64}$"}),
    );
    put(
        "mask",
        json!({"type": "string", "description": "inpainting mask as a data URL (white = repaint)"}),
    );
    put(
        "strength",
        json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.75}),
    );
    put(
        "output_format",
        json!({"type": "string", "enum": ["png", "jpg", "jpeg", "webp"], "default": "png"}),
    );
    put(
        "clip_skip",
        json!({"type": "integer", "minimum": 1, "maximum": 12, "default": 1}),
    );
    put(
        "vae",
        json!({"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$", "default": null,
               "description": "sha256 of a VAE in the library (null: the checkpoint's own)"}),
    );
    put("priority", json!({"type": "integer", "default": 0}));
    put(
        "callback_url",
        json!({"type": "string", "format": "uri", "maxLength": 2048}),
    );
    put(
        "metadata",
        json!({"type": "object", "description": "attributes attached to every output image"}),
    );
    put(
        "loras",
        json!({
            "type": "array",
            "default": [],
            "maxItems": if loras.is_empty() { 0 } else { 16 },
            "items": {
                "type": "object",
                "properties": {
                    "id": lora_id,
                    "weight": {"type": "number", "minimum": -10, "maximum": 10, "default": 1.0},
                    "trigger_weight": weight,
                },
                "required": ["id"],
            },
        }),
    );
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("{}/api/info", state.base_url),
        "title": "SD-Host generation request",
        "description": format!(
            "Body of POST /api/generate for {} ({family})",
            checkpoint.map(|c| c.name.as_str()).unwrap_or("no checkpoint")
        ),
        "type": "object",
        "required": ["prompt"],
        "properties": props,
        "x-model": checkpoint.map(|c| json!({"sha256": c.sha256, "name": c.name, "family": c.family})),
        "x-family": family,
        "x-loras": lora_list,
        "x-samplers": samplers,
        "x-schedule-types": sd_engine::sched::schedule_types(),
    })
}
