//! `/openapi.json`, Swagger UI at `/docs` and ReDoc at `/redoc`, all served from the binary (no CDN).

use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::OpenApi;

use crate::state::AppState;

macro_rules! asset {
    ($name:literal) => {
        include_bytes!(concat!(env!("SDHOST_WEB_DIR"), "/", $name))
    };
}

static SWAGGER_JS: &[u8] = asset!("swagger-ui-bundle.js");
static SWAGGER_CSS: &[u8] = asset!("swagger-ui.css");
static REDOC_JS: &[u8] = asset!("redoc.standalone.js");

const SWAGGER_HTML: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SD-Host API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui" });</script>
</body></html>"##;

const REDOC_HTML: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SD-Host API</title></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="/redoc/assets/redoc.standalone.js"></script>
</body></html>"##;

pub fn routes(doc: OpenApi) -> Router<AppState> {
    let doc = std::sync::Arc::new(doc);
    Router::new()
        .route(
            "/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .route("/docs", get(|| async { Html(SWAGGER_HTML) }))
        .route("/redoc", get(|| async { Html(REDOC_HTML) }))
        .route(
            "/docs/assets/swagger-ui-bundle.js",
            get(|| async { js(SWAGGER_JS) }),
        )
        .route(
            "/docs/assets/swagger-ui.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css")], SWAGGER_CSS) }),
        )
        .route(
            "/redoc/assets/redoc.standalone.js",
            get(|| async { js(REDOC_JS) }),
        )
}

fn js(body: &'static [u8]) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/javascript"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
}
