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
    /// Where this process's ids start for the topic: an id below it comes from an earlier run.
    first_id: u64,
    history: VecDeque<SseEvent>,
    tx: broadcast::Sender<SseEvent>,
    /// Set once a terminal event was published: replay it, then end the stream.
    finished: bool,
}

impl Topic {
    fn new(first_id: u64) -> Self {
        Topic {
            next_id: first_id,
            first_id,
            history: VecDeque::new(),
            tx: broadcast::channel(64).0,
            finished: false,
        }
    }
}

#[derive(Clone)]
pub struct EventHub {
    topics: Arc<Mutex<HashMap<String, Topic>>>,
    order: Arc<Mutex<VecDeque<String>>>,
    /// Ids of this process start at boot time (ms) × 2^20, so they keep increasing across
    /// restarts and a `Last-Event-ID` from an earlier run is recognised as such.
    epoch: u64,
    /// Set at shutdown: every stream ends so a graceful stop does not wait on SSE clients.
    closed: tokio::sync::watch::Sender<bool>,
    /// How often an idle stream gets a keep-alive comment (`server.sse_keepalive`).
    keep_alive: std::time::Duration,
}

impl Default for EventHub {
    fn default() -> Self {
        let boot_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        EventHub {
            topics: Arc::default(),
            order: Arc::default(),
            epoch: boot_ms << 20,
            closed: tokio::sync::watch::channel(false).0,
            keep_alive: std::time::Duration::from_secs(15),
        }
    }
}

impl EventHub {
    pub fn with_keep_alive(mut self, every: std::time::Duration) -> Self {
        self.keep_alive = every;
        self
    }

    pub fn keep_alive(&self) -> std::time::Duration {
        self.keep_alive
    }

    /// Ends every open stream (graceful shutdown).
    pub fn close_all(&self) {
        self.closed.send_replace(true);
    }

    /// Next event of `rx`, or `None` once the channel closes or the hub shuts down. Events already
    /// sent are delivered before the shutdown is noticed (a terminal `interrupted` still arrives).
    async fn next_event(
        rx: &mut broadcast::Receiver<SseEvent>,
        closed: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<SseEvent> {
        loop {
            tokio::select! {
                biased;
                r = rx.recv() => match r {
                    Ok(ev) => return Some(ev),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = closed.wait_for(|c| *c) => return None,
            }
        }
    }

    fn with_topic<T>(&self, key: &str, f: impl FnOnce(&mut Topic) -> T) -> T {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if !topics.contains_key(key) {
            let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
            order.push_back(key.to_string());
            if order.len() > MAX_TOPICS {
                // Forget the oldest finished topics nobody listens to; live ones stay.
                let mut kept = VecDeque::with_capacity(order.len());
                let mut excess = order.len() - MAX_TOPICS;
                while let Some(old) = order.pop_front() {
                    let idle = topics
                        .get(&old)
                        .is_some_and(|t| t.finished && t.tx.receiver_count() == 0);
                    if excess > 0 && idle {
                        topics.remove(&old);
                        excess -= 1;
                    } else {
                        kept.push_back(old);
                    }
                }
                *order = kept;
            }
            topics.insert(key.to_string(), Topic::new(self.epoch + 1));
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
        let (replay, rx, finished, last_id) = self.with_topic(key, |t| {
            // An id from another run (or from the future) says nothing about this run's events.
            let last_id = last_id.filter(|l| *l >= t.first_id && *l < t.next_id);
            let replay: Vec<SseEvent> = t
                .history
                .iter()
                .filter(|e| last_id.is_none_or(|l| e.id.unwrap_or(0) > l))
                .cloned()
                .collect();
            (replay, t.tx.subscribe(), t.finished, last_id)
        });
        let last_replayed = replay.last().and_then(|e| e.id).or(last_id).unwrap_or(0);
        let terminal_names = ["completed", "failed", "cancelled", "ready", "interrupted"];
        let closed = self.closed.subscribe();
        let live = futures::stream::unfold(
            (rx, closed, last_replayed, finished),
            move |(mut rx, mut closed, last, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let ev = Self::next_event(&mut rx, &mut closed).await?;
                    if ev.id.unwrap_or(0) <= last {
                        continue;
                    }
                    let end = terminal_names.contains(&ev.event.as_str());
                    let id = ev.id.unwrap_or(last);
                    return Some((ev, (rx, closed, id, end)));
                }
            },
        );
        futures::stream::iter(replay).chain(live)
    }

    /// A live feed with no replay and no end (gallery, queue).
    pub fn feed(&self, key: &str) -> impl Stream<Item = SseEvent> + Send {
        let rx = self.with_topic(key, |t| t.tx.subscribe());
        let closed = self.closed.subscribe();
        futures::stream::unfold((rx, closed), |(mut rx, mut closed)| async move {
            let ev = Self::next_event(&mut rx, &mut closed).await?;
            Some((ev, (rx, closed)))
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
        let third = all[1].id.expect("id");
        let resumed: Vec<_> = hub.subscribe("t", Some(third)).collect().await;
        assert_eq!(resumed.len(), 1);
        assert_eq!(resumed[0].event, "completed");
        assert_eq!(resumed[0].id, Some(third + 1));
        // An id from an earlier run (smaller epoch) replays everything.
        let stale: Vec<_> = hub.subscribe("t", Some(30)).collect().await;
        assert_eq!(stale.len(), 3);
    }

    #[tokio::test]
    async fn close_all_ends_open_streams() {
        let hub = EventHub::default();
        let a = hub.feed("gallery");
        let b = hub.subscribe("task:x", None);
        hub.close_all();
        let (a, b): (Vec<_>, Vec<_>) = futures::join!(a.collect(), b.collect());
        assert!(a.is_empty() && b.is_empty());
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
