//! Server-Sent Events plumbing shared by every stream (tasks, queue, images, downloads).

pub mod hub;

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;

pub use hub::EventHub;

/// One event as it goes on the wire: `id`, `event` name and JSON `data`.
#[derive(Debug, Clone, Serialize)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub event: String,
    pub data: serde_json::Value,
}

impl SseEvent {
    pub fn new(event: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            id: None,
            event: event.into(),
            data,
        }
    }

    pub fn with_id(mut self, id: u64) -> Self {
        self.id = Some(id);
        self
    }

    pub fn to_axum(&self) -> Event {
        let mut e = Event::default()
            .event(self.event.clone())
            .data(self.data.to_string());
        if let Some(id) = self.id {
            e = e.id(id.to_string());
        }
        e
    }
}

/// An SSE response with keep-alive comments every `hub.keep_alive` (15 s by default) so proxies
/// and clients do not time out idle streams.
pub fn sse_response<S>(
    hub: &EventHub,
    stream: S,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    S: Stream<Item = SseEvent> + Send + 'static,
{
    use futures::StreamExt;
    Sse::new(stream.map(|e| Ok(e.to_axum()))).keep_alive(
        KeepAlive::new()
            .interval(hub.keep_alive())
            .text("keep-alive"),
    )
}

/// `Last-Event-ID` from a reconnecting client.
pub fn last_event_id(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}
