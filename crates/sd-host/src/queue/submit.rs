//! Turning a request into a committed task: validate everything, resolve models and seed, store
//! uploads, insert the row, then wake the dispatcher. Nothing is stored if any check fails.

use serde_json::json;

use super::request::{self, ResolvedLora, TaskParams, TaskRequest};
use super::worker::lora_key;
use super::{task_topic, QueueHandle};
use crate::db::{now_ms, ModelRecord, TaskRecord, TaskStatus};
use crate::error::{ApiError, ApiResult, FieldError};
use crate::state::AppState;

/// A model reference: sha256, or a name / filename (for LoRA tags and A1111 titles).
pub async fn find_model(
    state: &AppState,
    r: &str,
    model_type: &str,
) -> ApiResult<Option<ModelRecord>> {
    if crate::api::extract::is_sha256_hex(r) {
        return Ok(state.repo.get_model(r).await?);
    }
    let all = state
        .repo
        .list_models(&crate::db::ModelFilter {
            model_type: Some(model_type.into()),
            ..Default::default()
        })
        .await?;
    let r_low = r.to_ascii_lowercase();
    Ok(all.into_iter().find(|m| {
        m.name.to_ascii_lowercase() == r_low
            || m.filename.to_ascii_lowercase() == r_low
            || (r.len() >= 10 && m.sha256.starts_with(&r_low))
    }))
}

/// A request's `field` must name a ready model of type `kind` (422 for the wrong type, 409 while
/// it is still downloading).
fn usable(m: &ModelRecord, field_name: &str, kind: &str, what: &str) -> ApiResult<()> {
    if m.model_type != kind {
        return Err(field(
            field_name,
            format!("{} is a {}, not {what}", m.name, m.model_type),
        ));
    }
    if m.status != "ready" {
        return Err(ApiError::Conflict(format!(
            "model {} is not ready yet ({})",
            m.name, m.status
        )));
    }
    Ok(())
}

/// The checkpoint a request without `model` uses.
pub async fn default_checkpoint(state: &AppState) -> ApiResult<Option<ModelRecord>> {
    if let Some(c) = state.engine.state().checkpoint {
        if let Some(m) = state.repo.get_model(&c.sha256).await? {
            return Ok(Some(m));
        }
    }
    if let Some(d) = &state.config.engine.default_checkpoint {
        return find_model(state, d, "checkpoint").await;
    }
    // One checkpoint in the library is unambiguous.
    let all = state
        .repo
        .list_models(&crate::db::ModelFilter {
            model_type: Some("checkpoint".into()),
            ..Default::default()
        })
        .await?;
    let ready: Vec<_> = all.into_iter().filter(|m| m.status == "ready").collect();
    Ok(if ready.len() == 1 {
        ready.into_iter().next()
    } else {
        None
    })
}

/// Image decoding is CPU work: run it on the blocking pool, not on an async worker.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

fn field(loc: &str, msg: impl Into<String>) -> ApiError {
    ApiError::Validation(vec![FieldError::body(loc, msg)])
}

