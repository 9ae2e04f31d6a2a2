//! HTTP layer: one file per resource, composed here with the shared middleware.

pub mod a1111;
pub mod auth;
pub mod dialect;
pub mod docs;
pub mod extract;
pub mod images;
pub mod models;
pub mod pipeline;
pub mod queue;
pub mod system;
pub mod tasks;
pub mod web;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware;
use axum::response::IntoResponse;
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "SD-Host",
        description = "Self-hosted Stable Diffusion server: models, tasks, images, A1111-compatible API."
    ),
    tags(
        (name = "system"), (name = "models"), (name = "pipeline"), (name = "tasks"),
        (name = "queue"), (name = "images"), (name = "a1111"), (name = "dialect")
    ),
    components(schemas(crate::error::FieldError))
)]
struct ApiDoc;

/// Every documented route. Each resource contributes its own `OpenApiRouter`.
pub fn documented_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(system::routes())
        .merge(tasks::routes())
        .merge(queue::routes())
        .merge(pipeline::routes())
        .merge(models::routes())
        .merge(images::routes())
        .merge(a1111::routes())
        .merge(dialect::routes())
}

pub fn router(state: AppState) -> Router {
    let (api, doc) = documented_routes().split_for_parts();
    let mut app = api
        .merge(docs::routes(doc))
        .fallback(|| async { ApiError::NotFound("Not Found".into()).into_response() })
        .method_not_allowed_fallback(|| async {
            (
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                axum::Json(serde_json::json!({"detail": "Method Not Allowed"})),
            )
        })
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(middleware::from_fn(auth::reject_simple_content_types))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::reject_cross_site,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::body_limit,
        ));
    if let Some(cors) = cors_layer(&state) {
        app = app.layer(cors);
    }
    app.layer(middleware::from_fn_with_state(
        state.clone(),
        auth::count_responses,
    ))
    .layer(tower_http::trace::TraceLayer::new_for_http())
    .with_state(state)
}

fn cors_layer(state: &AppState) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = state
        .config
        .server
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    let key_header = HeaderName::from_bytes(state.config.api.key_header.as_bytes()).ok()?;
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                axum::http::header::CONTENT_TYPE,
                axum::http::header::AUTHORIZATION,
                key_header,
            ]),
    )
}
