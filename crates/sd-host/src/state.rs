//! Shared application state handed to every handler.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::db::DynRepo;
use crate::events::EventHub;
use crate::images::share::ShareSigner;
use crate::metrics::Metrics;
use crate::queue::worker::EngineHandle;
use crate::queue::QueueHandle;
use crate::storage::BlobStore;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub repo: DynRepo,
    pub blobs: BlobStore,
    pub metrics: Arc<Metrics>,
    pub share: ShareSigner,
    pub started: Instant,
    /// Set by the engine worker while a checkpoint is resident (for `/health`).
    pub model_loaded: Arc<AtomicBool>,
    /// Hashes of the configured API keys, compared in constant time.
    pub key_digests: Arc<Vec<[u8; 32]>>,
    /// The engine thread.
    pub engine: EngineHandle,
    pub queue: QueueHandle,
    pub events: EventHub,
    /// Model downloads running in this process (one per sha256).
    pub downloads: crate::models::download::Downloads,
    /// `server.public_url`, or `http://<bound address>`: prefix of absolute URLs (callbacks).
    pub base_url: Arc<String>,
}

impl AppState {
    pub async fn build(config: Config, bound: std::net::SocketAddr) -> anyhow::Result<AppState> {
        Self::build_with_engine(config, bound, || {
            Box::new(sd_engine::pipeline::CpuEngine::new())
        })
        .await
    }

    /// Like [`AppState::build`], with the engine `make_engine` builds on the engine thread (tests
    /// wrap the real engine to inject faults).
    pub async fn build_with_engine(
        config: Config,
        bound: std::net::SocketAddr,
        make_engine: impl FnOnce() -> Box<dyn sd_engine::Backend> + Send + 'static,
    ) -> anyhow::Result<AppState> {
        std::fs::create_dir_all(&config.data_dir)?;
        std::fs::create_dir_all(config.models_dir())?;
        let repo = crate::db::connect(&config.database_url()).await?;
        let blobs = BlobStore::local(&config.images_dir())?;
        let share = match &config.images.share_secret {
            Some(s) => ShareSigner::new(s.expose().as_bytes().to_vec()),
            None => ShareSigner::load_or_create(&config.data_dir.join("share.key"))?,
        };
        let key_digests = config
            .api
            .keys
            .iter()
            .map(|k| crate::api::auth::digest(k.expose().as_bytes()))
            .collect();
        let engine = EngineHandle::spawn(make_engine);
        let base_url = config
            .server
            .public_url
            .clone()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| format!("http://{bound}"));
        // A zero interval would spin; 100 ms is the floor.
        let keep_alive = config
            .server
            .sse_keepalive
            .max(std::time::Duration::from_millis(100));
        Ok(AppState {
            config: Arc::new(config),
            repo,
            blobs,
            metrics: Arc::new(Metrics::default()),
            share,
            started: Instant::now(),
            model_loaded: Arc::new(AtomicBool::new(false)),
            key_digests: Arc::new(key_digests),
            engine,
            queue: QueueHandle::new(),
            events: EventHub::default().with_keep_alive(keep_alive),
            downloads: Default::default(),
            base_url: Arc::new(base_url),
        })
    }
}

impl AppState {
    /// Where uploaded img2img sources and masks are kept (named by their sha256).
    pub fn inputs_dir(&self) -> std::path::PathBuf {
        self.config.data_dir.join("inputs")
    }

    /// Absolute URL of a stored image.
    pub fn image_url(&self, hash: &str) -> String {
        format!("{}/api/v1/images/{hash}", self.base_url)
    }
}
