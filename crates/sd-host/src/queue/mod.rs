//! The persistent priority queue and its dispatcher.
//!
//! Tasks live in the database (committed before the API answers 202). One dispatcher task picks the
//! next one ([`scheduler::pick`]), drives the engine thread ([`worker`]), stores the images, marks the
//! task finished and fires the callback. Progress goes out through the [`EventHub`] without ever
//! waiting on a subscriber.

pub mod callback;
pub mod inputs;
pub mod request;
pub mod scheduler;
pub mod submit;
pub mod worker;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;
use tokio::sync::{watch, Notify};

use crate::db::{now_ms, TaskRecord, TaskStatus};
use crate::images::store::GeneratedImage;
use crate::state::AppState;
use request::TaskParams;
use worker::{EngineHandle, WorkerError};

/// A task processing on the engine right now.
#[derive(Debug, Clone)]
pub struct RunningInfo {
    pub task_id: String,
    pub step: u32,
    pub total_steps: u32,
    pub image_index: u32,
    pub num_images: u32,
    /// Latest preview as JPEG bytes.
    pub preview_jpeg: Option<Vec<u8>>,
    pub started: Instant,
}

struct RunningTask {
    info: RunningInfo,
    cancel: Arc<worker::StopSignal>,
}

pub struct Queue {
    paused: watch::Sender<bool>,
    wake: Notify,
    running: Mutex<Option<RunningTask>>,
    /// Cancels that arrived after a task was picked but before it started running.
    early_cancels: Mutex<std::collections::HashSet<String>>,
    /// Held while a task runs; pipeline commands (load-checkpoint, load-loras) wait behind it.
    pub engine_lock: tokio::sync::Mutex<()>,
    /// The library's embedding set last handed to the engine (`sha:name` list).
    embeddings_key: Mutex<Option<String>>,
}

#[derive(Clone)]
pub struct QueueHandle(Arc<Queue>);

pub fn task_topic(id: &str) -> String {
    format!("task:{id}")
}

pub const QUEUE_TOPIC: &str = "queue";

enum Outcome {
    Done(Vec<String>),
    Cancelled,
    Failed(String),
}

impl Default for QueueHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl QueueHandle {
    pub fn new() -> Self {
        QueueHandle(Arc::new(Queue {
            paused: watch::channel(false).0,
            wake: Notify::new(),
            running: Mutex::new(None),
            early_cancels: Mutex::default(),
            engine_lock: tokio::sync::Mutex::new(()),
            embeddings_key: Mutex::default(),
        }))
    }

    pub fn queue(&self) -> &Queue {
        &self.0
    }

