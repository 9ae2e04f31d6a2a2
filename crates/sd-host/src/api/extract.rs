//! Extractors that turn bad input into our error shapes before a handler runs.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldError};

/// JSON body: wrong content type → 415, too large → 413, bad JSON or wrong shape → 422 with `loc`.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => v,
            Err(rej) => return Err(json_rejection(rej)),
        };
        match serde_path_to_error::deserialize::<_, T>(bytes) {
            Ok(v) => Ok(ApiJson(v)),
            Err(e) => {
                let mut loc = vec!["body".to_string()];
                let path = e.path().to_string();
                if path != "." {
                    loc.extend(path.split('.').map(str::to_string));
                }
                let inner = e.into_inner().to_string();
                let kind = if inner.starts_with("missing field") {
                    "missing"
                } else if inner.starts_with("invalid type") {
                    "type_error"
                } else {
                    "value_error"
                };
                Err(ApiError::Validation(vec![FieldError {
                    loc,
                    msg: inner,
                    kind: kind.into(),
                }]))
            }
        }
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    match rej {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::UnsupportedMediaType("expected Content-Type: application/json".into())
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::Validation(vec![FieldError::new(
            &["body"],
            format!("invalid JSON: {}", e.body_text()),
            "json_invalid",
        )]),
        JsonRejection::JsonDataError(e) => ApiError::Validation(vec![FieldError::new(
            &["body"],
            e.body_text(),
            "value_error",
        )]),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("request body too large".into())
        }
        other => ApiError::BadRequest(other.body_text()),
    }
}

/// Query string → 422 on a bad value.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| {
                ApiError::Validation(vec![FieldError::new(
                    &["query"],
                    e.body_text(),
                    "value_error",
                )])
            })
    }
}

/// A SHA-256 id in the path: exactly 64 lowercase hex, checked before any lookup.
pub struct HashPath(pub String);

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl<S: Send + Sync> FromRequestParts<S> for HashPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e: PathRejection| ApiError::BadRequest(e.body_text()))?;
        if is_sha256_hex(&raw) {
            Ok(HashPath(raw))
        } else {
            Err(ApiError::field(
                &["path", "hash"],
                "must be a SHA-256 as 64 lowercase hex characters",
            ))
        }
    }
}

/// A task id in the path: a UUID, checked before any lookup.
pub struct TaskIdPath(pub uuid::Uuid);

impl<S: Send + Sync> FromRequestParts<S> for TaskIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e: PathRejection| ApiError::BadRequest(e.body_text()))?;
        uuid::Uuid::parse_str(&raw)
            .map(TaskIdPath)
            .map_err(|_| ApiError::field(&["path", "task_id"], "must be a UUID"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_format() {
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex(&"A".repeat(64)));
        assert!(!is_sha256_hex(&"a".repeat(63)));
        assert!(!is_sha256_hex("../../etc/passwd"));
        assert!(!is_sha256_hex(&format!("{}/..", "a".repeat(61))));
    }
}
