//! Typed configuration: defaults → `config.yaml` → env `SDHOST__SECTION__KEY` → CLI flags.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A string that never shows up in logs, `Debug` output or `GET /api/v1/config`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub api: ApiConfig,
    pub data_dir: PathBuf,
    pub database: DatabaseConfig,
    pub storage: StorageConfig,
    pub models: ModelsConfig,
    pub civitai: CivitaiConfig,
    pub network: NetworkConfig,
    pub engine: EngineConfig,
    pub queue: QueueConfig,
    pub limits: LimitsConfig,
    pub images: ImagesConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            api: ApiConfig::default(),
            data_dir: PathBuf::from("./data"),
            database: DatabaseConfig::default(),
            storage: StorageConfig::default(),
            models: ModelsConfig::default(),
            civitai: CivitaiConfig::default(),
            network: NetworkConfig::default(),
            engine: EngineConfig::default(),
            queue: QueueConfig::default(),
            limits: LimitsConfig::default(),
            images: ImagesConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub public_url: Option<String>,
    pub cors_origins: Vec<String>,
    /// Keep-alive comment interval on idle event streams (shorter behind strict proxies).
    #[serde(with = "human_duration")]
    pub sse_keepalive: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            public_url: None,
            cors_origins: Vec::new(),
            sse_keepalive: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub keys: Vec<Secret>,
    pub key_header: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            key_header: "X-API-Key".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH`; `None` = `<data_dir>/sd-host.db`. May hold a password (postgres), so secret.
    pub url: Option<Secret>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub images: ImageStorageConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum ImageStorageConfig {
    /// Files under `<data_dir>/images` (or `path`).
    Local { path: Option<PathBuf> },
}

impl Default for ImageStorageConfig {
    fn default() -> Self {
        ImageStorageConfig::Local { path: None }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// `None` = `<data_dir>/models`.
    pub dir: Option<PathBuf>,
    pub scan_on_start: bool,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            dir: None,
            scan_on_start: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CivitaiConfig {
    pub base_url: String,
    pub token: Option<Secret>,
}

impl Default for CivitaiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://civitai.com".into(),
            token: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Allow callbacks and downloads to loopback/private/link-local addresses (tests set this).
    pub allow_private_targets: bool,
    /// Hosts exempt from that rule, as `host` (any port) or `host:port`: a LAN model mirror or a
    /// callback receiver on the NAS, without opening every internal address.
    pub allowed_private_hosts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub device: String,
    pub dtype: String,
    /// 0 = all cores.
    pub threads: usize,
    /// sha256 or file name of the checkpoint used when a task names none and none is loaded.
    pub default_checkpoint: Option<String>,
    /// Send a preview every N steps (0 = never).
    pub preview_every: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            dtype: "auto".into(),
            threads: 0,
            default_checkpoint: None,
            preview_every: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    pub max_pending: usize,
    pub smart_scheduling: bool,
    #[serde(with = "human_duration")]
    pub max_reorder_wait: Duration,
    pub callback_retries: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_pending: 1000,
            smart_scheduling: true,
            max_reorder_wait: Duration::from_secs(300),
            callback_retries: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_width: u32,
    pub max_height: u32,
    pub max_pixels: u64,
    pub max_steps: u32,
    pub max_num_images: u32,
    pub max_prompt_chars: usize,
    pub max_init_image_bytes: usize,
    pub max_body_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_width: 2048,
            max_height: 2048,
            max_pixels: 4_194_304,
            max_steps: 150,
            max_num_images: 10,
            max_prompt_chars: 10_000,
            max_init_image_bytes: 20_971_520,
            max_body_bytes: 31_457_280,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesConfig {
    /// HMAC key for share links; `None` = a random key kept in `<data_dir>/share.key`.
    pub share_secret: Option<Secret>,
    #[serde(with = "human_duration")]
    pub share_ttl: Duration,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            share_secret: None,
            share_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Overrides given on the command line (highest precedence).
#[derive(Debug, Clone, Default)]
pub struct CliOverrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub data_dir: Option<PathBuf>,
    pub api_keys: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("environment variable {var}: {msg}")]
    Env { var: String, msg: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the layered configuration. `file` falls back to `$SDHOST_CONFIG`, then to
    /// `./config.yaml` if it exists.
    pub fn load(file: Option<&Path>, cli: &CliOverrides) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env, cli)
    }

    pub fn load_from(
        file: Option<&Path>,
        env: &[(String, String)],
        cli: &CliOverrides,
    ) -> Result<Config, ConfigError> {
        let explicit = file.map(Path::to_path_buf).or_else(|| {
            env.iter()
                .find(|(k, _)| k == "SDHOST_CONFIG")
                .map(|(_, v)| PathBuf::from(v))
        });
        let path = explicit.clone().or_else(|| {
            let p = PathBuf::from("config.yaml");
            p.exists().then_some(p)
        });
        let mut tree = serde_json::Value::Object(Default::default());
        if let Some(path) = &path {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let yaml: serde_yaml::Value =
                serde_yaml::from_str(&text).map_err(|source| ConfigError::Yaml {
                    path: path.clone(),
                    source,
                })?;
            if !yaml.is_null() {
                tree = serde_json::to_value(yaml).map_err(|e| ConfigError::Yaml {
                    path: path.clone(),
                    source: serde::de::Error::custom(e.to_string()),
                })?;
            }
        }
        for (var, value) in env {
            let Some(rest) = var.strip_prefix("SDHOST__") else {
                continue;
            };
            let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
            if keys.iter().any(String::is_empty) {
                return Err(ConfigError::Env {
                    var: var.clone(),
                    msg: "empty key segment".into(),
                });
            }
            // Values are parsed as YAML scalars/flow collections so `true`, `8001` and `[a, b]` work.
            let parsed: serde_yaml::Value =
                serde_yaml::from_str(value).unwrap_or(serde_yaml::Value::String(value.clone()));
            let parsed = serde_json::to_value(parsed).map_err(|e| ConfigError::Env {
                var: var.clone(),
                msg: e.to_string(),
            })?;
            set_path(&mut tree, &keys, parsed).map_err(|msg| ConfigError::Env {
                var: var.clone(),
                msg,
            })?;
        }
        let mut config: Config = serde_path_to_error::deserialize(tree)
            .map_err(|e| ConfigError::Invalid(format!("{}: {}", e.path(), e.inner())))?;
        if let Some(h) = &cli.host {
            config.server.host = h.clone();
        }
        if let Some(p) = cli.port {
            config.server.port = p;
        }
        if let Some(d) = &cli.data_dir {
            config.data_dir = d.clone();
        }
        config
            .api
            .keys
            .extend(cli.api_keys.iter().map(|k| Secret(k.clone())));
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.api.key_header.trim().is_empty()
            || axum::http::HeaderName::from_bytes(self.api.key_header.as_bytes()).is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "api.key_header {:?} is not a valid header name",
                self.api.key_header
            )));
        }
        if self.api.keys.iter().any(|k| k.0.is_empty()) {
            return Err(ConfigError::Invalid(
                "api.keys contains an empty key".into(),
            ));
        }
        if self.limits.max_num_images == 0 || self.limits.max_steps == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_num_images and limits.max_steps must be positive".into(),
            ));
        }
        Ok(())
    }

    pub fn database_url(&self) -> String {
        match &self.database.url {
            Some(u) => u.0.clone(),
            None => format!("sqlite://{}", self.data_dir.join("sd-host.db").display()),
        }
    }

    pub fn models_dir(&self) -> PathBuf {
        self.models
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("models"))
    }

    pub fn images_dir(&self) -> PathBuf {
        match &self.storage.images {
            ImageStorageConfig::Local { path: Some(p) } => p.clone(),
            ImageStorageConfig::Local { path: None } => self.data_dir.join("images"),
        }
    }

    /// True when the configured host only accepts connections from this machine.
    pub fn is_loopback_host(&self) -> bool {
        let h = self.server.host.trim_matches(|c| c == '[' || c == ']');
        h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// The config as JSON with every secret replaced.
    pub fn redacted_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

fn set_path(
    tree: &mut serde_json::Value,
    keys: &[String],
    value: serde_json::Value,
) -> Result<(), String> {
    let mut node = tree;
    for (i, key) in keys.iter().enumerate() {
        let obj = node
            .as_object_mut()
            .ok_or_else(|| format!("{} is not a section", keys[..i].join(".")))?;
        if i + 1 == keys.len() {
            obj.insert(key.clone(), value);
            return Ok(());
        }
        node = obj
            .entry(key.clone())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
    }
    Ok(())
}

/// Durations written as `300s`, `5m`, `2h`, `150ms` or a plain number of seconds.
pub mod human_duration {
    use super::*;

    pub fn parse(s: &str) -> Option<Duration> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (num, unit) = s.split_at(split);
        let n: f64 = num.parse().ok()?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return None,
        };
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs_f64()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) if n.is_finite() && n >= 0.0 => Ok(Duration::from_secs_f64(n)),
            Raw::Secs(n) => Err(serde::de::Error::custom(format!("invalid duration {n}"))),
            Raw::Text(t) => parse(&t).ok_or_else(|| {
                serde::de::Error::custom(format!("invalid duration {t:?} (use e.g. 300s, 5m)"))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_the_embedded_loopback_setup() {
        let cfg = Config::load_from(None, &[], &CliOverrides::default()).unwrap();
        assert_eq!(
            (cfg.server.host.as_str(), cfg.server.port),
            ("127.0.0.1", 8000)
        );
        assert_eq!(cfg.data_dir, std::path::PathBuf::from("./data"));
        assert!(cfg.api.keys.is_empty() && cfg.is_loopback_host());
        assert!(!cfg.network.allow_private_targets);
        assert!(cfg.network.allowed_private_hosts.is_empty());
    }

    #[test]
    fn layering_file_then_env_then_cli() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.yaml");
        std::fs::write(
            &file,
            "server: { port: 9000, host: 0.0.0.0 }\napi: { keys: [file-key] }\nqueue: { max_reorder_wait: 5m }\n",
        )
        .unwrap();
        let cfg = Config::load_from(
            Some(&file),
            &env(&[
                ("SDHOST__SERVER__PORT", "9100"),
                ("SDHOST__NETWORK__ALLOW_PRIVATE_TARGETS", "true"),
            ]),
            &CliOverrides {
                host: Some("127.0.0.1".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.server.port, 9100);
        assert_eq!(cfg.server.host, "127.0.0.1");
        assert!(cfg.network.allow_private_targets);
        assert_eq!(cfg.queue.max_reorder_wait, Duration::from_secs(300));
        assert_eq!(cfg.api.keys[0].expose(), "file-key");
        let cli = Config::load_from(
            Some(&file),
            &[],
            &CliOverrides {
                port: Some(1234),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cli.server.port, 1234);
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_json() {
        let cfg = Config::load_from(
            None,
            &env(&[("SDHOST__CIVITAI__TOKEN", "tok-123")]),
            &CliOverrides {
                api_keys: vec!["sekrit".into()],
                ..Default::default()
            },
        )
        .unwrap();
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("sekrit") && !dbg.contains("tok-123"));
        let json = cfg.redacted_json().to_string();
        assert!(!json.contains("sekrit") && !json.contains("tok-123"));
        assert_eq!(cfg.civitai.token.as_ref().unwrap().expose(), "tok-123");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let bad = Config::load_from(
            None,
            &env(&[("SDHOST__SERVER__PROT", "1")]),
            &Default::default(),
        );
        assert!(matches!(bad, Err(ConfigError::Invalid(m)) if m.contains("prot")));
        let bad = Config::load_from(
            None,
            &env(&[("SDHOST__SERVER__PORT", "x")]),
            &Default::default(),
        );
        assert!(bad.is_err());
    }

    #[test]
    fn loopback_detection() {
        let mut c = Config::default();
        for (h, want) in [
            ("127.0.0.1", true),
            ("localhost", true),
            ("::1", true),
            ("0.0.0.0", false),
            ("192.168.1.2", false),
        ] {
            c.server.host = h.into();
            assert_eq!(c.is_loopback_host(), want, "{h}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            human_duration::parse("300s"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(human_duration::parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(
            human_duration::parse("150ms"),
            Some(Duration::from_millis(150))
        );
        assert_eq!(human_duration::parse("abc"), None);
    }
}