    fn running_lock(&self) -> std::sync::MutexGuard<'_, Option<RunningTask>> {
        self.0.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn early_cancels(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.0
            .early_cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn running(&self) -> Option<RunningInfo> {
        self.running_lock().as_ref().map(|r| r.info.clone())
    }

    pub fn is_paused(&self) -> bool {
        *self.0.paused.borrow()
    }

    /// Wakes the dispatcher (new task, resume, priority change).
    pub fn wake(&self) {
        self.0.wake.notify_one();
    }

    pub fn pause(&self, state: &AppState) {
        self.0.paused.send_replace(true);
        self.wake();
        self.publish_snapshot(state);
    }

    pub fn resume(&self, state: &AppState) {
        self.0.paused.send_replace(false);
        self.wake();
        self.publish_snapshot(state);
    }

    /// Signals the running task to stop at the next step. Returns whether `id` was running.
    pub fn cancel_running(&self, id: Option<&str>) -> bool {
        let guard = self.running_lock();
        match guard.as_ref() {
            Some(r) if id.is_none_or(|i| i == r.info.task_id) => {
                r.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Ends the running task early with the images it has, the one in progress decoded as it
    /// stands (A1111 `interrupt`); the task completes. Returns the running task's id.
    pub fn finish_running(&self) -> Option<String> {
        let guard = self.running_lock();
        guard.as_ref().map(|r| {
            r.cancel.finish();
            r.info.task_id.clone()
        })
    }

    /// Cuts the running task's current image short (A1111 `skip`); the task goes on with its next
    /// image. Returns the running task's id.
    pub fn skip_running_image(&self) -> Option<String> {
        let guard = self.running_lock();
        guard.as_ref().map(|r| {
            r.cancel.skip_image(r.info.image_index);
            r.info.task_id.clone()
        })
    }

    /// Cancels one task: a pending one at once, a running one at its next step.
    /// Returns `Ok(true)` if cancelled (or cancelling), `Ok(false)` if already finished.
    pub async fn cancel(&self, state: &AppState, id: &str) -> crate::db::DbResult<Option<bool>> {
        let Some(task) = state.repo.get_task(id).await? else {
            return Ok(None);
        };
        match task.status {
            TaskStatus::Pending => {
                if state
                    .repo
                    .finish_task(id, TaskStatus::Cancelled, &[], Some("cancelled"))
                    .await?
                {
                    state.events.publish(
                        &task_topic(id),
                        "cancelled",
                        json!({"task_id": id}),
                        true,
                    );
                    state
                        .metrics
                        .tasks_cancelled
                        .fetch_add(1, Ordering::Relaxed);
                    self.publish_snapshot(state);
                    spawn_callback(state, id);
                    Ok(Some(true))
                } else {
                    // It started meanwhile.
                    Ok(Some(self.cancel_running(Some(id))))
                }
            }
            TaskStatus::Processing => {
                {
                    // Both locks, in run_task's order, so a cancel cannot slip between its two steps.
                    let running = self.running_lock();
                    if let Some(r) = running.as_ref().filter(|r| r.info.task_id == id) {
                        r.cancel.cancel();
                        return Ok(Some(true));
                    }
                    // Picked but not started yet: run_task takes this before the first step.
                    self.early_cancels().insert(id.to_string());
                }
                // Or it finished between the read above and the lock: nothing to cancel then.
                let finished = state
                    .repo
                    .get_task(id)
                    .await?
                    .is_some_and(|t| t.status.is_terminal());
                if finished {
                    self.early_cancels().remove(id);
                    return Ok(Some(false));
                }
                Ok(Some(true))
            }
            _ => Ok(Some(false)),
        }
    }

    /// Position (1-based) of each pending task in the order the dispatcher takes them (ignoring
    /// smart reordering, which only applies at pick time).
    pub async fn positions(&self, state: &AppState) -> Vec<(String, usize)> {
        match state.repo.list_pending().await {
            Ok(p) => p
                .into_iter()
                .enumerate()
                .map(|(i, t)| (t.id, i + 1))
                .collect(),
            Err(_) => vec![],
        }
    }

    pub async fn snapshot(&self, state: &AppState) -> serde_json::Value {
        let pending = state.repo.list_pending().await.unwrap_or_default();
        let running = self.running().map(|r| {
            json!({"task_id": r.task_id, "step": r.step, "total_steps": r.total_steps, "image_index": r.image_index})
        });
        state
            .metrics
            .queue_pending
            .store(pending.len() as u64, Ordering::Relaxed);
        json!({
            "paused": self.is_paused(),
            "running": running,
            "pending": pending.iter().enumerate().map(|(i, t)| json!({
                "task_id": t.id, "position": i + 1, "priority": t.priority, "model": t.model_sha256,
            })).collect::<Vec<_>>(),
        })
    }

    /// Sends a queue snapshot to `GET /tasks/queue` subscribers (in the background).
    pub fn publish_snapshot(&self, state: &AppState) {
        let (q, st) = (self.clone(), state.clone());
        tokio::spawn(async move {
            let snap = q.snapshot(&st).await;
            st.events.publish(QUEUE_TOPIC, "snapshot", snap, false);
        });
    }

    /// Starts the dispatcher. Call once, after crash recovery.
    pub fn start(&self, state: AppState) {
        let q = self.clone();
        tokio::spawn(async move { q.dispatch_loop(state).await });
    }

    async fn dispatch_loop(self, state: AppState) {
        let policy = scheduler::Policy {
            smart: state.config.queue.smart_scheduling,
            max_reorder_wait_ms: state.config.queue.max_reorder_wait.as_millis() as i64,
        };
        let mut paused = self.0.paused.subscribe();
        loop {
            while *paused.borrow_and_update() {
                if paused.changed().await.is_err() {
                    return;
                }
            }
            let pending = match state.repo.list_pending().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "listing pending tasks");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let es = state.engine.state();
            let loaded = es
                .checkpoint
                .as_ref()
                .map(|c| (c.sha256.clone(), es.lora_key()));
            let pick = scheduler::pick(
                &pending,
                loaded.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
                now_ms(),
                policy,
            );
            let Some(i) = pick else {
                tokio::select! {
                    _ = self.0.wake.notified() => {}
                    _ = paused.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            };
            let task = pending[i].clone();
            match state.repo.mark_processing(&task.id).await {
                Ok(true) => self.run_task(&state, task).await,
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "starting task");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn run_task(&self, state: &AppState, task: TaskRecord) {
        let _engine = self.0.engine_lock.lock().await;
        let started = Instant::now();
        let params: Result<TaskParams, _> = serde_json::from_value(task.params.clone());
        let (steps, n) = params
            .as_ref()
            .map(|p| (effective_steps(p), p.num_images))
            .unwrap_or((0, 1));
        let cancel = {
            let mut running = self.running_lock();
            let early = self.early_cancels().remove(&task.id);
            let cancel = Arc::new(worker::StopSignal::new(early));
            *running = Some(RunningTask {
                info: RunningInfo {
                    task_id: task.id.clone(),
                    step: 0,
                    total_steps: steps,
                    image_index: 0,
                    num_images: n,
                    preview_jpeg: None,
                    started,
                },
                cancel: cancel.clone(),
            });
            cancel
        };
        state.metrics.queue_running.store(1, Ordering::Relaxed);
        self.publish_snapshot(state);
        let topic = task_topic(&task.id);
        state.events.publish(
            &topic,
            "started",
            json!({"task_id": task.id, "total_steps": steps, "num_images": n}),
            false,
        );
        let outcome = match params {
            Ok(p) => self.execute(state, &task, &p, cancel).await,
            Err(e) => Outcome::Failed(format!("stored task parameters are unreadable: {e}")),
        };
        *self.running_lock() = None;
        state.metrics.queue_running.store(0, Ordering::Relaxed);
        let (status, images, error) = match &outcome {
            Outcome::Done(h) => (TaskStatus::Completed, h.clone(), None),
            Outcome::Cancelled => (TaskStatus::Cancelled, vec![], Some("cancelled".to_string())),
            Outcome::Failed(m) => (TaskStatus::Failed, vec![], Some(m.clone())),
        };
        let recorded = match state
            .repo
            .finish_task(&task.id, status, &images, error.as_deref())
            .await
        {
            Ok(recorded) => recorded,
            Err(e) => {
                tracing::error!(task = %task.id, error = %e, "recording task result");
                true
            }
        };
        if !recorded {
            // Already finished elsewhere (a forced model delete failed it while it ran): that path
            // published the terminal event and owes the callback, not this one.
            self.publish_snapshot(state);
            return;
        }
        let m = &state.metrics;
        match &outcome {
            Outcome::Done(hashes) => {
                m.tasks_completed.fetch_add(1, Ordering::Relaxed);
                m.task_seconds_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                let images: Vec<_> = hashes
                    .iter()
                    .map(|h| json!({"hash": h, "url": state.image_url(h)}))
                    .collect();
                state.events.publish(
                    &topic,
                    "completed",
                    json!({"task_id": task.id, "images": images}),
                    true,
                );
            }
            Outcome::Cancelled => {
                m.tasks_cancelled.fetch_add(1, Ordering::Relaxed);
                state
                    .events
                    .publish(&topic, "cancelled", json!({"task_id": task.id}), true);
            }
            Outcome::Failed(msg) => {
                tracing::warn!(task = %task.id, error = %msg, "task failed");
                m.tasks_failed.fetch_add(1, Ordering::Relaxed);
                state.events.publish(
                    &topic,
                    "failed",
                    json!({"task_id": task.id, "detail": msg}),
                    true,
                );
            }
        }
        self.publish_snapshot(state);
        spawn_callback(state, &task.id);
    }

    /// Hands the library's ready embeddings to the engine when the set changed since the last task,
    /// so their names work in prompts as in A1111 (named after the file, without extension).
    async fn sync_embeddings(&self, state: &AppState) -> Result<(), String> {
        let mut ready = state
            .repo
            .list_models(&crate::db::ModelFilter {
                model_type: Some("embedding".into()),
                status: Some("ready".into()),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("listing embeddings: {e}"))?;
        ready.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        let specs: Vec<(String, sd_engine::EmbeddingSpec)> = ready
            .into_iter()
            .filter_map(|m| {
                let path = std::path::PathBuf::from(m.path?);
                let name = path.file_stem()?.to_string_lossy().to_string();
                Some((m.sha256, sd_engine::EmbeddingSpec { path, name }))
            })
            .collect();
        let key = specs
            .iter()
            .map(|(sha, s)| format!("{sha}:{}", s.name))
            .collect::<Vec<_>>()
            .join(",");
        let current = self
            .0
            .embeddings_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if current.as_deref() == Some(key.as_str()) {
            return Ok(());
        }
        let report = state
            .engine
            .set_embeddings(specs.into_iter().map(|(_, s)| s).collect())
            .await
            .map_err(|e| format!("loading embeddings failed: {e}"))?;
        for (name, why) in &report.skipped {
            tracing::info!(embedding = %name, reason = %why, "embedding not usable with this checkpoint");
        }
        *self
            .0
            .embeddings_key
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(key);
        Ok(())
    }

    async fn execute(
        &self,
        state: &AppState,
        task: &TaskRecord,
        p: &TaskParams,
        cancel: Arc<worker::StopSignal>,
    ) -> Outcome {
        let engine = &state.engine;
        if let Err(msg) = ensure_checkpoint(state, engine, &p.model).await {
            return Outcome::Failed(msg);
        }
        if engine.state().lora_key() != task.lora_key {
            if let Err(msg) = apply_loras(state, &p.loras).await {
                return Outcome::Failed(msg);
            }
        }
        if let Err(msg) = self.sync_embeddings(state).await {
            return Outcome::Failed(msg);
        }
        if let Err(msg) = ensure_vae(state, p.vae.as_ref().map(|v| v.sha256.as_str())).await {
            return Outcome::Failed(msg);
        }
        // Reading and resizing the inputs is blocking work.
        let (dir, params, every) = (
            state.inputs_dir(),
            p.clone(),
            state.config.engine.preview_every,
        );
        let gp = match tokio::task::spawn_blocking(move || generate_params(&dir, &params, every))
            .await
        {
            Ok(Ok(gp)) => gp,
            Ok(Err(msg)) => return Outcome::Failed(msg),
            Err(e) => return Outcome::Failed(format!("preparing inputs failed: {e}")),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<sd_engine::Progress>();
        let fwd = {
            let (q, st, id) = (self.clone(), state.clone(), task.id.clone());
            tokio::spawn(async move {
                let topic = task_topic(&id);
                let mut last = Instant::now();
                while let Some(pr) = rx.recv().await {
                    st.metrics.steps_total.fetch_add(1, Ordering::Relaxed);
                    st.metrics
                        .step_seconds_micros
                        .fetch_add(last.elapsed().as_micros() as u64, Ordering::Relaxed);
                    last = Instant::now();
                    let jpeg = pr.preview.as_ref().and_then(preview_jpeg);
                    if let Some(r) = q.running_lock().as_mut() {
                        r.info.step = pr.step;
                        r.info.total_steps = pr.total_steps;
                        r.info.image_index = pr.image_index;
                        if jpeg.is_some() {
                            r.info.preview_jpeg = jpeg.clone();
                        }
                    }
                    let preview = jpeg.map(|j| {
                        format!(
                            "data:image/jpeg;base64,{}",
                            base64::engine::general_purpose::STANDARD.encode(j)
                        )
                    });
                    st.events.publish(
                        &topic,
                        "progress",
                        json!({"task_id": id, "step": pr.step, "total_steps": pr.total_steps,
                               "image_index": pr.image_index, "preview": preview}),
                        false,
                    );
                }
            })
        };
        let result = engine.generate(gp, cancel, tx).await;
        let _ = fwd.await;
        let images = match result {
            Ok(images) => images,
            Err(WorkerError::Engine(sd_engine::EngineError::Cancelled)) => {
                return Outcome::Cancelled
            }
            Err(e) => return Outcome::Failed(format!("generation failed: {e}")),
        };
        let mut hashes = Vec::with_capacity(images.len());
        for (i, rgb) in images.into_iter().enumerate() {
            let img = GeneratedImage::from_task(Some(&task.id), p, i as u32, rgb);
            match crate::images::store::store_generated(state, img).await {
                Ok(rec) => hashes.push(rec.hash),
                Err(e) => return Outcome::Failed(format!("storing image {i} failed: {e}")),
            }
        }
        Outcome::Done(hashes)
    }
}

/// Steps the sampler really runs (img2img runs only the last `strength` part).
pub fn effective_steps(p: &TaskParams) -> u32 {
    match p.strength {
        Some(s) if p.init_image.is_some() => {
            let steps = p.num_inference_steps as usize;
            (steps - sd_engine::pipeline::img2img_start(steps, s).min(steps)) as u32
        }
        _ => p.num_inference_steps,
    }
}

fn preview_jpeg(img: &sd_engine::RgbImage) -> Option<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 70)
        .write_image(
            &img.data,
            img.width,
            img.height,
            image::ExtendedColorType::Rgb8,
        )
        .ok()?;
    Some(out)
}

/// The library record of `sha256` and its file, if the model is ready; `what` names it in errors.
async fn ready_file(
    state: &AppState,
    sha256: &str,
    what: &str,
) -> Result<(crate::db::ModelRecord, std::path::PathBuf), String> {
    let m = state
        .repo
        .get_model(sha256)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{what} {sha256} is not in the library"))?;
    let path = m
        .path
        .clone()
        .filter(|_| m.status == "ready")
        .ok_or_else(|| format!("{what} {} is not ready ({})", m.name, m.status))?;
    Ok((m, path.into()))
}

/// Makes the engine decode with the VAE `sha256` (`None`: the checkpoint's own), if it does not.
pub async fn ensure_vae(state: &AppState, sha256: Option<&str>) -> Result<(), String> {
    if state.engine.state().vae.as_deref() == sha256 {
        return Ok(());
    }
    let vae = match sha256 {
        None => None,
        Some(sha) => Some((sha.to_string(), ready_file(state, sha, "VAE").await?.1)),
    };
    state
        .engine
        .set_vae(vae)
        .await
        .map_err(|e| format!("loading the VAE failed: {e}"))
}

/// Loads `sha256` unless it is already resident.
pub async fn ensure_checkpoint(
    state: &AppState,
    engine: &EngineHandle,
    sha256: &str,
) -> Result<(), String> {
    if engine
        .state()
        .checkpoint
        .as_ref()
        .is_some_and(|c| c.sha256 == sha256)
    {
        return Ok(());
    }
    let (model, path) = ready_file(state, sha256, "model").await?;
    engine
        .load(path, sha256, &model.name)
        .await
        .map(|_| ())
        .map_err(|e| format!("loading checkpoint {} failed: {e}", model.name))?;
    state
        .model_loaded
        .store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Applies a LoRA set (replacing the current one).
pub async fn apply_loras(state: &AppState, loras: &[request::ResolvedLora]) -> Result<(), String> {
    let mut specs = Vec::new();
    for l in loras {
        let (_, path) = ready_file(state, &l.sha256, "LoRA").await?;
        specs.push((
            l.sha256.clone(),
            sd_engine::LoraSpec {
                path,
                weight: l.weight,
                name: l.name.clone(),
            },
        ));
    }
    state
        .engine
        .set_loras(specs)
        .await
        .map(|_| ())
        .map_err(|e| format!("applying LoRAs failed: {e}"))
}

fn generate_params(
    inputs: &std::path::Path,
    p: &TaskParams,
    preview_every: u32,
) -> Result<sd_engine::GenerateParams, String> {
    let load_input = |sha: &str| -> Result<image::DynamicImage, String> {
        let bytes = std::fs::read(inputs.join(sha))
            .map_err(|e| format!("input image {sha} is missing: {e}"))?;
        image::load_from_memory(&bytes).map_err(|e| format!("input image {sha}: {e}"))
    };
    let init_image = match &p.init_image {
        Some(sha) => Some(request::rgb_from(&load_input(sha)?, p.width, p.height)),
        None => None,
    };
    let mask = match &p.mask {
        Some(sha) => Some(request::gray_from(&load_input(sha)?, p.width, p.height)),
        None => None,
    };
    Ok(sd_engine::GenerateParams {
        prompt: p.engine_prompt.clone(),
        negative_prompt: p.negative_prompt.clone(),
        width: p.width,
        height: p.height,
        steps: p.num_inference_steps,
        guidance_scale: p.guidance_scale,
        scheduler: p.scheduler.clone(),
        schedule_type: p.schedule_type.clone(),
        seed: p.seed,
        num_images: p.num_images,
        init_image,
        mask,
        strength: p.strength.unwrap_or(0.75),
        clip_skip: p.clip_skip,
        preview_every,
    })
}

/// POSTs the task's result to its callback URL in the background.
/// Delivers the task's result callback in the background. The row says a callback is owed
/// (`callback_due`, set with the terminal status) until it is delivered or its retries run out, so
/// one cut short by a stop or crash is sent again by [`resend_due_callbacks`] at the next start.
pub(crate) fn spawn_callback(state: &AppState, id: &str) {
    let (st, id) = (state.clone(), id.to_string());
    tokio::spawn(async move {
        let Ok(Some(task)) = st.repo.get_task(&id).await else {
            return;
        };
        let Some(url) = task.callback_url.clone() else {
            return;
        };
        let payload = crate::api::tasks::callback_payload(&st, &task);
        let r = callback::deliver(
            &url,
            &payload,
            st.config.queue.callback_retries,
            &st.config.network,
            Duration::from_millis(500),
        )
        .await;
        match r {
            Ok(n) => tracing::info!(task = %id, attempts = n, "callback delivered"),
            Err(e) => tracing::warn!(task = %id, error = %e, "callback not delivered"),
        }
        if let Err(e) = st.repo.callback_settled(&id).await {
            tracing::warn!(task = %id, error = %e, "recording the callback outcome");
        }
    });
}

/// At start: sends the callbacks that a stop or crash left owed (at-least-once delivery).
pub(crate) async fn resend_due_callbacks(state: &AppState) -> crate::db::DbResult<usize> {
    let due = state.repo.callbacks_due().await?;
    for id in &due {
        spawn_callback(state, id);
    }
    Ok(due.len())
}
