//! AUTOMATIC1111-compatible API `/sdapi/v1` (SPEC §5): A1111's field names, defaults and response shapes
//! over the native queue, so existing A1111 clients work unchanged. Generation is synchronous for the
//! client but runs as an ordinary queued task.

use std::sync::Mutex;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::extract::{ApiJson, ApiQuery};
use crate::db::{ModelFilter, ModelRecord, TaskStatus};
use crate::error::{ApiError, ApiResult};
use crate::queue::request::{self, Errors, TaskRequest};
use crate::queue::submit::find_model;
use crate::queue::task_topic;
use crate::state::AppState;

/// Settings key: the checkpoint A1111 clients selected (sha256), used when a request names none.
const SELECTED_KEY: &str = "a1111.sd_model_checkpoint";
/// Settings key: the other options clients POSTed (a JSON object), echoed back by `GET options`.
const OPTIONS_KEY: &str = "a1111.options";
/// Stored options are small UI settings; a cap keeps the settings table from becoming a dumping ground.
const MAX_OPTIONS_BYTES: usize = 64 * 1024;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(root_status))
        .routes(routes!(txt2img))
        .routes(routes!(img2img))
        .routes(routes!(progress))
        .routes(routes!(interrupt))
        .routes(routes!(skip))
        .routes(routes!(get_options, set_options))
        .routes(routes!(cmd_flags))
        .routes(routes!(samplers))
        .routes(routes!(schedulers))
        .routes(routes!(sd_models))
        .routes(routes!(sd_vae))
        .routes(routes!(loras))
        .routes(routes!(embeddings))
        .routes(routes!(memory))
        .routes(routes!(scripts))
        .routes(routes!(png_info))
        .routes(routes!(refresh_checkpoints))
        .routes(routes!(refresh_vae))
        .routes(routes!(refresh_loras))
        .routes(routes!(refresh_embeddings))
        .routes(routes!(unload_checkpoint))
        .routes(routes!(reload_checkpoint))
        .routes(routes!(upscalers))
        .routes(routes!(latent_upscale_modes))
        .routes(routes!(hypernetworks))
        .routes(routes!(face_restorers))
        .routes(routes!(realesrgan_models))
        .routes(routes!(prompt_styles))
        .routes(routes!(script_info))
        .routes(routes!(extensions))
        .routes(routes!(train_embedding))
        .routes(routes!(train_hypernetwork))
        .routes(routes!(create_embedding))
        .routes(routes!(create_hypernetwork))
        .routes(routes!(server_kill))
        .routes(routes!(server_restart))
        .routes(routes!(server_stop))
        .routes(routes!(extra_single_image))
        .routes(routes!(extra_batch_images))
        .routes(routes!(interrogate))
}

// ---------------------------------------------------------------------------------------------------
// Requests

/// `txt2img` / `img2img` body with A1111's field names. Every field may be omitted or null (A1111's
/// models make all of them optional); omitted ones take A1111's defaults. Fields for features SD-Host
/// does not have are accepted and ignored unless honouring them silently would give a wrong result.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct A1111Request {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    /// Accepted; SD-Host has no prompt styles.
    pub styles: Option<Vec<String>>,
    /// -1 (default) → random.
    pub seed: Option<i64>,
    /// Accepted and recorded; variation seeds are not applied.
    pub subseed: Option<i64>,
    pub subseed_strength: Option<f64>,
    pub seed_resize_from_h: Option<i64>,
    pub seed_resize_from_w: Option<i64>,
    /// Default "Euler". Pre-1.9 names with a schedule suffix ("DPM++ 2M Karras") are accepted.
    pub sampler_name: Option<String>,
    /// Older spelling of `sampler_name` (used when `sampler_name` is absent).
    pub sampler_index: Option<String>,
    /// automatic (default) | uniform | normal | karras | exponential
    pub scheduler: Option<String>,
    /// Images per batch; `batch_size × n_iter` images in all (at most `limits.max_num_images`).
    pub batch_size: Option<u32>,
    pub n_iter: Option<u32>,
    /// Default 50.
    pub steps: Option<u32>,
    /// Default 7.
    pub cfg_scale: Option<f64>,
    /// Default 512 (rounded down to a multiple of 8, as A1111 does).
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Accepted; no face restoration.
    pub restore_faces: Option<bool>,
    /// Accepted; tiling is not applied.
    pub tiling: Option<bool>,
    pub do_not_save_samples: Option<bool>,
    pub do_not_save_grid: Option<bool>,
    pub eta: Option<f64>,
    pub s_churn: Option<f64>,
    pub s_tmax: Option<f64>,
    pub s_tmin: Option<f64>,
    pub s_noise: Option<f64>,
    /// Honoured: `sd_model_checkpoint` (title, name or hash), `CLIP_stop_at_last_layers`.
    #[schema(value_type = Option<Object>)]
    pub override_settings: Option<Map<String, Value>>,
    /// With `false`, an overridden `sd_model_checkpoint` stays selected afterwards.
    pub override_settings_restore_afterwards: Option<bool>,
    /// Scripts are not supported: a non-empty name is refused.
    pub script_name: Option<String>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub script_args: Option<Vec<Value>>,
    /// Default true; false returns no images (they are still stored in the gallery).
    pub send_images: Option<bool>,
    /// Accepted; every image is stored in the gallery anyway.
    pub save_images: Option<bool>,
    /// Extension scripts are not supported: a non-empty object is refused.
    #[schema(value_type = Option<Object>)]
    pub alwayson_scripts: Option<Map<String, Value>>,
    /// Hires fix is not supported: `true` is refused.
    pub enable_hr: Option<bool>,
    /// img2img: how much to change the source (default 0.75).
    pub denoising_strength: Option<f64>,
    /// img2img: base64 images (data URL or bare); the first one is used.
    pub init_images: Option<Vec<String>>,
    /// img2img inpainting mask (white = repaint).
    pub mask: Option<String>,
    /// Default 4: Gaussian blur of the mask edge, in pixels.
    pub mask_blur: Option<f64>,
    /// Accepted; the masked area always starts from the source image.
    pub inpainting_fill: Option<i64>,
    /// Accepted; the whole picture is processed.
    pub inpaint_full_res: Option<Value>,
    pub inpaint_full_res_padding: Option<i64>,
    /// 1 = repaint the black part of the mask instead of the white one.
    pub inpainting_mask_invert: Option<i64>,
    /// 0 just resize (default), 1 crop and resize, 2 resize and fill, 3 = 0.
    pub resize_mode: Option<i64>,
    pub include_init_images: Option<bool>,
    pub image_cfg_scale: Option<f64>,
    pub initial_noise_multiplier: Option<f64>,
}

