//! Tasks resource (SPEC §4 Tasks): submit, inspect, cancel, reprioritise, and stream progress.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::extract::{ApiJson, ApiQuery, TaskIdPath};
use crate::db::{TaskRecord, TaskStatus};
use crate::error::{ApiError, ApiResult};
use crate::events::{last_event_id, sse_response, SseEvent};
use crate::queue::request::TaskRequest;
use crate::queue::{task_topic, QUEUE_TOPIC};
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_task, list_tasks, cancel_tasks))
        .routes(routes!(generate))
        .routes(routes!(get_task, cancel_task))
        .routes(routes!(set_priority))
        .routes(routes!(task_events))
        .routes(routes!(queue_events))
}

#[derive(Serialize, ToSchema)]
pub struct Submitted {
    task_id: String,
    status: &'static str,
    message: String,
    queue_position: usize,
}

pub fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The JSON view of a task (seed 002 fields plus SPEC's).
pub async fn task_view(state: &AppState, t: &TaskRecord) -> serde_json::Value {
    let position = if t.status == TaskStatus::Pending {
        state
            .queue
            .positions(state)
            .await
            .into_iter()
            .find(|(id, _)| *id == t.id)
            .map(|(_, p)| p)
    } else {
        None
    };
    task_view_at(state, t, position)
}

/// [`task_view`] with the queue position already known (a page of tasks reads the queue once).
fn task_view_at(state: &AppState, t: &TaskRecord, position: Option<usize>) -> serde_json::Value {
    let running = state.queue.running().filter(|r| r.task_id == t.id);
    let progress = match (&running, t.status) {
        (Some(r), _) => {
            json!({"step": r.step, "total_steps": r.total_steps, "image_index": r.image_index})
        }
        (None, TaskStatus::Completed) => {
            let total = t
                .params
                .get("num_inference_steps")
                .cloned()
                .unwrap_or(json!(0));
            json!({"step": total, "total_steps": total, "image_index": t.images.len().saturating_sub(1)})
        }
        _ => serde_json::Value::Null,
    };
    let urls: Vec<String> = t.images.iter().map(|h| state.image_url(h)).collect();
    let mut params = t.params.clone();
    if let Some(o) = params.as_object_mut() {
        o.remove("engine_prompt");
    }
    json!({
        "task_id": t.id,
        "status": t.status.as_str(),
        "priority": t.priority,
        "queue_position": position,
        "progress": progress,
        "result_url": if urls.len() == 1 { json!(urls[0]) } else { serde_json::Value::Null },
        "result_urls": if urls.len() > 1 { json!(urls) } else { serde_json::Value::Null },
        "images": t.images.iter().zip(&urls).map(|(h, u)| json!({"hash": h, "url": u})).collect::<Vec<_>>(),
        "error_message": t.error_message,
        "params": params,
        "created_at": iso(t.created_at),
        "started_at": t.started_at.map(iso),
        "updated_at": iso(t.updated_at),
        "finished_at": t.finished_at.map(iso),
    })
}

/// Callback body: `{task_id, status, image_url | image_urls, error_message}`.
pub fn callback_payload(state: &AppState, t: &TaskRecord) -> serde_json::Value {
    let urls: Vec<String> = t.images.iter().map(|h| state.image_url(h)).collect();
    let mut body = json!({
        "task_id": t.id,
        "status": t.status.as_str(),
        "error_message": t.error_message,
    });
    if urls.len() == 1 {
        body["image_url"] = json!(urls[0]);
    } else if !urls.is_empty() {
        body["image_urls"] = json!(urls);
    }
    body
}

async fn submit(state: &AppState, req: TaskRequest) -> ApiResult<(StatusCode, Json<Submitted>)> {
    let (rec, position) = state.queue.submit(state, req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Submitted {
            task_id: rec.id,
            status: "pending",
            message: format!("task queued at position {position}"),
            queue_position: position,
        }),
    ))
}

/// Queue a generation task (1..10 images). The task is stored before 202 is returned.
#[utoipa::path(post, path = "/api/v1/tasks", tag = "tasks", request_body = TaskRequest,
    responses((status = 202, body = Submitted), (status = 422, description = "invalid request; nothing queued")))]
