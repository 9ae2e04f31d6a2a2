//! The browser UI at `/` (SPEC §9): one self-contained page (no external script, style or font)
//! that drives the public API with the visitor's API key — generate, live queue with previews,
//! gallery with attribute filters, models with Civitai downloads.

use axum::response::Html;

static INDEX: &str = include_str!("../web/index.html");

/// The page itself holds no data, so it is served without a key; everything it shows comes from
/// API calls that carry the key the visitor enters.
pub fn index() -> Html<&'static str> {
    Html(INDEX)
}

/// Whether a request to `/` is the browser page rather than the status JSON.
pub fn wants_page(method: &axum::http::Method, headers: &axum::http::HeaderMap) -> bool {
    let json = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    (method == axum::http::Method::GET || method == axum::http::Method::HEAD) && !json
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        let page = super::INDEX;
        for banned in ["http://", "https://", "//cdn", "@import"] {
            assert!(!page.contains(banned), "{banned}");
        }
        for call in [
            "/api/v1/tasks",
            "/api/v1/tasks/queue",
            "/api/v1/images",
            "/api/v1/models/add-from-civitai",
        ] {
            assert!(page.contains(call), "{call}");
        }
    }
}