/// A1111's default sampler for the API.
const DEFAULT_SAMPLER: &str = "Euler";

/// The schedule A1111 (1.9+) uses for a sampler under "Automatic".
fn automatic_schedule(sampler: &str) -> Option<&'static str> {
    match sampler {
        "DPM++ 2M" => Some("karras"),
        "DPM++ 2M SDE" => Some("exponential"),
        _ => None,
    }
}

/// A checkpoint by A1111 title (`name.safetensors [shorthash]`), name, filename, short hash or sha256.
async fn resolve_checkpoint(state: &AppState, s: &str) -> ApiResult<Option<ModelRecord>> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let mut candidates = vec![s.to_string()];
    if let Some(open) = s.rfind(" [") {
        if s.ends_with(']') {
            candidates.insert(0, s[open + 2..s.len() - 1].to_ascii_lowercase());
            candidates.push(s[..open].to_string());
        }
    }
    for c in candidates {
        if c.len() > 256 {
            continue;
        }
        if let Some(m) = find_model(state, &c, "checkpoint").await? {
            if m.model_type == "checkpoint" && m.status == "ready" {
                return Ok(Some(m));
            }
        }
    }
    Ok(None)
}

/// A1111's `sd_vae`: "Automatic" / "None" (the checkpoint's own) or a VAE file by file name,
/// name or hash. `Err(())` when it names no VAE in the library.
async fn resolve_vae(state: &AppState, s: &str) -> ApiResult<Result<Option<String>, ()>> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("automatic") || s.eq_ignore_ascii_case("none") {
        return Ok(Ok(None));
    }
    if s.len() > 256 {
        return Ok(Err(()));
    }
    Ok(match find_model(state, s, "vae").await? {
        Some(m) if m.model_type == "vae" && m.status == "ready" => Ok(Some(m.sha256)),
        _ => Err(()),
    })
}

/// A1111's checkpoint title.
fn title(m: &ModelRecord) -> String {
    format!("{} [{}]", m.filename, m.short_hash)
}

async fn stored_options(state: &AppState) -> ApiResult<Map<String, Value>> {
    Ok(state
        .repo
        .get_setting(OPTIONS_KEY)
        .await?
        .and_then(|s| serde_json::from_str::<Map<String, Value>>(&s).ok())
        .unwrap_or_default())
}

/// The checkpoint A1111 clients see as current: the one they selected, else the loaded one, else the
/// default a native task would use.
async fn current_checkpoint(state: &AppState) -> ApiResult<Option<ModelRecord>> {
    if let Some(sha) = state.repo.get_setting(SELECTED_KEY).await? {
        if let Some(m) = state.repo.get_model(&sha).await? {
            if m.status == "ready" {
                return Ok(Some(m));
            }
        }
    }
    crate::queue::submit::default_checkpoint(state).await
}

fn a1111_field(errs: &mut Errors, field: &str, msg: impl Into<String>) {
    errs.add(field, msg);
}

fn clip_skip_from(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64).map(|n| n as u32)
}

/// What the native task needs plus what the A1111 response reports.
struct Plan {
    task: TaskRequest,
    batch_size: u32,
    restore_model_after: Option<String>,
}