async fn create_task(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TaskRequest>,
) -> ApiResult<(StatusCode, Json<Submitted>)> {
    submit(&state, req).await
}

/// Alias of `POST /api/v1/tasks` (seed 002).
#[utoipa::path(post, path = "/api/v1/generate", tag = "tasks", request_body = TaskRequest,
    responses((status = 202, body = Submitted)))]
async fn generate(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TaskRequest>,
) -> ApiResult<(StatusCode, Json<Submitted>)> {
    submit(&state, req).await
}

#[derive(Deserialize, IntoParams)]
pub struct ListQuery {
    status: Option<String>,
    page: Option<i64>,
    per_page: Option<i64>,
}

/// Tasks, newest first.
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", params(ListQuery),
    responses((status = 200, description = "`{tasks, total, page, per_page}`")))]
async fn list_tasks(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(TaskStatus::parse(s).ok_or_else(|| {
            ApiError::field(
                &["query", "status"],
                "must be pending, processing, completed, failed or cancelled",
            )
        })?),
    };
    let page = q.page.unwrap_or(1).max(1);
    let per_page = q.per_page.unwrap_or(20).clamp(1, 200);
    let (tasks, total) = state
        .repo
        .list_tasks(status, (page - 1).saturating_mul(per_page), per_page)
        .await?;
    let positions: std::collections::HashMap<String, usize> =
        if tasks.iter().any(|t| t.status == TaskStatus::Pending) {
            state.queue.positions(&state).await.into_iter().collect()
        } else {
            Default::default()
        };
    let out: Vec<_> = tasks
        .iter()
        .map(|t| task_view_at(&state, t, positions.get(&t.id).copied()))
        .collect();
    Ok(Json(
        json!({"tasks": out, "total": total, "page": page, "per_page": per_page}),
    ))
}

/// One task: status, queue position, progress, results, resolved parameters.
#[utoipa::path(get, path = "/api/v1/tasks/{task_id}", tag = "tasks",
    params(("task_id" = String, Path, description = "task UUID")),
    responses((status = 200, description = "the task"), (status = 404)))]
async fn get_task(
    State(state): State<AppState>,
    TaskIdPath(id): TaskIdPath,
) -> ApiResult<Json<serde_json::Value>> {
    let t = state
        .repo
        .get_task(&id.to_string())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no task {id}")))?;
    Ok(Json(task_view(&state, &t).await))
}

/// Cancel a task; a running one stops at its next step.
#[utoipa::path(delete, path = "/api/v1/tasks/{task_id}", tag = "tasks",
    params(("task_id" = String, Path, description = "task UUID")),
    responses((status = 200), (status = 404), (status = 409, description = "already finished")))]
async fn cancel_task(
    State(state): State<AppState>,
    TaskIdPath(id): TaskIdPath,
) -> ApiResult<Json<serde_json::Value>> {
    let id = id.to_string();
    match state.queue.cancel(&state, &id).await? {
        None => Err(ApiError::NotFound(format!("no task {id}"))),
        Some(false) => Err(ApiError::Conflict(format!("task {id} already finished"))),
        Some(true) => Ok(Json(
            json!({"task_id": id, "status": "cancelled", "message": "cancelled (a running task stops at its next step)"}),
        )),
    }
}

#[derive(Deserialize, ToSchema)]
pub struct TaskIds {
    task_ids: Vec<String>,
}

/// Cancel several tasks.
#[utoipa::path(delete, path = "/api/v1/tasks", tag = "tasks", request_body = TaskIds,
    responses((status = 200, description = "`{cancelled, not_found, already_finished}`")))]
async fn cancel_tasks(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<TaskIds>,
) -> ApiResult<Json<serde_json::Value>> {
    check_ids(&body.task_ids)?;
    let (mut cancelled, mut not_found, mut finished) = (vec![], vec![], vec![]);
    for id in body.task_ids {
        match state.queue.cancel(&state, &id).await? {
            None => not_found.push(id),
            Some(true) => cancelled.push(id),
            Some(false) => finished.push(id),
        }
    }
    Ok(Json(
        json!({"cancelled": cancelled, "not_found": not_found, "already_finished": finished}),
    ))
}

