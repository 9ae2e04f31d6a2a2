//! `sd-host generate`, `sd-host dev ...` and `sd-host bench`: the engine without the server.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use sd_engine::{Backend, Control};

use crate::config::{CliOverrides, Config};
use crate::images::store::{encode_image, GeneratedImage};
use crate::queue::request::{self, ResolvedLora, TaskParams};

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[arg(long, env = "SDHOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Checkpoint file, or the sha256 of one in the library.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long)]
    pub width: Option<u32>,
    #[arg(long)]
    pub height: Option<u32>,
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    #[arg(long, default_value_t = 7.0)]
    pub cfg: f64,
    #[arg(long, default_value = "DPM++ 2M")]
    pub scheduler: String,
    #[arg(long)]
    pub schedule_type: Option<String>,
    /// Default: random.
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub num_images: u32,
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    #[arg(long, default_value_t = 0.75)]
    pub strength: f64,
    #[arg(long)]
    pub mask: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub clip_skip: u32,
    /// `PATH_OR_SHA:WEIGHT`, repeatable.
    #[arg(long = "lora")]
    pub loras: Vec<String>,
    /// A standalone VAE file (path or library sha256) to decode with instead of the checkpoint's.
    #[arg(long)]
    pub vae: Option<String>,
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
}

#[derive(clap::Subcommand)]
pub enum DevCommand {
    /// Write a small random-weight checkpoint in the real single-file layout.
    TinyCheckpoint {
        #[arg(long, value_parser = ["sd1", "sd2", "sdxl"])]
        family: String,
        #[arg(long)]
        inpaint: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Write a small random LoRA matching a tiny checkpoint's layers.
    TinyLora {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, default_value = "lora", value_parser = ["lora", "loha", "lokr"])]
        kind: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "sd1", value_parser = ["sd1", "sd2", "sdxl"])]
    pub family: String,
    #[arg(long, default_value = "full", value_parser = ["full", "tiny"])]
    pub size: String,
    #[arg(long, default_value_t = 256)]
    pub res: u32,
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    /// Timed UNet steps after one warm-up step.
    #[arg(long, default_value_t = 3)]
    pub iters: u32,
    /// Measure this checkpoint instead of random weights.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long)]
    pub no_vae_warmup: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn family(s: &str) -> anyhow::Result<sd_engine::Family> {
    Ok(match s {
        "sd1" => sd_engine::Family::Sd1,
        "sd2" => sd_engine::Family::Sd2,
        "sdxl" => sd_engine::Family::Sdxl,
        other => bail!("unknown family {other:?} (sd1, sd2, sdxl)"),
    })
}

pub fn dev(cmd: DevCommand) -> anyhow::Result<()> {
    match cmd {
        DevCommand::TinyCheckpoint {
            family: f,
            inpaint,
            seed,
            output,
        } => {
            sd_engine::tiny::write_tiny_checkpoint(family(&f)?, inpaint, seed, &output)?;
            println!("{}", output.display());
        }
        DevCommand::TinyLora {
            checkpoint,
            kind,
            seed,
            output,
        } => {
            let kind = sd_engine::lora::LoraKind::parse(&kind)
                .ok_or_else(|| anyhow!("unknown LoRA kind {kind:?}"))?;
            sd_engine::tiny::write_tiny_lora(&checkpoint, kind, seed, &output)?;
            println!("{}", output.display());
        }
    }
    Ok(())
}

pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let opts = sd_engine::bench::BenchOptions {
        family: family(&a.family)?,
        size: sd_engine::bench::BenchSize::parse(&a.size)?,
        res: a.res,
        steps: a.steps,
        unet_iters: a.iters,
        checkpoint: a.checkpoint,
        vae_warmup: !a.no_vae_warmup,
    };
    let report = sd_engine::bench::run(&opts, &mut |line| eprintln!("[bench] {line}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// A checkpoint or LoRA given as a path, or as a sha256 looked up in the configured library.
fn resolve_file(config: &Config, s: &str) -> anyhow::Result<(PathBuf, String)> {
    let p = Path::new(s);
    if p.exists() {
        let sha = crate::models::library::hash_file(p)?;
        return Ok((p.to_path_buf(), sha));
    }
    if crate::api::extract::is_sha256_hex(s) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let rec = rt.block_on(async {
            let repo = crate::db::connect(&config.database_url()).await?;
            anyhow::Ok(repo.get_model(s).await?)
        })?;
        if let Some(path) = rec.and_then(|r| r.path) {
            return Ok((PathBuf::from(path), s.to_string()));
        }
        bail!(
            "no model {s} in the library at {}",
            config.data_dir.display()
        );
    }
    bail!("{s}: no such file")
}

fn name_of(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

pub fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let config = Config::load(a.config.as_deref(), &CliOverrides::default())?;
    let (model_path, model_sha) = resolve_file(&config, &a.model)?;
    let limits = &config.limits;
    let load_image = |p: &Path, field: &str| -> anyhow::Result<request::Upload> {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        request::decode_image_bytes(field, bytes, limits)
            .map_err(|e| anyhow!("{}: {e:?}", p.display()))
    };
    let init = a
        .init_image
        .as_deref()
        .map(|p| load_image(p, "init_image"))
        .transpose()?;
    let mask = a
        .mask
        .as_deref()
        .map(|p| load_image(p, "mask"))
        .transpose()?;
    let (canonical, suffix) = sd_engine::sched::canonical(&a.scheduler)?;

    let mut engine = sd_engine::pipeline::CpuEngine::new();
    let info = engine.load_checkpoint(&model_path)?;
    let fam = info.family.as_str();
    let (w, h) = match &init {
        Some(up) => (
            a.width.unwrap_or(up.image.width() / 8 * 8),
            a.height.unwrap_or(up.image.height() / 8 * 8),
        ),
        None => (
            a.width.unwrap_or(info.family.default_size()),
            a.height.unwrap_or(info.family.default_size()),
        ),
    };
    let mut loras = Vec::new();
    let mut specs = Vec::new();
    for l in &a.loras {
        let (file, weight) = match l.rsplit_once(':') {
            Some((f, w)) if w.parse::<f32>().is_ok() => (f, w.parse::<f32>()?),
            _ => (l.as_str(), 1.0),
        };
        let (path, sha) = resolve_file(&config, file)?;
        let name = name_of(&path);
        specs.push(sd_engine::LoraSpec {
            path,
            weight,
            name: name.clone(),
        });
        loras.push(ResolvedLora {
            sha256: sha,
            name,
            weight,
        });
    }
    if !specs.is_empty() {
        engine.set_loras(&specs)?;
    }
    let vae = match &a.vae {
        Some(v) => {
            let (path, sha) = resolve_file(&config, v)?;
            engine.set_vae(Some(&path))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            Some(request::ResolvedVae { sha256: sha, name })
        }
        None => None,
    };
    let seed = a.seed.unwrap_or_else(|| request::resolve_seed(None));
    let params = TaskParams {
        prompt: a.prompt.clone(),
        engine_prompt: sd_engine::text::prompt::extract_lora_tags(&a.prompt).0,
        negative_prompt: a.negative_prompt.clone(),
        model: model_sha,
        model_name: name_of(&model_path),
        family: fam.into(),
        width: w,
        height: h,
        num_images: a.num_images,
        num_inference_steps: a.steps,
        guidance_scale: a.cfg,
        strength: init.as_ref().map(|_| a.strength),
        scheduler: canonical.into(),
        schedule_type: a.schedule_type.clone().or(suffix.map(str::to_string)),
        seed,
        output_format: "png".into(),
        loras,
        clip_skip: a.clip_skip,
        vae,
        init_image: None,
        mask: None,
        metadata: Default::default(),
    };
    let gp = sd_engine::GenerateParams {
        prompt: params.engine_prompt.clone(),
        negative_prompt: params.negative_prompt.clone(),
        width: w,
        height: h,
        steps: a.steps,
        guidance_scale: a.cfg,
        scheduler: params.scheduler.clone(),
        schedule_type: params.schedule_type.clone(),
        seed,
        num_images: a.num_images,
        init_image: init.as_ref().map(|u| request::rgb_from(&u.image, w, h)),
        mask: mask.as_ref().map(|u| request::gray_from(&u.image, w, h)),
        strength: a.strength,
        clip_skip: a.clip_skip,
        preview_every: 0,
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new((a.steps * a.num_images) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps  {elapsed} ({eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut on_step = |p: &sd_engine::Progress| {
        if let Some(b) = &bar {
            b.set_length((p.total_steps * a.num_images) as u64);
            b.set_position((p.image_index * p.total_steps + p.step) as u64);
        }
        Control::Continue
    };
    let images = engine.generate(&gp, &mut on_step)?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    for (i, rgb) in images.into_iter().enumerate() {
        let out = output_path(&a.output, i, a.num_images);
        let img = GeneratedImage::from_task(None, &params, i as u32, rgb);
        let bytes = encode_image(&img).map_err(|e| anyhow!("encoding: {e}"))?;
        crate::util::write_file_atomic(&out, &bytes)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("{}", out.display());
    }
    Ok(())
}

/// `OUT.png` for one image; `OUT-1.png`, `OUT-2.png`, ... for several.
pub fn output_path(out: &Path, i: usize, n: u32) -> PathBuf {
    if n <= 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{}.{ext}", i + 1))
}