async fn plan(state: &AppState, r: &A1111Request, img2img: bool) -> ApiResult<Plan> {
    let limits = &state.config.limits;
    let mut e = Errors::default();
    if r.enable_hr == Some(true) && !img2img {
        a1111_field(
            &mut e,
            "enable_hr",
            "hires fix is not supported by SD-Host; generate at the final size instead",
        );
    }
    if let Some(s) = r.script_name.as_deref().filter(|s| !s.trim().is_empty()) {
        a1111_field(
            &mut e,
            "script_name",
            format!("script {s:?} not found: SD-Host has no scripts"),
        );
    }
    if let Some(name) = r.alwayson_scripts.as_ref().and_then(|m| m.keys().next()) {
        a1111_field(
            &mut e,
            "alwayson_scripts",
            format!("always-on script {name:?} not found: SD-Host has no extensions"),
        );
    }

    // Sampler and schedule: an explicit scheduler wins over a pre-1.9 name suffix, as in A1111.
    let sampler_in = r
        .sampler_name
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .or(r.sampler_index.as_deref().filter(|s| !s.trim().is_empty()))
        .unwrap_or(DEFAULT_SAMPLER);
    let mut sampler = None;
    let mut schedule: Option<&'static str> = None;
    match sd_engine::sched::canonical(sampler_in) {
        Ok((name, suffix)) => {
            sampler = Some(name);
            let explicit = match r
                .scheduler
                .as_deref()
                .map(|s| s.trim().to_ascii_lowercase())
                .as_deref()
            {
                None | Some("") | Some("automatic") => None,
                Some("uniform") | Some("normal") => Some("normal"),
                Some("karras") => Some("karras"),
                Some("exponential") => Some("exponential"),
                Some(other) => {
                    a1111_field(
                        &mut e,
                        "scheduler",
                        format!("unknown scheduler {other:?}; valid: automatic, uniform, normal, karras, exponential"),
                    );
                    None
                }
            };
            let supported = sd_engine::sched::supported_schedule_types(name).unwrap_or_default();
            schedule = match explicit {
                Some(st) if !supported.contains(&st) => {
                    a1111_field(
                        &mut e,
                        "scheduler",
                        format!("{name} supports only: {}", supported.join(", ")),
                    );
                    None
                }
                Some(st) => Some(st),
                None => suffix
                    .or_else(|| automatic_schedule(name))
                    .filter(|st| supported.contains(st)),
            };
        }
        Err(err) => a1111_field(&mut e, "sampler_name", err.to_string()),
    }

    let batch_size = r.batch_size.unwrap_or(1);
    let n_iter = r.n_iter.unwrap_or(1);
    if batch_size == 0 || n_iter == 0 {
        a1111_field(
            &mut e,
            "batch_size",
            "batch_size and n_iter must be at least 1",
        );
    } else if batch_size as u64 * n_iter as u64 > limits.max_num_images as u64 {
        a1111_field(
            &mut e,
            "batch_size",
            format!(
                "batch_size × n_iter must be at most {}",
                limits.max_num_images
            ),
        );
    }
    // A1111 makes a latent of width/8 × height/8, so other sizes round down.
    // Limits are checked here, before img2img resizes anything to this size.
    let mut size = |field: &str, v: Option<u32>, max: u32| -> u32 {
        let v = v.unwrap_or(512) / 8 * 8;
        if v == 0 {
            a1111_field(&mut e, field, "must be at least 8");
        } else if v > max {
            a1111_field(&mut e, field, format!("at most {max}"));
        }
        v.clamp(8, max.max(8))
    };
    let width = size("width", r.width, limits.max_width);
    let height = size("height", r.height, limits.max_height);
    if width as u64 * height as u64 > limits.max_pixels {
        a1111_field(
            &mut e,
            "width",
            format!("width × height must be at most {}", limits.max_pixels),
        );
    }

    let overrides = r.override_settings.clone().unwrap_or_default();
    let options = stored_options(state).await?;
    let clip_skip = clip_skip_from(overrides.get("CLIP_stop_at_last_layers"))
        .or_else(|| clip_skip_from(options.get("CLIP_stop_at_last_layers")));

    // sd_vae: a per-request override must name a VAE we have; a stored option that no longer
    // does falls back to the checkpoint's own VAE, as A1111 does.
    let vae = match overrides.get("sd_vae").and_then(Value::as_str) {
        Some(s) => resolve_vae(state, s).await?.unwrap_or_else(|()| {
            a1111_field(
                &mut e,
                "override_settings.sd_vae",
                format!("no VAE {s:?}; see GET /sdapi/v1/sd-vae"),
            );
            None
        }),
        None => match options.get("sd_vae").and_then(Value::as_str) {
            Some(s) => resolve_vae(state, s).await?.unwrap_or_else(|()| {
                tracing::warn!(sd_vae = %s, "the sd_vae option names no VAE; using the checkpoint's own");
                None
            }),
            None => None,
        },
    };

    let mut restore_model_after = None;
    let model = match overrides.get("sd_model_checkpoint") {
        Some(Value::String(s)) if !s.trim().is_empty() => match resolve_checkpoint(state, s).await?
        {
            Some(m) => {
                if r.override_settings_restore_afterwards == Some(false) {
                    restore_model_after = Some(m.sha256.clone());
                }
                Some(m.sha256)
            }
            None => {
                a1111_field(
                    &mut e,
                    "override_settings.sd_model_checkpoint",
                    format!("no checkpoint {s:?}; see GET /sdapi/v1/sd-models"),
                );
                None
            }
        },
        Some(Value::String(_)) | Some(Value::Null) | None => {
            let current = current_checkpoint(state).await?.map(|m| m.sha256);
            if current.is_none() {
                a1111_field(
                    &mut e,
                    "override_settings.sd_model_checkpoint",
                    "no checkpoint selected: POST /sdapi/v1/options {\"sd_model_checkpoint\": \"<title>\"} \
                     (titles from GET /sdapi/v1/sd-models) or set engine.default_checkpoint",
                );
            }
            current
        }
        Some(_) => {
            a1111_field(
                &mut e,
                "override_settings.sd_model_checkpoint",
                "must be a checkpoint title, name or hash",
            );
            None
        }
    };

    let (init_image, mask, strength) = if img2img {
        let first = r
            .init_images
            .as_ref()
            .and_then(|v| v.iter().find(|s| !s.trim().is_empty()));
        match first {
            None => {
                a1111_field(
                    &mut e,
                    "init_images",
                    "img2img needs at least one init image",
                );
                (None, None, None)
            }
            Some(img) => {
                let strength = r.denoising_strength.unwrap_or(0.75);
                if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
                    a1111_field(&mut e, "denoising_strength", "must be in 0..1");
                }
                // An A1111 strength of 0 returns the source unchanged; the engine needs > 0.
                let strength = strength.clamp(0.01, 1.0);
                e.clone_into_result()?;
                let resize_mode = r.resize_mode.unwrap_or(0);
                let (init, mask) = prepare_inputs(
                    state,
                    img,
                    r.mask.as_deref().filter(|m| !m.trim().is_empty()),
                    (width, height),
                    resize_mode,
                    r.inpainting_mask_invert.unwrap_or(0) == 1,
                    r.mask_blur.unwrap_or(4.0),
                )?;
                (Some(init), mask, Some(strength))
            }
        }
    } else {
        (None, None, None)
    };
    e.into_result()?;

    let task = TaskRequest {
        prompt: r.prompt.clone().unwrap_or_default(),
        negative_prompt: r.negative_prompt.clone().unwrap_or_default(),
        model,
        init_image,
        init_image_hash: None,
        mask,
        width: Some(width),
        height: Some(height),
        num_images: Some(batch_size * n_iter),
        num_inference_steps: Some(r.steps.unwrap_or(50)),
        guidance_scale: Some(r.cfg_scale.unwrap_or(7.0)),
        strength,
        scheduler: sampler.map(str::to_string),
        schedule_type: schedule.map(str::to_string),
        seed: Some(r.seed.unwrap_or(-1)),
        output_format: Some("png".into()),
        callback_url: None,
        loras: vec![],
        clip_skip,
        vae,
        priority: 0,
        metadata: Map::new(),
    };
    Ok(Plan {
        task,
        batch_size,
        restore_model_after,
    })
}

trait ErrorsExt {
    /// Fails now if anything was collected (keeps collecting otherwise).
    fn clone_into_result(&self) -> ApiResult<()>;
}

impl ErrorsExt for Errors {
    fn clone_into_result(&self) -> ApiResult<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0.clone()))
        }
    }
}

fn png_data_url(img: &image::DynamicImage) -> ApiResult<String> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(ApiError::internal)?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(out)
    ))
}

/// A1111 resize modes 1 (crop) and 2 (fill) fit the source to the output size before sampling; mode 0
/// (stretch) is what the engine does by itself. Masks get the same geometry, then invert and blur.
fn prepare_inputs(
    state: &AppState,
    init: &str,
    mask: Option<&str>,
    (w, h): (u32, u32),
    resize_mode: i64,
    invert: bool,
    blur: f64,
) -> ApiResult<(String, Option<String>)> {
    use image::imageops::FilterType;
    let limits = &state.config.limits;
    let fit = |img: &image::DynamicImage| -> image::DynamicImage {
        match resize_mode {
            1 => img.resize_to_fill(w, h, FilterType::Lanczos3),
            2 => {
                // Stretched copy as the background, the whole image fitted on top.
                let mut canvas = img.resize_exact(w, h, FilterType::Triangle).to_rgba8();
                let fitted = img.resize(w, h, FilterType::Lanczos3).to_rgba8();
                let x = (w - fitted.width()) / 2;
                let y = (h - fitted.height()) / 2;
                image::imageops::overlay(&mut canvas, &fitted, x as i64, y as i64);
                image::DynamicImage::ImageRgba8(canvas)
            }
            _ => img.resize_exact(w, h, FilterType::Lanczos3),
        }
    };
    let reshape = matches!(resize_mode, 1 | 2);
    let init_out = if reshape {
        let up = request::decode_data_url("init_images", init, limits)?;
        png_data_url(&fit(&up.image))?
    } else {
        init.to_string()
    };
    let mask_out = match mask {
        None => None,
        Some(m) if !reshape && !invert && blur <= 0.0 => Some(m.to_string()),
        Some(m) => {
            let up = request::decode_data_url("mask", m, limits)?;
            let mut gray = fit(&up.image).to_luma8();
            if invert {
                image::imageops::invert(&mut gray);
            }
            if blur.is_finite() && blur > 0.0 {
                gray = image::imageops::blur(&gray, blur.min(64.0) as f32);
            }
            Some(png_data_url(&image::DynamicImage::ImageLuma8(gray))?)
        }
    };
    Ok((init_out, mask_out))
}

