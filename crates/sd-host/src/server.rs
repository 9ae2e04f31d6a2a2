//! Starting and stopping the HTTP server.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::state::AppState;

/// A server running in the background (used by `serve` and by the integration tests).
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Graceful stop: in-flight requests finish, then the task ends.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        // Downloads keep their `.part` and `downloading` status and resume at the next start.
        self.state.downloads.shutdown();
        // SSE streams never end on their own; end them so the graceful stop does not wait.
        self.state.events.close_all();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join.await??;
        Ok(())
    }
}

/// Refuses an open, keyless server unless explicitly asked for one.
pub fn check_exposure(config: &Config, insecure_no_auth: bool) -> anyhow::Result<()> {
    if config.api.keys.is_empty() && !config.is_loopback_host() && !insecure_no_auth {
        bail!(
            "refusing to listen on non-loopback address {} without API keys; set api.keys (or --api-key), or pass --insecure-no-auth",
            config.server.host
        );
    }
    Ok(())
}

/// Binds `config.server.host:port` (port 0 = any) and serves until `stop` or the returned future ends.
pub async fn start(config: Config, insecure_no_auth: bool) -> anyhow::Result<RunningServer> {
    start_with_engine(config, insecure_no_auth, || {
        Box::new(sd_engine::pipeline::CpuEngine::new())
    })
    .await
}

/// [`start`] with another engine backend (tests use it to make the engine fail on purpose).
pub async fn start_with_engine(
    config: Config,
    insecure_no_auth: bool,
    make_engine: impl FnOnce() -> Box<dyn sd_engine::Backend> + Send + 'static,
) -> anyhow::Result<RunningServer> {
    check_exposure(&config, insecure_no_auth)?;
    let bind = format!("{}:{}", config.server.host, config.server.port);
    let listener = TcpListener::bind(&bind)
        .await
        .with_context(|| format!("binding {bind}"))?;
    let addr = listener.local_addr()?;
    let state = AppState::build_with_engine(config, addr, make_engine).await?;
    startup(&state).await?;
    let app = crate::api::router(state.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(%addr, "sd-host listening");
    Ok(RunningServer {
        addr,
        state,
        shutdown: Some(tx),
        join,
    })
}

/// Crash recovery, library scan and the dispatcher, before the first request is served.
async fn startup(state: &AppState) -> anyhow::Result<()> {
    let (requeued, failed) = state.repo.recover_interrupted(2).await?;
    if requeued + failed > 0 {
        tracing::warn!(
            requeued,
            failed,
            "recovered tasks interrupted by a stop or crash"
        );
    }
    if state.config.models.scan_on_start {
        let found = crate::models::library::scan(&state.repo, &state.config.models_dir()).await?;
        tracing::info!(models = found.len(), "model library scanned");
    }
    let resumed = crate::models::download::resume_all(&state.into()).await?;
    if resumed > 0 {
        tracing::info!(resumed, "resuming interrupted model downloads");
    }
    // Before the dispatcher starts, so a task finishing right away is not sent twice.
    let owed = crate::queue::resend_due_callbacks(state).await?;
    if owed > 0 {
        tracing::info!(
            callbacks = owed,
            "resending result callbacks owed before the last stop"
        );
    }
    state.queue.start(state.clone());
    spawn_sweeper(state, std::time::Duration::from_secs(3600));
    Ok(())
}

/// Garbage collection at start and then every `period`: image blobs without a row, task inputs no
/// active task uses. The periodic pass spares files younger than 10 minutes, which another
/// process (or a submission in flight) may be between writing and recording.
fn spawn_sweeper(state: &AppState, period: std::time::Duration) {
    let state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        let mut min_age = std::time::Duration::ZERO;
        loop {
            tick.tick().await;
            if let Err(e) = crate::images::store::sweep_orphans(&state, min_age).await {
                tracing::warn!(error = %e, "image sweep failed");
            }
            let inputs_min_age = min_age.max(std::time::Duration::from_secs(600));
            if let Err(e) = crate::queue::inputs::sweep_unused(&state, inputs_min_age).await {
                tracing::warn!(error = %e, "task input sweep failed");
            }
            min_age = std::time::Duration::from_secs(600);
        }
    });
}

/// `sd-host serve`: run until SIGINT/SIGTERM, then shut down gracefully.
pub async fn serve(config: Config, insecure_no_auth: bool) -> anyhow::Result<()> {
    // Handlers go in before the address is printed, so a SIGTERM/SIGINT sent as soon as the server
    // answers still stops it gracefully instead of killing it.
    let stop = shutdown_signal()?;
    let server = start(config, insecure_no_auth).await?;
    println!("sd-host listening on http://{}", server.addr);
    stop.await;
    tracing::info!("shutting down");
    server.stop().await
}

/// A future that resolves on SIGINT or SIGTERM (Ctrl-C elsewhere); the handlers are installed
/// when this is called, not when it is first polled.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
