//! System resource: health, version, effective config, Prometheus metrics.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` while the server answers.
    status: &'static str,
    model_loaded: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Version {
    name: &'static str,
    version: &'static str,
    api_version: &'static str,
    engine: String,
    build: &'static str,
}

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(health_api))
        .routes(routes!(health_v1))
        .routes(routes!(version))
        .routes(routes!(config))
        .routes(routes!(metrics))
}

fn health_body(state: &AppState) -> Json<Health> {
    Json(Health {
        status: "ok",
        model_loaded: state.model_loaded.load(Ordering::Relaxed),
    })
}

/// Liveness; no API key needed.
#[utoipa::path(get, path = "/health", tag = "system", responses((status = 200, body = Health)))]
async fn health(State(state): State<AppState>) -> Json<Health> {
    health_body(&state)
}

/// Liveness (alias).
#[utoipa::path(get, path = "/api/health", tag = "system", responses((status = 200, body = Health)))]
async fn health_api(State(state): State<AppState>) -> Json<Health> {
    health_body(&state)
}

/// Liveness (alias).
#[utoipa::path(get, path = "/api/v1/health", tag = "system", responses((status = 200, body = Health)))]
async fn health_v1(State(state): State<AppState>) -> Json<Health> {
    health_body(&state)
}

/// Server and engine versions.
#[utoipa::path(get, path = "/api/v1/version", tag = "system", responses((status = 200, body = Version)))]
async fn version(State(state): State<AppState>) -> Json<Version> {
    Json(Version {
        name: "sd-host",
        version: env!("CARGO_PKG_VERSION"),
        api_version: "v1",
        engine: format!(
            "sd-engine {} on candle ({})",
            env!("CARGO_PKG_VERSION"),
            state.config.engine.device
        ),
        build: env!("SDHOST_BUILD"),
    })
}

/// The effective configuration with every secret redacted.
#[utoipa::path(get, path = "/api/v1/config", tag = "system", responses((status = 200, body = Object)))]
async fn config(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.config.redacted_json())
}

/// Prometheus text format: queue depth, task durations, steps/s, downloads, HTTP.
#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
