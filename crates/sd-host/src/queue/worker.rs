//! The engine on its own OS thread. The async side holds an [`EngineHandle`] (a channel sender) and
//! gets replies on oneshot channels; the thread owns the only `Backend`, so nothing is shared.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use sd_engine::{
    Backend, CheckpointInfo, Control, EmbeddingReport, EmbeddingSpec, GenerateParams, LoraReport,
    LoraSpec, Progress, RgbImage,
};
use tokio::sync::{mpsc, oneshot, watch};

/// How the async side stops a running generation: the whole call, or one image of it.
/// Checked by the engine thread between steps.
#[derive(Debug, Default)]
pub struct StopSignal {
    state: AtomicU8,
    /// The image a skip is meant for; a skip that arrives as that image ends is dropped (as in
    /// A1111) rather than cutting the next image short.
    skip_index: AtomicU32,
}

const RUN: u8 = 0;
const CANCEL: u8 = 1;
const SKIP_IMAGE: u8 = 2;
const FINISH: u8 = 3;

impl StopSignal {
    pub fn new(cancelled: bool) -> Self {
        Self {
            state: AtomicU8::new(if cancelled { CANCEL } else { RUN }),
            skip_index: AtomicU32::new(0),
        }
    }

    pub fn cancel(&self) {
        self.state.store(CANCEL, Ordering::SeqCst);
    }

    /// Ends the run early, keeping the images done and the one in progress as it stands
    /// (A1111's interrupt); a cancel already asked for stays.
    pub fn finish(&self) {
        let _ = self
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                (s != CANCEL).then_some(FINISH)
            });
    }

    /// Cuts image `index` short; a cancel or finish already asked for stays.
    pub fn skip_image(&self, index: u32) {
        self.skip_index.store(index, Ordering::SeqCst);
        let _ = self
            .state
            .compare_exchange(RUN, SKIP_IMAGE, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The engine's answer after a step of image `index`; a skip is used up by that image.
    fn control(&self, index: u32) -> Control {
        match self
            .state
            .compare_exchange(SKIP_IMAGE, RUN, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) if self.skip_index.load(Ordering::SeqCst) == index => Control::SkipImage,
            Ok(_) | Err(RUN) => Control::Continue,
            Err(FINISH) => Control::Finish,
            Err(_) => Control::Cancel,
        }
    }
}

/// What is resident in the engine, published on a `watch` for status routes and the scheduler.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineState {
    pub checkpoint: Option<LoadedCheckpoint>,
    /// (sha256, name, weight) of the applied LoRA set, in order.
    pub loras: Vec<(String, String, f32)>,
    /// sha256 of the standalone VAE in use (`None`: the checkpoint's own).
    pub vae: Option<String>,
    pub busy: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoadedCheckpoint {
    pub sha256: String,
    pub name: String,
    pub family: String,
    pub inpaint: bool,
}

impl EngineState {
    /// Canonical LoRA-set key (what smart scheduling compares).
    pub fn lora_key(&self) -> String {
        lora_key(self.loras.iter().map(|(s, _, w)| (s.as_str(), *w)))
    }
}

/// Stands for "not known" in [`EngineState::loras`] after a failed LoRA change; no task's LoRA
/// key contains it.
const UNKNOWN_LORAS: &str = "unknown";

