//! Shared helpers for integration tests: a real server on 127.0.0.1:0 with its own data dir.
#![allow(dead_code)]

use sd_host::config::{CliOverrides, Config};
use sd_host::server::RunningServer;

pub struct TestServer {
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, tweak).await
    }

    /// Starts on an existing data dir (restart tests).
    pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_in_with_engine(dir, tweak, || {
            Box::new(sd_engine::pipeline::CpuEngine::new())
        })
        .await
    }

    /// [`TestServer::start_in`] with another engine backend (fault injection).
    pub async fn start_in_with_engine(
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
        make_engine: impl FnOnce() -> Box<dyn sd_engine::Backend> + Send + 'static,
    ) -> TestServer {
        let mut cfg = Config::load_from(None, &[], &CliOverrides::default()).expect("config");
        cfg.server.port = 0;
        cfg.data_dir = dir.path().join("data");
        cfg.network.allow_private_targets = true;
        tweak(&mut cfg);
        let server = sd_host::server::start_with_engine(cfg, false, make_engine)
            .await
            .expect("server starts");
        TestServer {
            server,
            dir,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.get(path).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }
}
