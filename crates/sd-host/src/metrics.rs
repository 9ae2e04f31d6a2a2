//! Prometheus text metrics, hand-rolled on atomics: a handful of counters needs no metrics crate.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub http_requests: [AtomicU64; 5],
    pub tasks_submitted: AtomicU64,
    pub tasks_completed: AtomicU64,
    pub tasks_failed: AtomicU64,
    pub tasks_cancelled: AtomicU64,
    pub task_seconds_micros: AtomicU64,
    pub steps_total: AtomicU64,
    pub step_seconds_micros: AtomicU64,
    pub images_stored: AtomicU64,
    pub downloads_started: AtomicU64,
    pub downloads_completed: AtomicU64,
    pub downloads_failed: AtomicU64,
    pub download_bytes: AtomicU64,
    pub queue_pending: AtomicU64,
    pub queue_running: AtomicU64,
}

impl Metrics {
    pub fn record_http(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.http_requests[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        metric(
            "sdhost_http_requests_total",
            "counter",
            "HTTP responses by status class.",
            (0..5)
                .map(|i| {
                    (
                        format!("{{class=\"{}xx\"}}", i + 1),
                        get(&self.http_requests[i]) as f64,
                    )
                })
                .collect(),
        );
        metric(
            "sdhost_queue_depth",
            "gauge",
            "Tasks waiting in the queue.",
            vec![(String::new(), get(&self.queue_pending) as f64)],
        );
        metric(
            "sdhost_tasks_running",
            "gauge",
            "Tasks being generated now.",
            vec![(String::new(), get(&self.queue_running) as f64)],
        );
        metric(
            "sdhost_tasks_total",
            "counter",
            "Tasks by outcome.",
            vec![
                (
                    "{state=\"submitted\"}".into(),
                    get(&self.tasks_submitted) as f64,
                ),
                (
                    "{state=\"completed\"}".into(),
                    get(&self.tasks_completed) as f64,
                ),
                ("{state=\"failed\"}".into(), get(&self.tasks_failed) as f64),
                (
                    "{state=\"cancelled\"}".into(),
                    get(&self.tasks_cancelled) as f64,
                ),
            ],
        );
        metric(
            "sdhost_task_duration_seconds_sum",
            "counter",
            "Total wall time of finished tasks.",
            vec![(String::new(), get(&self.task_seconds_micros) as f64 / 1e6)],
        );
        metric(
            "sdhost_steps_total",
            "counter",
            "Sampling steps run.",
            vec![(String::new(), get(&self.steps_total) as f64)],
        );
        metric(
            "sdhost_step_duration_seconds_sum",
            "counter",
            "Total time spent in sampling steps (steps/s = steps_total / this).",
            vec![(String::new(), get(&self.step_seconds_micros) as f64 / 1e6)],
        );
        metric(
            "sdhost_images_stored_total",
            "counter",
            "Images written to the store.",
            vec![(String::new(), get(&self.images_stored) as f64)],
        );
        metric(
            "sdhost_downloads_total",
            "counter",
            "Model downloads by outcome.",
            vec![
                (
                    "{state=\"started\"}".into(),
                    get(&self.downloads_started) as f64,
                ),
                (
                    "{state=\"completed\"}".into(),
                    get(&self.downloads_completed) as f64,
                ),
                (
                    "{state=\"failed\"}".into(),
                    get(&self.downloads_failed) as f64,
                ),
            ],
        );
        metric(
            "sdhost_download_bytes_total",
            "counter",
            "Bytes downloaded.",
            vec![(String::new(), get(&self.download_bytes) as f64)],
        );
        out
    }
}