// ---------------------------------------------------------------------------------------------------
// Generation

/// Cancels the task if the handler is dropped before it finished (the client went away), so an
/// abandoned synchronous request does not keep the engine busy.
struct CancelOnDrop {
    state: Option<AppState>,
    id: String,
}

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.state = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            let id = std::mem::take(&mut self.id);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    tracing::info!(task = %id, "A1111 client went away; cancelling its task");
                    let _ = state.queue.cancel(&state, &id).await;
                });
            }
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct A1111Response {
    /// Base64 PNGs (no data-URL prefix), empty when `send_images` is false; after an interrupt,
    /// the images made until then.
    images: Vec<String>,
    /// The request as understood, defaults filled in.
    #[schema(value_type = Object)]
    parameters: Value,
    /// A JSON **string**: seed, all_seeds, infotexts, sd_model_name, sd_model_hash, ...
    info: String,
}

async fn generate(
    state: &AppState,
    mut r: A1111Request,
    img2img: bool,
) -> ApiResult<Json<A1111Response>> {
    let plan = plan(state, &r, img2img).await?;
    let (rec, _) = state.queue.submit(state, plan.task.clone()).await?;
    let mut guard = CancelOnDrop {
        state: Some(state.clone()),
        id: rec.id.clone(),
    };
    // Ends after the terminal event (replayed from history if it already happened).
    let mut events = Box::pin(state.events.subscribe(&task_topic(&rec.id), None));
    while events.next().await.is_some() {}
    guard.disarm();
    if let Some(sha) = &plan.restore_model_after {
        state.repo.set_setting(SELECTED_KEY, sha).await?;
    }
    let t = state
        .repo
        .get_task(&rec.id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("task {} disappeared", rec.id)))?;
    match t.status {
        TaskStatus::Completed | TaskStatus::Cancelled => {}
        TaskStatus::Failed => {
            return Err(ApiError::Internal(
                t.error_message
                    .unwrap_or_else(|| "generation failed".into()),
            ))
        }
        other => {
            return Err(ApiError::Internal(format!(
                "task {} ended its event stream while {}",
                t.id,
                other.as_str()
            )))
        }
    }
    let mut images = Vec::with_capacity(t.images.len());
    let mut infotexts = Vec::with_capacity(t.images.len());
    for h in &t.images {
        let bytes = state.blobs.get(h).await.map_err(ApiError::internal)?;
        infotexts.push(crate::images::metadata::read_png_parameters(&bytes).unwrap_or_default());
        images.push(base64::engine::general_purpose::STANDARD.encode(&bytes));
    }
    let info = info_json(state, &t.params, &r, plan.batch_size, infotexts, &t).await;
    if !r.send_images.unwrap_or(true) {
        images.clear();
    }
    // A1111 echoes the request without the (large) source images.
    if r.include_init_images != Some(true) {
        r.init_images = None;
        r.mask = None;
    }
    let parameters = serde_json::to_value(&r).unwrap_or(Value::Null);
    Ok(Json(A1111Response {
        images,
        parameters,
        info: info.to_string(),
    }))
}

async fn info_json(
    state: &AppState,
    p: &Value,
    r: &A1111Request,
    batch_size: u32,
    infotexts: Vec<String>,
    t: &crate::db::TaskRecord,
) -> Value {
    let seed = p.get("seed").and_then(Value::as_u64).unwrap_or(0);
    let n = p.get("num_images").and_then(Value::as_u64).unwrap_or(1);
    let prompt = p.get("prompt").cloned().unwrap_or(json!(""));
    let negative = p.get("negative_prompt").cloned().unwrap_or(json!(""));
    let model_sha = p.get("model").and_then(Value::as_str).unwrap_or("");
    let model = state.repo.get_model(model_sha).await.ok().flatten();
    let subseed = match r.subseed {
        Some(s) if s >= 0 => s as u64,
        _ => request::resolve_seed(None),
    };
    let schedule = p.get("schedule_type").and_then(Value::as_str);
    let mut extra = Map::new();
    extra.insert(
        "Schedule type".into(),
        json!(crate::images::infotext::schedule_type_label(schedule)),
    );
    let job_timestamp =
        chrono::DateTime::from_timestamp_millis(t.started_at.unwrap_or(t.created_at))
            .map(|d| {
                d.with_timezone(&chrono::Local)
                    .format("%Y%m%d%H%M%S")
                    .to_string()
            })
            .unwrap_or_default();
    json!({
        "prompt": prompt,
        "all_prompts": vec![prompt.clone(); n as usize],
        "negative_prompt": negative,
        "all_negative_prompts": vec![negative.clone(); n as usize],
        "seed": seed,
        "all_seeds": (0..n).map(|i| seed + i).collect::<Vec<_>>(),
        "subseed": subseed,
        "all_subseeds": (0..n).map(|i| subseed + i).collect::<Vec<_>>(),
        "subseed_strength": r.subseed_strength.unwrap_or(0.0),
        "width": p.get("width"),
        "height": p.get("height"),
        "sampler_name": p.get("scheduler"),
        "scheduler": schedule.unwrap_or("automatic"),
        "cfg_scale": p.get("guidance_scale"),
        "steps": p.get("num_inference_steps"),
        "batch_size": batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": model.as_ref().map(|m| m.name.clone()).or_else(|| p.get("model_name").and_then(Value::as_str).map(str::to_string)),
        "sd_model_hash": model.as_ref().map(|m| m.short_hash.clone()),
        "sd_vae_name": p.pointer("/vae/name"),
        "sd_vae_hash": p.pointer("/vae/sha256").and_then(Value::as_str).map(|h| &h[..h.len().min(10)]),
        "seed_resize_from_w": r.seed_resize_from_w.unwrap_or(-1),
        "seed_resize_from_h": r.seed_resize_from_h.unwrap_or(-1),
        "denoising_strength": p.get("strength"),
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": r.styles.clone().unwrap_or_default(),
        "job_timestamp": job_timestamp,
        "clip_skip": p.get("clip_skip"),
        "is_using_inpainting_conditioning": p.get("mask").is_some_and(|m| !m.is_null()),
        "version": crate::images::infotext::version_string(),
        "task_id": t.id,
        "interrupted": t.status == TaskStatus::Cancelled || stopped(&t.id) == Some(None),
    })
}

