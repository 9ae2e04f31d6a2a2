//! API-key authentication (SPEC §3) and the content-type guard against cross-site simple requests.

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::images::share::ShareCheck;
use crate::state::AppState;

/// Paths that never need a key.
const PUBLIC_PATHS: &[&str] = &["/health", "/api/health", "/api/v1/health"];

pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares digests so the comparison time depends neither on the key's content nor on its length.
fn key_matches(state: &AppState, presented: &str) -> bool {
    let d = digest(presented.as_bytes());
    let mut any = 0u8;
    for k in state.key_digests.iter() {
        any |= k.ct_eq(&d).unwrap_u8();
    }
    any == 1
}

/// The key from the configured header, `Authorization: Bearer KEY`, or A1111-style HTTP Basic
/// (`--api-auth` clients): any user name, the key as the password.
fn presented_key(state: &AppState, req: &Request) -> Option<String> {
    let h = req.headers();
    if let Some(v) = h
        .get(state.config.api.key_header.as_str())
        .and_then(|v| v.to_str().ok())
    {
        return Some(v.trim().to_string());
    }
    let auth = h.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, value) = auth.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(value.trim().to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine as _;
        // Undecodable credentials present as an empty key: refused like a wrong one.
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        let password = decoded.split_once(':').map(|(_, p)| p).unwrap_or_default();
        return Some(password.to_string());
    }
    None
}

/// A GET of one image carrying `?expires=&token=`: a share link, checked here. `None` = not a share link.
fn share_link(state: &AppState, req: &Request) -> Option<ShareCheck> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return None;
    }
    let rest = req.uri().path().strip_prefix("/api/v1/images/")?;
    let hash = rest.strip_suffix("/thumbnail").unwrap_or(rest);
    let query = req.uri().query()?;
    let mut token = None;
    let mut expires = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("token", v)) => token = Some(v),
            Some(("expires", v)) => expires = v.parse::<i64>().ok(),
            _ => {}
        }
    }
    let token = token?;
    let Some(expires) = expires else {
        return Some(ShareCheck::Invalid);
    };
    if !crate::api::extract::is_sha256_hex(hash) {
        return Some(ShareCheck::Invalid);
    }
    Some(
        state
            .share
            .verify(hash, expires, token, chrono::Utc::now().timestamp()),
    )
}

pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.key_digests.is_empty() || PUBLIC_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    // The browser UI page is public (it asks for the key); the status JSON at `/` is not.
    if req.uri().path() == "/" && crate::api::web::wants_page(req.method(), req.headers()) {
        return next.run(req).await;
    }
    if req.method() == Method::OPTIONS {
        // CORS preflight carries no credentials; the CORS layer answers it.
        return next.run(req).await;
    }
    if let Some(key) = presented_key(&state, &req) {
        if key_matches(&state, &key) {
            return next.run(req).await;
        }
        return ApiError::Unauthorized("invalid API key".into()).into_response();
    }
    match share_link(&state, &req) {
        Some(ShareCheck::Valid) => next.run(req).await,
        Some(ShareCheck::Expired) => {
            ApiError::Forbidden("share link expired".into()).into_response()
        }
        Some(ShareCheck::Invalid) => {
            ApiError::Forbidden("invalid share link".into()).into_response()
        }
        None => ApiError::Unauthorized(format!(
            "missing API key: send it in the {} header, as Authorization: Bearer, or as the HTTP Basic password",
            state.config.api.key_header
        ))
        .into_response(),
    }
}

/// State-changing requests must not carry the content types a cross-site form or `fetch` can send
/// without a CORS preflight.
pub async fn reject_simple_content_types(req: Request, next: Next) -> Response {
    let changes_state = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    if changes_state {
        if let Some(ct) = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if matches!(
                mime.as_str(),
                "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data"
            ) {
                return ApiError::UnsupportedMediaType(format!(
                    "Content-Type {mime} is not accepted; send application/json"
                ))
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// Rejects a declared body over the limit before reading it (the extractors enforce it while reading).
pub async fn body_limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.config.limits.max_body_bytes as u64) {
        return ApiError::PayloadTooLarge(format!(
            "request body exceeds {} bytes",
            state.config.limits.max_body_bytes
        ))
        .into_response();
    }
    next.run(req).await
}

pub async fn count_responses(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    state.metrics.record_http(resp.status().as_u16());
    resp
}

fn is_loopback_name(host: &str) -> bool {
    // Strip the port ("127.0.0.1:8000", "[::1]:8000", "localhost:8000").
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Browser-borne attacks on a keyless server: a cross-site page may send body-less POSTs (no
/// Content-Type, so no preflight), and DNS rebinding can point a foreign name at 127.0.0.1.
/// State-changing requests from another origin are refused unless that origin is listed in
/// `server.cors_origins`; a keyless loopback server answers only loopback Host names.
pub async fn reject_cross_site(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    if state.key_digests.is_empty() && state.config.is_loopback_host() {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !host.is_empty() && !is_loopback_name(host) {
            return ApiError::Forbidden(format!(
                "Host {host:?} is not a loopback name; a server without API keys answers only local names"
            ))
            .into_response();
        }
    }
    let changes_state = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    if changes_state {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let allowed = |o: &str| {
            state.config.server.cors_origins.iter().any(|c| c == o)
                || host.is_some_and(|h| o.split_once("://").is_some_and(|(_, rest)| rest == h))
        };
        let cross_site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "cross-site");
        let foreign_origin =
            origin.is_some_and(|o| o != "null" && !allowed(o)) || origin == Some("null");
        if foreign_origin || (cross_site && !origin.is_some_and(allowed)) {
            return ApiError::Forbidden(
                "cross-site request refused; list the origin in server.cors_origins to allow it"
                    .into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod cross_site_tests {
    #[test]
    fn loopback_names() {
        for ok in [
            "127.0.0.1:8000",
            "localhost",
            "localhost:1",
            "[::1]:80",
            "a.localhost:9",
            "127.9.9.9",
        ] {
            assert!(super::is_loopback_name(ok), "{ok}");
        }
        for bad in [
            "evil.com",
            "evil.com:8000",
            "192.168.1.2:8000",
            "[fe80::1]:80",
            "127.0.0.1.evil.com",
        ] {
            assert!(!super::is_loopback_name(bad), "{bad}");
        }
    }
}