/// `sha:weight` joined by commas; weight-0 entries change nothing and are left out.
pub fn lora_key<'a>(loras: impl Iterator<Item = (&'a str, f32)>) -> String {
    loras
        .filter(|(_, w)| *w != 0.0)
        .map(|(s, w)| format!("{s}:{w}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Engine(#[from] sd_engine::EngineError),
    #[error("engine panicked: {0}")]
    Panic(String),
    #[error("engine thread is gone")]
    Gone,
}

pub type WorkerResult<T> = Result<T, WorkerError>;

enum Cmd {
    Load {
        path: PathBuf,
        sha256: String,
        name: String,
        reply: oneshot::Sender<WorkerResult<CheckpointInfo>>,
    },
    Unload {
        reply: oneshot::Sender<()>,
    },
    SetLoras {
        specs: Vec<(String, LoraSpec)>,
        reply: oneshot::Sender<WorkerResult<LoraReport>>,
    },
    SetVae {
        /// (sha256, file); `None`: back to the checkpoint's own VAE.
        vae: Option<(String, PathBuf)>,
        reply: oneshot::Sender<WorkerResult<()>>,
    },
    SetEmbeddings {
        specs: Vec<EmbeddingSpec>,
        reply: oneshot::Sender<WorkerResult<EmbeddingReport>>,
    },
    Generate {
        params: Box<GenerateParams>,
        cancel: Arc<StopSignal>,
        progress: mpsc::UnboundedSender<Progress>,
        reply: oneshot::Sender<WorkerResult<Vec<RgbImage>>>,
    },
}

/// Cheap to clone; every call is one message to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std::sync::mpsc::Sender<Cmd>,
    state: watch::Receiver<EngineState>,
    /// How many checkpoint loads the engine has done (smart-scheduling tests and metrics).
    pub loads: Arc<AtomicU64>,
}

impl EngineHandle {
    /// Starts the engine thread with the backend `make` builds (on that thread).
    pub fn spawn<F>(make: F) -> EngineHandle
    where
        F: FnOnce() -> Box<dyn Backend> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel::<Cmd>();
        let (state_tx, state_rx) = watch::channel(EngineState::default());
        let loads = Arc::new(AtomicU64::new(0));
        let loads2 = loads.clone();
        std::thread::Builder::new()
            .name("sd-engine".into())
            .spawn(move || run(make(), rx, state_tx, loads2))
            .expect("spawn engine thread");
        EngineHandle {
            tx,
            state: state_rx,
            loads,
        }
    }

    pub fn state(&self) -> EngineState {
        self.state.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<EngineState> {
        self.state.clone()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Cmd,
    ) -> Result<T, WorkerError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| WorkerError::Gone)?;
        rx.await.map_err(|_| WorkerError::Gone)
    }

    pub async fn load(
        &self,
        path: PathBuf,
        sha256: &str,
        name: &str,
    ) -> WorkerResult<CheckpointInfo> {
        let (sha256, name) = (sha256.to_string(), name.to_string());
        self.call(|reply| Cmd::Load {
            path,
            sha256,
            name,
            reply,
        })
        .await?
    }

    pub async fn unload(&self) -> WorkerResult<()> {
        self.call(|reply| Cmd::Unload { reply }).await
    }

    /// `specs`: (sha256, spec) in application order.
    pub async fn set_loras(&self, specs: Vec<(String, LoraSpec)>) -> WorkerResult<LoraReport> {
        self.call(|reply| Cmd::SetLoras { specs, reply }).await?
    }

    /// Decodes with the VAE file `vae` (sha256, path) from now on; `None`: the checkpoint's own.
    pub async fn set_vae(&self, vae: Option<(String, PathBuf)>) -> WorkerResult<()> {
        self.call(|reply| Cmd::SetVae { vae, reply }).await?
    }

    pub async fn set_embeddings(&self, specs: Vec<EmbeddingSpec>) -> WorkerResult<EmbeddingReport> {
        self.call(|reply| Cmd::SetEmbeddings { specs, reply })
            .await?
    }

    /// Runs one generation; progress arrives on `progress` (never blocks the engine).
    pub async fn generate(
        &self,
        params: GenerateParams,
        cancel: Arc<StopSignal>,
        progress: mpsc::UnboundedSender<Progress>,
    ) -> WorkerResult<Vec<RgbImage>> {
        self.call(|reply| Cmd::Generate {
            params: Box::new(params),
            cancel,
            progress,
            reply,
        })
        .await?
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Frees the resident model and says so on the state `watch`.
fn drop_model(engine: &mut dyn Backend, state: &watch::Sender<EngineState>) {
    engine.unload();
    state.send_modify(|s| {
        s.checkpoint = None;
        s.loras.clear();
        s.vae = None;
    });
}

fn run(
    mut engine: Box<dyn Backend>,
    rx: std::sync::mpsc::Receiver<Cmd>,
    state: watch::Sender<EngineState>,
    loads: Arc<AtomicU64>,
) {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Cmd::Load {
                path,
                sha256,
                name,
                reply,
            } => {
                state.send_modify(|s| {
                    s.busy = true;
                    s.checkpoint = None;
                    s.loras.clear();
                    s.vae = None;
                });
                let r = catch_unwind(AssertUnwindSafe(|| engine.load_checkpoint(&path)));
                let r = match r {
                    Ok(Ok(info)) => {
                        loads.fetch_add(1, Ordering::Relaxed);
                        state.send_modify(|s| {
                            s.checkpoint = Some(LoadedCheckpoint {
                                sha256,
                                name,
                                family: info.family.as_str().into(),
                                inpaint: info.inpaint,
                            })
                        });
                        Ok(info)
                    }
                    Ok(Err(e)) => Err(WorkerError::Engine(e)),
                    Err(p) => {
                        engine.unload();
                        Err(WorkerError::Panic(panic_text(p)))
                    }
                };
                state.send_modify(|s| s.busy = false);
                let _ = reply.send(r);
            }
            Cmd::Unload { reply } => {
                drop_model(engine.as_mut(), &state);
                let _ = reply.send(());
            }
            Cmd::SetLoras { specs, reply } => {
                let plain: Vec<LoraSpec> = specs.iter().map(|(_, s)| s.clone()).collect();
                let r = match catch_unwind(AssertUnwindSafe(|| engine.set_loras(&plain))) {
                    Ok(Ok(rep)) => {
                        state.send_modify(|s| {
                            s.loras = specs
                                .iter()
                                .map(|(sha, sp)| (sha.clone(), sp.name.clone(), sp.weight))
                                .collect()
                        });
                        Ok(rep)
                    }
                    // A failed rebuild may leave any LoRA set (or, reloaded pristine, none and
                    // the checkpoint's own VAE): record a set no task asks for, so the next task
                    // applies its own.
                    Ok(Err(e)) => {
                        state.send_modify(|s| {
                            s.loras = vec![(UNKNOWN_LORAS.into(), String::new(), 1.0)];
                            if engine.vae().is_none() {
                                s.vae = None;
                            }
                        });
                        Err(WorkerError::Engine(e))
                    }
                    Err(p) => {
                        drop_model(engine.as_mut(), &state);
                        Err(WorkerError::Panic(panic_text(p)))
                    }
                };
                let _ = reply.send(r);
            }
            Cmd::SetVae { vae, reply } => {
                let path = vae.as_ref().map(|(_, p)| p.as_path());
                let r = match catch_unwind(AssertUnwindSafe(|| engine.set_vae(path))) {
                    Ok(Ok(())) => {
                        state.send_modify(|s| s.vae = vae.map(|(sha, _)| sha));
                        Ok(())
                    }
                    Ok(Err(e)) => Err(WorkerError::Engine(e)),
                    Err(p) => {
                        drop_model(engine.as_mut(), &state);
                        Err(WorkerError::Panic(panic_text(p)))
                    }
                };
                let _ = reply.send(r);
            }
            Cmd::SetEmbeddings { specs, reply } => {
                let r = catch_unwind(AssertUnwindSafe(|| engine.set_embeddings(&specs)))
                    .map_err(|p| WorkerError::Panic(panic_text(p)))
                    .and_then(|r| r.map_err(WorkerError::Engine));
                let _ = reply.send(r);
            }
            Cmd::Generate {
                params,
                cancel,
                progress,
                reply,
            } => {
                state.send_modify(|s| s.busy = true);
                let mut on_step = |p: &Progress| {
                    let _ = progress.send(p.clone());
                    cancel.control(p.image_index)
                };
                let r =
                    match catch_unwind(AssertUnwindSafe(|| engine.generate(&params, &mut on_step)))
                    {
                        Ok(r) => r.map_err(WorkerError::Engine),
                        Err(p) => {
                            // The model may be half-updated; drop it so the next task reloads it clean.
                            drop_model(engine.as_mut(), &state);
                            Err(WorkerError::Panic(panic_text(p)))
                        }
                    };
                state.send_modify(|s| s.busy = false);
                let _ = reply.send(r);
            }
        }
    }
}

#[cfg(test)]
mod stop_tests {
    use super::*;

    #[test]
    fn a_skip_stops_its_own_image_once_and_cancel_wins() {
        let s = StopSignal::new(false);
        assert_eq!(s.control(0), Control::Continue);
        s.skip_image(1);
        assert_eq!(s.control(1), Control::SkipImage);
        assert_eq!(s.control(2), Control::Continue, "used up");
        s.skip_image(2);
        assert_eq!(s.control(3), Control::Continue, "image 2 had already ended");
        assert_eq!(s.control(3), Control::Continue);
        s.cancel();
        s.skip_image(3);
        assert_eq!(s.control(3), Control::Cancel);
        assert_eq!(StopSignal::new(true).control(0), Control::Cancel);
        let f = StopSignal::new(false);
        f.skip_image(0);
        f.finish();
        assert_eq!(
            f.control(0),
            Control::Finish,
            "finish replaces a pending skip"
        );
        assert_eq!(f.control(1), Control::Finish, "and stays");
        f.skip_image(1);
        assert_eq!(f.control(1), Control::Finish);
        f.cancel();
        assert_eq!(f.control(1), Control::Cancel, "cancel wins over finish");
        f.finish();
        assert_eq!(f.control(1), Control::Cancel);
    }
}