/// Text-to-image; answers when the images are done. Runs through the same queue as native tasks;
/// a client that disconnects cancels its task.
#[utoipa::path(post, path = "/sdapi/v1/txt2img", tag = "a1111", request_body = A1111Request,
    responses((status = 200, body = A1111Response), (status = 422, description = "invalid request; nothing queued")))]
async fn txt2img(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<A1111Request>,
) -> ApiResult<Json<A1111Response>> {
    generate(&state, r, false).await
}

/// Image-to-image and inpainting (`init_images`, `mask`, `denoising_strength`, inpainting fields).
#[utoipa::path(post, path = "/sdapi/v1/img2img", tag = "a1111", request_body = A1111Request,
    responses((status = 200, body = A1111Response), (status = 422, description = "invalid request; nothing queued")))]
async fn img2img(
    State(state): State<AppState>,
    ApiJson(r): ApiJson<A1111Request>,
) -> ApiResult<Json<A1111Response>> {
    generate(&state, r, true).await
}

// ---------------------------------------------------------------------------------------------------
// Progress and control

/// How a task was stopped through `interrupt` (`None`) or `skip` (`Some(image index)`), so
/// `progress` can report it (newest last, bounded).
static STOPPED: Mutex<Vec<(String, Option<u32>)>> = Mutex::new(Vec::new());

fn remember_stopped(id: &str, skipped_image: Option<u32>) {
    let mut s = STOPPED.lock().unwrap_or_else(|p| p.into_inner());
    s.push((id.to_string(), skipped_image));
    if s.len() > 64 {
        s.remove(0);
    }
}

fn stopped(id: &str) -> Option<Option<u32>> {
    let s = STOPPED.lock().unwrap_or_else(|p| p.into_inner());
    s.iter().rev().find(|(i, _)| i == id).map(|(_, sk)| *sk)
}

#[derive(Deserialize, IntoParams)]
pub struct ProgressQuery {
    /// Leave out `current_image`.
    #[serde(default)]
    skip_current_image: bool,
}

/// Progress of the running task: `progress` 0..1, `eta_relative` seconds, A1111's `state`, a preview.
#[utoipa::path(get, path = "/sdapi/v1/progress", tag = "a1111", params(ProgressQuery),
    responses((status = 200, description = "`{progress, eta_relative, state, current_image, textinfo}`")))]
async fn progress(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ProgressQuery>,
) -> ApiResult<Json<Value>> {
    let pending = state.repo.list_pending().await?.len() as u64;
    let running = state.queue.running();
    let job_count = pending + running.is_some() as u64;
    let Some(r) = running else {
        return Ok(Json(json!({
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {
                "skipped": false, "interrupted": false, "stopping_generation": false,
                "job": "", "job_count": job_count, "job_timestamp": "0", "job_no": 0,
                "sampling_step": 0, "sampling_steps": 0,
            },
            "current_image": null,
            "textinfo": null,
        })));
    };
    let total = r.total_steps.max(1) as f64;
    let n = r.num_images.max(1) as f64;
    // A1111 starts at 0.01 so a just-started job never reads as idle.
    let fraction = ((r.image_index as f64 + r.step as f64 / total) / n).clamp(0.0, 1.0);
    let progress = (0.01 + fraction).min(1.0);
    let elapsed = r.started.elapsed().as_secs_f64();
    let eta_relative = (elapsed / progress - elapsed).max(0.0);
    let stop = stopped(&r.task_id);
    let started_at =
        chrono::Local::now() - chrono::Duration::from_std(r.started.elapsed()).unwrap_or_default();
    let current_image = if q.skip_current_image {
        None
    } else {
        r.preview_jpeg
            .as_ref()
            .map(|j| base64::engine::general_purpose::STANDARD.encode(j))
    };
    Ok(Json(json!({
        "progress": progress,
        "eta_relative": eta_relative,
        "state": {
            // A1111 clears `skipped` when the next image starts.
            "skipped": stop == Some(Some(r.image_index)),
            "interrupted": stop == Some(None),
            "stopping_generation": false,
            "job": format!("task({})", r.task_id),
            "job_count": job_count,
            "job_timestamp": started_at.format("%Y%m%d%H%M%S").to_string(),
            "job_no": r.image_index,
            "sampling_step": r.step,
            "sampling_steps": r.total_steps,
        },
        "current_image": current_image,
        "textinfo": format!("Image {}/{}, step {}/{}", r.image_index + 1, r.num_images, r.step, r.total_steps),
    })))
}

/// Stops the running task at its next step, as A1111 does: the image in progress is decoded as it
/// stands, no further image is started, and its `txt2img` call returns the images made so far.
#[utoipa::path(post, path = "/sdapi/v1/interrupt", tag = "a1111", responses((status = 200)))]
async fn interrupt(State(state): State<AppState>) -> Json<Value> {
    if let Some(r) = state.queue.running() {
        remember_stopped(&r.task_id, None);
        state.queue.finish_running();
    }
    Json(json!({}))
}

/// Stops sampling the image in progress at its next step; it is decoded as it stands (as A1111
/// does) and the batch goes on with its next image.
#[utoipa::path(post, path = "/sdapi/v1/skip", tag = "a1111", responses((status = 200)))]
async fn skip(State(state): State<AppState>) -> Json<Value> {
    if let Some(r) = state.queue.running() {
        remember_stopped(&r.task_id, Some(r.image_index));
        state.queue.skip_running_image();
    }
    Json(json!({}))
}

// ---------------------------------------------------------------------------------------------------
// Options and models

/// Current options: `sd_model_checkpoint` (title), `sd_checkpoint_hash`, and whatever clients set.
#[utoipa::path(get, path = "/sdapi/v1/options", tag = "a1111", responses((status = 200, body = Object)))]
async fn get_options(State(state): State<AppState>) -> ApiResult<Json<Map<String, Value>>> {
    let mut o = Map::new();
    for (k, v) in [
        ("sd_vae", json!("Automatic")),
        ("CLIP_stop_at_last_layers", json!(1)),
        ("samples_format", json!("png")),
        ("sd_checkpoints_limit", json!(1)),
        ("randn_source", json!("CPU")),
        ("eta_noise_seed_delta", json!(0)),
        ("live_previews_enable", json!(true)),
        (
            "show_progress_every_n_steps",
            json!(state.config.engine.preview_every),
        ),
        ("save_images_default", json!(true)),
    ] {
        o.insert(k.into(), v);
    }
    o.extend(stored_options(&state).await?);
    let current = current_checkpoint(&state).await?;
    o.insert(
        "sd_model_checkpoint".into(),
        json!(current.as_ref().map(title)),
    );
    o.insert(
        "sd_checkpoint_hash".into(),
        json!(current.as_ref().map(|m| m.sha256.clone())),
    );
    Ok(Json(o))
}