fn check_ids(ids: &[String]) -> ApiResult<()> {
    if ids.len() > 1000 {
        return Err(ApiError::field(&["body", "task_ids"], "at most 1000 ids"));
    }
    for (i, id) in ids.iter().enumerate() {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(ApiError::field(
                &["body", "task_ids", &i.to_string()],
                "must be a UUID",
            ));
        }
    }
    Ok(())
}

#[derive(Deserialize, ToSchema)]
pub struct PriorityBody {
    task_ids: Vec<String>,
    priority: Option<i64>,
    /// `"front"`: ahead of every pending task.
    to: Option<String>,
}

/// Change the priority of pending tasks, or move them to the front.
#[utoipa::path(put, path = "/api/v1/tasks/priority", tag = "tasks", request_body = PriorityBody,
    responses((status = 200, description = "`{updated}`")))]
async fn set_priority(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<PriorityBody>,
) -> ApiResult<Json<serde_json::Value>> {
    check_ids(&body.task_ids)?;
    let updated = match (body.priority, body.to.as_deref()) {
        (_, Some("front")) => state.repo.move_to_front(&body.task_ids).await?,
        (Some(p), None) => state.repo.set_priority(&body.task_ids, p).await?,
        (_, Some(_)) => {
            return Err(ApiError::field(
                &["body", "to"],
                "only \"front\" is supported",
            ))
        }
        (None, None) => {
            return Err(ApiError::field(
                &["body", "priority"],
                "give priority or to",
            ))
        }
    };
    state.queue.wake();
    state.queue.publish_snapshot(&state);
    Ok(Json(json!({"updated": updated})))
}

/// SSE of one task: `queued`, `started`, `progress` (with a JPEG preview), then `completed`,
/// `failed` or `cancelled`. Honours `Last-Event-ID`; a finished task replays its terminal event.
#[utoipa::path(get, path = "/api/v1/tasks/{task_id}/events", tag = "tasks",
    params(("task_id" = String, Path, description = "task UUID")),
    responses((status = 200, content_type = "text/event-stream")))]
async fn task_events(
    State(state): State<AppState>,
    TaskIdPath(id): TaskIdPath,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let (_, events) = task_stream(&state, &id.to_string(), &headers, "task").await?;
    Ok(sse_response(&state.events, events))
}

/// A task's record and its event stream from `Last-Event-ID` (404 naming it `what`, e.g. "job").
pub async fn task_stream(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    what: &str,
) -> ApiResult<(
    TaskRecord,
    impl futures::Stream<Item = SseEvent> + Send + 'static,
)> {
    let t = state
        .repo
        .get_task(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no {what} {id}")))?;
    let topic = replayable_topic(state, &t);
    let events = state.events.subscribe(&topic, last_event_id(headers));
    Ok((t, events))
}

/// The event topic of a task, with its terminal event published from the database when the task
/// finished before this process started (so every stream of a finished task ends with it).
fn replayable_topic(state: &AppState, t: &TaskRecord) -> String {
    let topic = task_topic(&t.id);
    if t.status.is_terminal() && !state.events.is_finished(&topic) {
        let id = &t.id;
        let (name, data) = match t.status {
            TaskStatus::Completed => (
                "completed",
                json!({"task_id": id, "images": t.images.iter().map(|h| json!({"hash": h, "url": state.image_url(h)})).collect::<Vec<_>>()}),
            ),
            TaskStatus::Cancelled => ("cancelled", json!({"task_id": id})),
            _ => ("failed", json!({"task_id": id, "detail": t.error_message})),
        };
        state.events.publish(&topic, name, data, true);
    }
    topic
}

/// SSE of queue snapshots `{paused, running, pending}`: one now, then one on every change.
#[utoipa::path(get, path = "/api/v1/tasks/queue", tag = "queue",
    responses((status = 200, content_type = "text/event-stream")))]
async fn queue_events(State(state): State<AppState>) -> impl IntoResponse {
    let first = SseEvent::new("snapshot", state.queue.snapshot(&state).await);
    let live = state.events.feed(QUEUE_TOPIC);
    sse_response(&state.events, futures::stream::iter([first]).chain(live))
}