impl QueueHandle {
    /// Validates and commits a task; returns it with its queue position.
    pub async fn submit(
        &self,
        state: &AppState,
        req: TaskRequest,
    ) -> ApiResult<(TaskRecord, usize)> {
        let limits = &state.config.limits;
        request::validate_shape(&req, limits)?;
        let policy = &state.config.network;
        if let Some(cb) = &req.callback_url {
            let url = crate::net::check_url_syntax(cb, policy)
                .map_err(|e| field("callback_url", e.to_string()))?;
            // A public-looking name that resolves to a private address is refused now too
            // (and checked again at delivery). A name that does not resolve yet is allowed.
            if let Err(e @ crate::net::UrlPolicyError::Private(_)) =
                crate::net::resolve_checked(&url, policy).await
            {
                return Err(field("callback_url", e.to_string()));
            }
        }

        // Checkpoint.
        let model = match &req.model {
            Some(sha) => state
                .repo
                .get_model(sha)
                .await?
                .ok_or_else(|| field("model", format!("no model {sha} in the library")))?,
            None => default_checkpoint(state).await?.ok_or_else(|| {
                field(
                    "model",
                    "no model given, none loaded and no engine.default_checkpoint configured",
                )
            })?,
        };
        usable(&model, "model", "checkpoint", "a checkpoint")?;

        // VAE: a library model of type vae, decoding instead of the checkpoint's own.
        let vae = match &req.vae {
            None => None,
            Some(sha) => {
                let m = state
                    .repo
                    .get_model(sha)
                    .await?
                    .ok_or_else(|| field("vae", format!("no model {sha} in the library")))?;
                usable(&m, "vae", "vae", "a VAE")?;
                Some(request::ResolvedVae {
                    sha256: m.sha256,
                    name: m.filename,
                })
            }
        };

        // LoRAs: the request's list, then `<lora:name:weight>` tags from the prompt.
        let (stripped, tags) = sd_engine::text::prompt::extract_lora_tags(&req.prompt);
        if req.loras.len() + tags.len() > request::MAX_LORAS {
            return Err(field(
                "loras",
                format!(
                    "at most {} LoRAs (list and prompt tags together)",
                    request::MAX_LORAS
                ),
            ));
        }
        let mut loras: Vec<ResolvedLora> = Vec::new();
        let mut triggers: Vec<(Vec<String>, f32)> = Vec::new();
        for (i, lr) in req.loras.iter().enumerate() {
            let key = lr
                .sha256
                .as_deref()
                .or(lr.id.as_deref())
                .unwrap_or_default();
            let m = find_model(state, key, "lora")
                .await?
                .filter(|m| m.model_type == "lora" || m.model_type == "lycoris")
                .ok_or_else(|| {
                    field(
                        &format!("loras[{i}]"),
                        format!("no LoRA {key} in the library"),
                    )
                })?;
            if let Some(tw) = lr.trigger_weight {
                triggers.push((trained_words(&m), tw));
            }
            loras.push(ResolvedLora {
                sha256: m.sha256,
                name: m.name,
                weight: lr.weight,
            });
        }
        for t in &tags {
            let m = find_model(state, &t.name, "lora").await?.ok_or_else(|| {
                field(
                    "prompt",
                    format!("no LoRA named {:?} in the library", t.name),
                )
            })?;
            loras.push(ResolvedLora {
                sha256: m.sha256,
                name: m.name,
                weight: t.weight,
            });
        }
        for l in &loras {
            if let Some(m) = state.repo.get_model(&l.sha256).await? {
                if m.family != "unknown" && m.family != model.family {
                    return Err(field(
                        "loras",
                        format!(
                            "LoRA {} is for {}, the checkpoint is {}",
                            m.name, m.family, model.family
                        ),
                    ));
                }
            }
        }
        let mut engine_prompt = stripped;
        for (words, w) in &triggers {
            engine_prompt = sd_engine::text::prompt::add_trigger_words(&engine_prompt, words, *w);
        }

        // Inputs: decoded (and size-checked) now, stored only after every check passed.
        let init = match (&req.init_image, &req.init_image_hash) {
            (Some(url), _) => {
                let (url, l) = (url.clone(), limits.clone());
                Some(off_thread(move || request::decode_data_url("init_image", &url, &l)).await?)
            }
            (None, Some(hash)) => {
                let bytes = state.blobs.get(hash).await.map_err(|_| {
                    field("init_image_hash", format!("no image {hash} in the store"))
                })?;
                let l = limits.clone();
                Some(
                    off_thread(move || {
                        request::decode_image_bytes("init_image_hash", bytes.to_vec(), &l)
                    })
                    .await?,
                )
            }
            (None, None) => None,
        };
        let mask = match &req.mask {
            Some(url) => {
                let (url, l) = (url.clone(), limits.clone());
                Some(off_thread(move || request::decode_data_url("mask", &url, &l)).await?)
            }
            None => None,
        };
        let (width, height) = match &init {
            Some(up) => {
                // img2img keeps the source size, rounded down to the latent grid.
                let (w, h) = (up.image.width() / 8 * 8, up.image.height() / 8 * 8);
                if w == 0 || h == 0 {
                    return Err(field("init_image", "image must be at least 8×8"));
                }
                (req.width.unwrap_or(w), req.height.unwrap_or(h))
            }
            None => {
                let d = family_default_size(&model.family);
                (req.width.unwrap_or(d), req.height.unwrap_or(d))
            }
        };
        if width as u64 * height as u64 > limits.max_pixels {
            return Err(field(
                "width",
                format!("width × height must be at most {}", limits.max_pixels),
            ));
        }
        let pending = state.repo.list_pending().await?.len();
        if pending >= state.config.queue.max_pending {
            return Err(ApiError::Unavailable(format!(
                "queue is full ({pending} pending tasks)"
            )));
        }

        let (scheduler, suffix_type) = match &req.scheduler {
            Some(s) => {
                sd_engine::sched::canonical(s).map_err(|e| field("scheduler", e.to_string()))?
            }
            None => ("DPM++ 2M", None),
        };
        // Resolved to what actually runs, so the infotext never says "Automatic" (which A1111
        // reads as Karras for DPM++ samplers) for an image made with the normal schedule.
        let schedule_type = req
            .schedule_type
            .as_deref()
            .map(|s| s.to_ascii_lowercase())
            .map(|s| {
                if s == "uniform" {
                    "normal".to_string()
                } else {
                    s
                }
            })
            .filter(|s| s != "automatic")
            .or(suffix_type.map(str::to_string))
            .unwrap_or_else(|| "normal".to_string());
        let supported = sd_engine::sched::supported_schedule_types(scheduler)
            .map_err(|e| field("scheduler", e.to_string()))?;
        if !supported.contains(&schedule_type.as_str()) {
            return Err(field(
                "schedule_type",
                format!(
                    "{scheduler} does not support the {schedule_type} schedule; supported: {}",
                    supported.join(", ")
                ),
            ));
        }
        let schedule_type = Some(schedule_type);
        let store_input = |up: &request::Upload| -> ApiResult<String> {
            super::inputs::store(state, &up.bytes).map_err(ApiError::internal)
        };
        let init_sha = init.as_ref().map(store_input).transpose()?;
        let mask_sha = mask.as_ref().map(store_input).transpose()?;
        let params = TaskParams {
            prompt: req.prompt.clone(),
            engine_prompt,
            negative_prompt: req.negative_prompt.clone(),
            model: model.sha256.clone(),
            model_name: model.name.clone(),
            family: model.family.clone(),
            width,
            height,
            num_images: req.num_images.unwrap_or(1),
            num_inference_steps: req.num_inference_steps.unwrap_or(20),
            guidance_scale: req.guidance_scale.unwrap_or(7.0),
            strength: init.as_ref().map(|_| req.strength.unwrap_or(0.75)),
            scheduler: scheduler.to_string(),
            schedule_type,
            seed: request::resolve_seed(req.seed),
            output_format: crate::images::store::normalise_format(
                req.output_format.as_deref().unwrap_or("png"),
            )
            .to_string(),
            loras: loras.clone(),
            clip_skip: req.clip_skip.unwrap_or(1),
            vae,
            init_image: init_sha,
            mask: mask_sha,
            metadata: req.metadata.clone(),
        };
        let now = now_ms();
        let rec = TaskRecord {
            id: uuid::Uuid::new_v4().to_string(),
            seq: 0,
            status: TaskStatus::Pending,
            priority: req.priority,
            model_sha256: Some(model.sha256.clone()),
            lora_key: lora_key(loras.iter().map(|l| (l.sha256.as_str(), l.weight))),
            params: serde_json::to_value(&params).map_err(ApiError::internal)?,
            callback_url: req.callback_url.clone(),
            attempts: 0,
            error_message: None,
            images: vec![],
            created_at: now,
            started_at: None,
            updated_at: now,
            finished_at: None,
        };
        let rec = state.repo.insert_task(&rec).await?;
        state
            .metrics
            .tasks_submitted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let position = self
            .positions(state)
            .await
            .into_iter()
            .find(|(id, _)| *id == rec.id)
            .map(|(_, p)| p)
            .unwrap_or(0);
        state.events.publish(
            &task_topic(&rec.id),
            "queued",
            json!({"task_id": rec.id, "position": position}),
            false,
        );
        self.wake();
        self.publish_snapshot(state);
        Ok((rec, position))
    }
}

/// Civitai trained words kept in a model's source metadata.
pub fn trained_words(m: &ModelRecord) -> Vec<String> {
    m.source
        .as_ref()
        .and_then(|s| s.pointer("/civitai/trained_words"))
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|w| w.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// SPEC §4 default edge by family.
pub fn family_default_size(family: &str) -> u32 {
    match family {
        "sd2" => 768,
        "sdxl" | "flux" | "chroma" | "zimage" => 1024,
        _ => 512,
    }
}