/// Sets options. `sd_model_checkpoint` (title, name or hash) selects and loads that checkpoint
/// (after the running task); other keys are stored and read back.
#[utoipa::path(post, path = "/sdapi/v1/options", tag = "a1111", request_body = Object,
    responses((status = 200), (status = 422, description = "unknown checkpoint")))]
async fn set_options(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let mut rest = body;
    let checkpoint = rest.remove("sd_model_checkpoint");
    rest.remove("sd_checkpoint_hash");
    let model = match &checkpoint {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(resolve_checkpoint(&state, s).await?.ok_or_else(|| {
            ApiError::field(
                &["body", "sd_model_checkpoint"],
                format!("no checkpoint {s:?}; see GET /sdapi/v1/sd-models"),
            )
        })?),
        Some(_) => {
            return Err(ApiError::field(
                &["body", "sd_model_checkpoint"],
                "must be a checkpoint title, name or hash",
            ))
        }
    };
    if let Some(v) = rest.get("CLIP_stop_at_last_layers") {
        if !v.as_u64().is_some_and(|n| (1..=12).contains(&n)) {
            return Err(ApiError::field(
                &["body", "CLIP_stop_at_last_layers"],
                "must be an integer 1..12",
            ));
        }
    }
    if !rest.is_empty() {
        let mut all = stored_options(&state).await?;
        all.extend(rest);
        let text = Value::Object(all).to_string();
        if text.len() > MAX_OPTIONS_BYTES {
            return Err(ApiError::PayloadTooLarge(format!(
                "stored options would exceed {MAX_OPTIONS_BYTES} bytes"
            )));
        }
        state.repo.set_setting(OPTIONS_KEY, &text).await?;
    }
    if let Some(m) = model {
        state.repo.set_setting(SELECTED_KEY, &m.sha256).await?;
        load(&state, &m.sha256).await?;
    }
    Ok(Json(Value::Null))
}

/// Loads a checkpoint behind the running task (the queue holds the engine lock while a task runs).
async fn load(state: &AppState, sha: &str) -> ApiResult<()> {
    let _engine = state.queue.queue().engine_lock.lock().await;
    crate::queue::ensure_checkpoint(state, &state.engine, sha)
        .await
        .map_err(ApiError::Internal)
}

async fn models_of(state: &AppState, kind: &str) -> ApiResult<Vec<ModelRecord>> {
    let mut all = state
        .repo
        .list_models(&ModelFilter {
            model_type: Some(kind.into()),
            ..Default::default()
        })
        .await?;
    all.retain(|m| m.status == "ready");
    all.sort_by_key(|m| m.name.to_lowercase());
    Ok(all)
}

/// Checkpoints: `title` ("file.safetensors [shorthash]"), `model_name`, `hash`, `sha256`, `filename`.
#[utoipa::path(get, path = "/sdapi/v1/sd-models", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
async fn sd_models(State(state): State<AppState>) -> ApiResult<Json<Vec<Value>>> {
    Ok(Json(
        models_of(&state, "checkpoint")
            .await?
            .iter()
            .map(|m| {
                json!({
                    "title": title(m), "model_name": m.name, "hash": m.short_hash,
                    "sha256": m.sha256, "filename": m.filename, "config": null,
                })
            })
            .collect(),
    ))
}

/// Samplers by A1111 name; the diffusers class is listed as an alias.
#[utoipa::path(get, path = "/sdapi/v1/samplers", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
async fn samplers() -> Json<Vec<Value>> {
    Json(
        sd_engine::sched::valid_names()
            .into_iter()
            .map(|name| {
                let aliases: Vec<&str> =
                    sd_engine::sched::diffusers_name(name).into_iter().collect();
                let mut options = Map::new();
                if let Some(s) = automatic_schedule(name) {
                    options.insert("scheduler".into(), json!(s));
                }
                json!({"name": name, "aliases": aliases, "options": options})
            })
            .collect(),
    )
}

/// Schedule types (`scheduler` in requests).
#[utoipa::path(get, path = "/sdapi/v1/schedulers", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
async fn schedulers() -> Json<Vec<Value>> {
    let item = |name: &str, label: &str, rho: f64| json!({"name": name, "label": label, "aliases": null, "default_rho": rho, "need_inner_model": false});
    Json(vec![
        item("automatic", "Automatic", -1.0),
        item("uniform", "Uniform", -1.0),
        item("normal", "Normal", -1.0),
        item("karras", "Karras", 7.0),
        item("exponential", "Exponential", -1.0),
    ])
}

/// VAE files in the library (`model_name`, `filename`).
#[utoipa::path(get, path = "/sdapi/v1/sd-vae", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
async fn sd_vae(State(state): State<AppState>) -> ApiResult<Json<Vec<Value>>> {
    Ok(Json(
        models_of(&state, "vae")
            .await?
            .iter()
            .map(|m| json!({"model_name": m.name, "filename": m.filename}))
            .collect(),
    ))
}

/// LoRA and LyCORIS files, usable as `<lora:name:weight>` in prompts.
#[utoipa::path(get, path = "/sdapi/v1/loras", tag = "a1111", responses((status = 200, body = Vec<Object>)))]
async fn loras(State(state): State<AppState>) -> ApiResult<Json<Vec<Value>>> {
    let mut all = models_of(&state, "lora").await?;
    all.extend(models_of(&state, "lycoris").await?);
    Ok(Json(
        all.iter()
            .map(|m| {
                json!({
                    "name": m.name, "alias": m.name, "path": m.filename,
                    "metadata": {
                        "sha256": m.sha256, "family": m.family,
                        "trained_words": crate::queue::submit::trained_words(m),
                    },
                })
            })
            .collect(),
    ))
}

