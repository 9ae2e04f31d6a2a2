//! In-process fan-out of events by topic (`task:<id>`, `model:<sha>`, `gallery`, ...).
//!
//! Publishing never waits on a subscriber: each topic is a `broadcast` channel, and a subscriber
//! that falls behind loses old events (it still gets the newest and the terminal one from the
//! history), so a slow SSE client cannot slow the engine.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use tokio::sync::broadcast;

use super::SseEvent;

/// Events kept per topic for `Last-Event-ID` replay.
const HISTORY: usize = 256;
/// Finished topics kept for replay before the oldest are dropped.
const MAX_TOPICS: usize = 4096;

struct Topic {
    next_id: u64,
    history: VecDeque<SseEvent>,
    tx: broadcast::Sender<SseEvent>,
    /// Set once a terminal event was published: replay it, then end the stream.
    finished: bool,
}

impl Topic {
    fn new() -> Self {
        Topic {
            next_id: 1,
            history: VecDeque::new(),
            tx: broadcast::channel(64).0,
            finished: false,
        }
    }
}

#[derive(Clone, Default)]
pub struct EventHub {
    topics: Arc<Mutex<HashMap<String, Topic>>>,
    order: Arc<Mutex<VecDeque<String>>>,
}

impl EventHub {
    fn with_topic<T>(&self, key: &str, f: impl FnOnce(&mut Topic) -> T) -> T {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if !topics.contains_key(key) {
            let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
            order.push_back(key.to_string());
            while order.len() > MAX_TOPICS {
                if let Some(old) = order.pop_front() {
                    topics.remove(&old);
                }
            }
            topics.insert(key.to_string(), Topic::new());
        }
        let topic = topics.get_mut(key).expect("inserted above");
        f(topic)
    }

    /// Publishes `event` on `key` with the topic's next id. `terminal` ends every stream on it.
    pub fn publish(&self, key: &str, event: &str, data: serde_json::Value, terminal: bool) -> u64 {
        self.with_topic(key, |t| {
            let id = t.next_id;
            t.next_id += 1;
            let ev = SseEvent::new(event, data).with_id(id);
            // Keep every non-progress event; of the progress ones, only the newest matters.
            if ev.event == "progress" {
                if let Some(last) = t.history.back() {
                    if last.event == "progress" {
                        t.history.pop_back();
                    }
                }
            }
            t.history.push_back(ev.clone());
            while t.history.len() > HISTORY {
                t.history.pop_front();
            }
            t.finished |= terminal;
            let _ = t.tx.send(ev);
            id
        })
    }

    /// Whether a terminal event was published on `key` in this process.
    pub fn is_finished(&self, key: &str) -> bool {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.get(key).is_some_and(|t| t.finished)
    }

    /// Events after `last_id` from the history, then live ones; ends after a terminal event.
    pub fn subscribe(
        &self,
        key: &str,
        last_id: Option<u64>,
    ) -> impl Stream<Item = SseEvent> + Send {
        let (replay, rx, finished) = self.with_topic(key, |t| {
            let replay: Vec<SseEvent> = t
                .history
                .iter()
                .filter(|e| last_id.is_none_or(|l| e.id.unwrap_or(0) > l))
                .cloned()
                .collect();
            (replay, t.tx.subscribe(), t.finished)
        });
        let last_replayed = replay.last().and_then(|e| e.id).or(last_id).unwrap_or(0);
        let terminal_names = ["completed", "failed", "cancelled", "ready"];
        let live = futures::stream::unfold(
            (rx, last_replayed, finished),
            move |(mut rx, last, done)| async move {
                if done {
                    return None;
                }
                loop {
                    match rx.recv().await {
                        Ok(ev) if ev.id.unwrap_or(0) <= last => continue,
                        Ok(ev) => {
                            let end = terminal_names.contains(&ev.event.as_str());
                            let id = ev.id.unwrap_or(last);
                            return Some((ev, (rx, id, end)));
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        );
        futures::stream::iter(replay).chain(live)
    }

    /// A live feed with no replay and no end (gallery, queue).
    pub fn feed(&self, key: &str) -> impl Stream<Item = SseEvent> + Send {
        let rx = self.with_topic(key, |t| t.tx.subscribe());
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => return Some((ev, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn replay_after_last_event_id_then_live_until_terminal() {
        let hub = EventHub::default();
        hub.publish("t", "queued", json!({"position": 1}), false);
        hub.publish("t", "progress", json!({"step": 1}), false);
        hub.publish("t", "progress", json!({"step": 2}), false);
        let all: Vec<_> = {
            let s = hub.subscribe("t", None);
            hub.publish("t", "completed", json!({}), true);
            s.collect().await
        };
        let names: Vec<_> = all.iter().map(|e| e.event.as_str()).collect();
        // the superseded progress event is not replayed
        assert_eq!(names, ["queued", "progress", "completed"]);
        assert_eq!(all[1].data["step"], 2);
        let resumed: Vec<_> = hub.subscribe("t", Some(3)).collect().await;
        assert_eq!(resumed.len(), 1);
        assert_eq!(resumed[0].event, "completed");
        assert_eq!(resumed[0].id, Some(4));
    }

    #[tokio::test]
    async fn slow_subscriber_never_blocks_publisher() {
        let hub = EventHub::default();
        let _s = hub.subscribe("t", None);
        for i in 0..10_000 {
            hub.publish("t", "progress", json!({"step": i}), false);
        }
        hub.publish("t", "failed", json!({"detail": "x"}), true);
        let got: Vec<_> = hub.subscribe("t", None).collect().await;
        assert_eq!(got.last().map(|e| e.event.as_str()), Some("failed"));
    }
}
