//! Queue control: pause (after the running task), resume, clear (cancel every pending task).

use axum::extract::State;
use axum::Json;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiResult;
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(clear))
}

/// Stop taking tasks; the running one finishes.
#[utoipa::path(post, path = "/api/v1/queue/pause", tag = "queue", responses((status = 200)))]
async fn pause(State(state): State<AppState>) -> Json<serde_json::Value> {
    state.queue.pause(&state);
    Json(json!({"paused": true}))
}

/// Take tasks again.
#[utoipa::path(post, path = "/api/v1/queue/resume", tag = "queue", responses((status = 200)))]
async fn resume(State(state): State<AppState>) -> Json<serde_json::Value> {
    state.queue.resume(&state);
    Json(json!({"paused": false}))
}

/// Cancel every pending task.
#[utoipa::path(post, path = "/api/v1/queue/clear", tag = "queue", responses((status = 200)))]
async fn clear(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let mut cancelled = vec![];
    for t in state.repo.list_pending().await? {
        if state.queue.cancel(&state, &t.id).await? == Some(true) {
            cancelled.push(t.id);
        }
    }
    Ok(Json(json!({"cancelled": cancelled})))
}