/// Vector count and width of a textual-inversion file, read from its safetensors header.
fn embedding_shape(path: Option<&str>) -> (u64, u64) {
    let read = || -> Option<(u64, u64)> {
        use std::io::Read;
        let mut f = std::fs::File::open(path?).ok()?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).ok()?;
        let len = u64::from_le_bytes(len);
        if len > 1 << 20 {
            return None;
        }
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).ok()?;
        let header: Map<String, Value> = serde_json::from_slice(&buf).ok()?;
        let (mut vectors, mut width) = (0u64, 0u64);
        for (k, v) in &header {
            if k == "__metadata__" {
                continue;
            }
            let shape: Vec<u64> = v
                .get("shape")?
                .as_array()?
                .iter()
                .filter_map(Value::as_u64)
                .collect();
            if let [n, w] = shape[..] {
                vectors = vectors.max(n);
                width += w;
            } else if let [w] = shape[..] {
                vectors = vectors.max(1);
                width += w;
            }
        }
        Some((vectors, width))
    };
    read().unwrap_or((0, 0))
}

/// Textual-inversion embeddings: `loaded` (usable with the current checkpoint) and `skipped`.
#[utoipa::path(get, path = "/sdapi/v1/embeddings", tag = "a1111", responses((status = 200, body = Object)))]
async fn embeddings(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let family = current_checkpoint(&state).await?.map(|m| m.family);
    let (mut loaded, mut skipped) = (Map::new(), Map::new());
    for m in models_of(&state, "embedding").await? {
        let (vectors, shape) = embedding_shape(m.path.as_deref());
        let item = json!({
            "step": null, "sd_checkpoint": null, "sd_checkpoint_name": null,
            "shape": shape, "vectors": vectors,
        });
        let fits = m.family == "unknown" || family.as_deref().is_none_or(|f| f == m.family);
        // The name a prompt uses: the file's, as in A1111 (a Civitai title may differ).
        let name = std::path::Path::new(&m.filename)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or(m.name);
        if fits {
            loaded.insert(name, item);
        } else {
            skipped.insert(name, item);
        }
    }
    Ok(Json(json!({"loaded": loaded, "skipped": skipped})))
}

fn meminfo() -> Map<String, Value> {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |key: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|v| v * 1024);
    let mut m = Map::new();
    if let (Some(total), Some(free)) = (kb("MemTotal:"), kb("MemAvailable:")) {
        m.insert("total".into(), json!(total));
        m.insert("free".into(), json!(free));
        m.insert("used".into(), json!(total.saturating_sub(free)));
    }
    if let Some(rss) = rss {
        m.insert("process_rss".into(), json!(rss));
    }
    m
}

/// RAM (`free`, `used`, `total`, bytes) and the accelerator's memory (an `error` on CPU).
#[utoipa::path(get, path = "/sdapi/v1/memory", tag = "a1111", responses((status = 200, body = Object)))]
async fn memory(State(state): State<AppState>) -> Json<Value> {
    let device = state.config.engine.device.to_string();
    let cuda = if device.starts_with("cuda") {
        json!({"error": "per-device memory statistics are not reported yet"})
    } else {
        json!({"error": format!("no CUDA device: the engine runs on {device}")})
    };
    Json(json!({"ram": meminfo(), "cuda": cuda}))
}

/// Launch flags as A1111 reports them (nothing secret: no keys, tokens or paths).
#[utoipa::path(get, path = "/sdapi/v1/cmd-flags", tag = "a1111", responses((status = 200, body = Object)))]
async fn cmd_flags(State(state): State<AppState>) -> Json<Value> {
    let c = &state.config;
    let host = c.server.host.to_string();
    let listen = !matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1");
    Json(json!({
        "api": true,
        "nowebui": false,
        "listen": listen,
        "port": c.server.port,
        "use_cpu": if c.engine.device == "cpu" { json!(["all"]) } else { json!([]) },
        "precision": "autocast",
        "no_half": c.engine.device == "cpu",
        "xformers": false,
        "lowvram": false,
        "medvram": false,
        "api_auth": null,
        "gradio_auth": null,
        "enable_insecure_extension_access": false,
    }))
}

/// Script titles per mode (SD-Host has none).
#[utoipa::path(get, path = "/sdapi/v1/scripts", tag = "a1111", responses((status = 200, body = Object)))]
async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": []}))
}

// ---------------------------------------------------------------------------------------------------
// PNG info

#[derive(Deserialize, ToSchema)]
pub struct PngInfoRequest {
    /// Base64 image (data URL or bare).
    image: String,
}

/// Reads generation parameters from a PNG: `info` (A1111 infotext), `items` (other text chunks),
/// `parameters` (the infotext parsed).
#[utoipa::path(post, path = "/sdapi/v1/png-info", tag = "a1111", request_body = PngInfoRequest,
    responses((status = 200, description = "`{info, items, parameters}`"), (status = 422)))]
async fn png_info(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<PngInfoRequest>,
) -> ApiResult<Json<Value>> {
    let limits = &state.config.limits;
    let b64 = match req.image.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map(|(_, d)| d).unwrap_or(""),
        None => req.image.as_str(),
    };
    if b64.len() / 4 * 3 > limits.max_init_image_bytes + 3 {
        return Err(ApiError::PayloadTooLarge(format!(
            "image is larger than {} bytes",
            limits.max_init_image_bytes
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| ApiError::field(&["body", "image"], "invalid base64"))?;
    if bytes.is_empty() {
        return Err(ApiError::field(&["body", "image"], "empty image"));
    }
    // PNG `parameters` text, or the EXIF UserComment of a JPEG/WebP (ours and A1111's).
    let info = crate::images::metadata::read_png_parameters(&bytes).unwrap_or_default();
    let mut items = Map::new();
    for (k, v) in crate::images::metadata::png_text_chunks(&bytes) {
        if k != "parameters" {
            items.insert(k, Value::String(v));
        }
    }
    let parameters = if info.is_empty() {
        Map::new()
    } else {
        crate::images::infotext::parse_infotext(&info)
    };
    Ok(Json(
        json!({"info": info, "items": items, "parameters": parameters}),
    ))
}

// ---------------------------------------------------------------------------------------------------
// Library and engine maintenance

async fn rescan(state: &AppState) -> ApiResult<Json<Value>> {
    crate::models::library::scan(&state.repo, &state.config.models_dir())
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(Value::Null))
}

/// Registers new files in the models folder.
#[utoipa::path(post, path = "/sdapi/v1/refresh-checkpoints", tag = "a1111", responses((status = 200)))]
async fn refresh_checkpoints(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    rescan(&state).await
}

/// Registers new files in the models folder.
#[utoipa::path(post, path = "/sdapi/v1/refresh-vae", tag = "a1111", responses((status = 200)))]
async fn refresh_vae(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    rescan(&state).await
}

/// Registers new files in the models folder.
#[utoipa::path(post, path = "/sdapi/v1/refresh-loras", tag = "a1111", responses((status = 200)))]
async fn refresh_loras(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    rescan(&state).await
}

/// Registers new files in the models folder.
#[utoipa::path(post, path = "/sdapi/v1/refresh-embeddings", tag = "a1111", responses((status = 200)))]
async fn refresh_embeddings(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    rescan(&state).await
}

/// Frees the loaded checkpoint (after the running task); the next generation loads it again.
#[utoipa::path(post, path = "/sdapi/v1/unload-checkpoint", tag = "a1111", responses((status = 200)))]
async fn unload_checkpoint(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let _engine = state.queue.queue().engine_lock.lock().await;
    if let Some(c) = state.engine.state().checkpoint {
        // Remember it, so reload-checkpoint brings back the same one.
        if state.repo.get_setting(SELECTED_KEY).await?.is_none() {
            state.repo.set_setting(SELECTED_KEY, &c.sha256).await?;
        }
    }
    state.engine.unload().await.map_err(ApiError::internal)?;
    state
        .model_loaded
        .store(false, std::sync::atomic::Ordering::Relaxed);
    Ok(Json(json!({})))
}

/// Loads the selected checkpoint again (no-op if it is loaded).
#[utoipa::path(post, path = "/sdapi/v1/reload-checkpoint", tag = "a1111",
    responses((status = 200), (status = 409, description = "no checkpoint selected or available")))]
