//! `sd-host models list | scan | add-civitai | lookup | delete`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::Config;
use crate::db::TaskStatus;

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// List the models in the library.
    List,
    /// Register files dropped into models.dir.
    Scan,
    /// Download a model from Civitai: a version id, a model/version page URL, a download URL or an AIR.
    AddCivitai {
        /// `130072`, `https://civitai.com/models/4201?modelVersionId=130072`, `urn:air:...`
        reference: String,
        /// A specific file of the version (default: the primary SafeTensor file).
        #[arg(long)]
        file_id: Option<u64>,
    },
    /// Look a model already in the library up on Civitai by its SHA-256 and keep its metadata
    /// (model and version id, base model, trained words, AIR).
    Lookup { sha256: String },
    /// Delete a model's file and record.
    Delete {
        sha256: String,
        /// Delete even if pending tasks use it (they fail with a reason).
        #[arg(long)]
        force: bool,
    },
}

fn bar(total: u64, msg: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

pub fn run(config: Config, cmd: ModelsCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        std::fs::create_dir_all(&config.data_dir)?;
        std::fs::create_dir_all(config.models_dir())?;
        let repo = crate::db::connect(&config.database_url()).await?;
        match cmd {
            ModelsCommand::Scan => {
                let pb = bar(0, "hashing");
                let pb2 = pb.clone();
                let (found, report) =
                    super::library::scan_with(&repo, &config.models_dir(), move |p| {
                        pb2.set_length(p.total_bytes);
                        pb2.set_position(p.hashed_bytes);
                        pb2.set_message(format!("hashing {}/{}", p.index, p.files));
                    })
                    .await?;
                pb.finish_and_clear();
                println!("{} models ({} hashed)", found.len(), report.hashed);
            }
            ModelsCommand::List => {
                for m in repo.list_models(&Default::default()).await? {
                    println!(
                        "{}  {:<10} {:<7} {:<11} {}",
                        m.sha256, m.model_type, m.family, m.status, m.filename
                    );
                }
            }
            ModelsCommand::AddCivitai { reference, file_id } => {
                add_civitai(config, repo, &reference, file_id).await?;
            }
            ModelsCommand::Lookup { sha256 } => {
                lookup(config, repo, &sha256).await?;
            }
            ModelsCommand::Delete { sha256, force } => {
                delete(&config, &repo, &sha256, force).await?;
            }
        }
        Ok(())
    })
}

fn ctx(config: Config, repo: crate::db::DynRepo) -> super::download::Ctx {
    super::download::Ctx {
        config: Arc::new(config),
        repo,
        events: Default::default(),
        metrics: Default::default(),
        downloads: Default::default(),
    }
}

async fn lookup(config: Config, repo: crate::db::DynRepo, sha: &str) -> anyhow::Result<()> {
    let sha = sha.trim().to_ascii_lowercase();
    if !crate::api::extract::is_sha256_hex(&sha) {
        bail!("{sha:?} is not a SHA-256 (64 hex digits)");
    }
    let rec = super::civitai_lookup(&ctx(config, repo), &sha).await?;
    let c = rec
        .source
        .as_ref()
        .and_then(|s| s.get("civitai"))
        .cloned()
        .unwrap_or_default();
    let s = |k: &str| c[k].as_str().unwrap_or("-").to_string();
    println!(
        "{sha}  {} ({}), base model {}, {}",
        s("name"),
        s("version_name"),
        s("base_model"),
        s("air")
    );
    let words: Vec<&str> = c["trained_words"]
        .as_array()
        .map(|a| a.iter().filter_map(|w| w.as_str()).collect())
        .unwrap_or_default();
    if !words.is_empty() {
        println!("trained words: {}", words.join(", "));
    }
    Ok(())
}

async fn add_civitai(
    config: Config,
    repo: crate::db::DynRepo,
    reference: &str,
    file_id: Option<u64>,
) -> anyhow::Result<()> {
    let r = reference.trim();
    let mut req = super::AddFromCivitai {
        file_id,
        ..Default::default()
    };
    if let Ok(v) = r.parse::<u64>() {
        req.model_version_id = Some(v);
    } else if r.to_ascii_lowercase().starts_with("urn:air:") {
        req.air = Some(r.to_string());
    } else {
        req.url = Some(r.to_string());
    }
    let ctx = ctx(config, repo);
    let added = super::add_from_civitai(&ctx, &req).await?;
    let sha = added.record.sha256.clone();
    if added.already_ready {
        println!("{sha}  already in the library ({})", added.record.filename);
        return Ok(());
    }
    let pb = bar(added.record.size_bytes.max(0) as u64, &added.record.name);
    while ctx.downloads.is_running(&sha) {
        if let Some(p) = ctx.downloads.progress(&sha) {
            if let Some(t) = p["total_bytes"].as_u64() {
                pb.set_length(t);
            }
            pb.set_position(p["downloaded_bytes"].as_u64().unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pb.finish_and_clear();
    let rec = ctx
        .repo
        .get_model(&sha)
        .await?
        .context("model record disappeared")?;
    if rec.status != "ready" {
        bail!(
            "download of {sha} failed: {}",
            rec.error.unwrap_or_else(|| rec.status.clone())
        );
    }
    println!("{sha}  {}  {}", rec.model_type, rec.filename);
    Ok(())
}

async fn delete(
    _config: &Config,
    repo: &crate::db::DynRepo,
    sha: &str,
    force: bool,
) -> anyhow::Result<()> {
    if !crate::api::extract::is_sha256_hex(sha) {
        bail!("{sha:?} is not a SHA-256 (64 lowercase hex)");
    }
    let m = repo
        .get_model(sha)
        .await?
        .with_context(|| format!("model {sha} not found"))?;
    let active = repo.active_tasks_for_model(sha).await?;
    if !active.is_empty() && !force {
        bail!(
            "{} pending task(s) use {}; pass --force to delete anyway (they will fail)",
            active.len(),
            m.name
        );
    }
    let reason = format!("model {} ({sha}) was deleted", m.name);
    for id in &active {
        repo.finish_task(id, TaskStatus::Failed, &[], Some(&reason))
            .await?;
    }
    if let Some(p) = &m.path {
        let p = std::path::PathBuf::from(p);
        for f in [p.clone(), super::download::part_path(&p)] {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", f.display())),
            }
        }
    }
    repo.delete_model(sha).await?;
    println!("deleted {sha} ({})", m.filename);
    Ok(())
}