async fn reload_checkpoint(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let m = current_checkpoint(&state).await?.ok_or_else(|| {
        ApiError::Conflict(
            "no checkpoint to load: select one with POST /sdapi/v1/options {\"sd_model_checkpoint\": ...}"
                .into(),
        )
    })?;
    load(&state, &m.sha256).await?;
    Ok(Json(json!({})))
}

// ---------------------------------------------------------------------------------------------------
// Features SD-Host does not have: empty lists, or 501 for actions.

macro_rules! empty_list {
    ($fn_name:ident, $path:literal, $what:literal) => {
        #[doc = concat!("Always empty: SD-Host has no ", $what, ".")]
        #[utoipa::path(get, path = $path, tag = "a1111", responses((status = 200, body = Vec<Object>)))]
        async fn $fn_name() -> Json<Vec<Value>> {
            Json(vec![])
        }
    };
}

empty_list!(upscalers, "/sdapi/v1/upscalers", "upscalers");
empty_list!(
    latent_upscale_modes,
    "/sdapi/v1/latent-upscale-modes",
    "latent upscaling"
);
empty_list!(hypernetworks, "/sdapi/v1/hypernetworks", "hypernetworks");
empty_list!(
    face_restorers,
    "/sdapi/v1/face-restorers",
    "face restoration"
);
empty_list!(
    realesrgan_models,
    "/sdapi/v1/realesrgan-models",
    "RealESRGAN models"
);
empty_list!(prompt_styles, "/sdapi/v1/prompt-styles", "prompt styles");
empty_list!(script_info, "/sdapi/v1/script-info", "scripts");
empty_list!(extensions, "/sdapi/v1/extensions", "extensions");

macro_rules! not_implemented {
    ($fn_name:ident, $path:literal, $detail:literal) => {
        #[doc = concat!("Not supported (501): ", $detail)]
        #[utoipa::path(post, path = $path, tag = "a1111", responses((status = 501)))]
        async fn $fn_name() -> ApiError {
            ApiError::NotImplemented($detail.into())
        }
    };
}

not_implemented!(
    train_embedding,
    "/sdapi/v1/train/embedding",
    "SD-Host does not train embeddings; train elsewhere and put the .safetensors file in the models folder"
);
not_implemented!(
    train_hypernetwork,
    "/sdapi/v1/train/hypernetwork",
    "SD-Host has no hypernetwork support"
);
not_implemented!(
    create_embedding,
    "/sdapi/v1/create/embedding",
    "SD-Host does not create embeddings; train elsewhere and put the .safetensors file in the models folder"
);
not_implemented!(
    create_hypernetwork,
    "/sdapi/v1/create/hypernetwork",
    "SD-Host has no hypernetwork support"
);
not_implemented!(
    server_kill,
    "/sdapi/v1/server-kill",
    "server control over the A1111 API is disabled; stop the sd-host process from its service manager"
);
not_implemented!(
    server_restart,
    "/sdapi/v1/server-restart",
    "server control over the A1111 API is disabled; restart the sd-host process from its service manager"
);
not_implemented!(
    server_stop,
    "/sdapi/v1/server-stop",
    "server control over the A1111 API is disabled; stop the sd-host process from its service manager"
);
not_implemented!(
    extra_single_image,
    "/sdapi/v1/extra-single-image",
    "SD-Host has no upscalers or face restoration (extras)"
);
not_implemented!(
    extra_batch_images,
    "/sdapi/v1/extra-batch-images",
    "SD-Host has no upscalers or face restoration (extras)"
);
not_implemented!(
    interrogate,
    "/sdapi/v1/interrogate",
    "SD-Host has no CLIP/DeepBooru interrogation"
);

// ---------------------------------------------------------------------------------------------------
// `GET /`

/// With `Accept: application/json`: a status JSON (what Draw Things answers there); otherwise the
/// browser UI.
#[utoipa::path(get, path = "/", tag = "a1111",
    responses((status = 200, description = "status JSON, or HTML for a browser")))]
async fn root_status(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    if crate::api::web::wants_page(&axum::http::Method::GET, &headers) {
        return Ok(crate::api::web::index().into_response());
    }
    let es = state.engine.state();
    let current = current_checkpoint(&state).await?;
    let pending = state.repo.list_pending().await?.len();
    let running = state.queue.running();
    let size = current
        .as_ref()
        .map(|m| crate::queue::submit::family_default_size(&m.family))
        .unwrap_or(512);
    Ok(Json(json!({
        "name": "sd-host",
        "version": env!("CARGO_PKG_VERSION"),
        "model": current.as_ref().map(|m| m.filename.clone()),
        "model_hash": current.as_ref().map(|m| m.short_hash.clone()),
        "loaded_model": es.checkpoint.as_ref().map(|c| c.name.clone()),
        "family": current.as_ref().map(|m| m.family.clone()),
        "sampler": "DPM++ 2M",
        "steps": 20,
        "guidance_scale": 7.0,
        "width": size,
        "height": size,
        "seed": -1,
        "batch_size": 1,
        "busy": running.is_some(),
        "queue": {"pending": pending, "running": running.map(|r| r.task_id), "paused": state.queue.is_paused()},
        "api": {"a1111": "/sdapi/v1", "native": "/api/v1", "docs": "/docs"},
    }))
    .into_response())
}
