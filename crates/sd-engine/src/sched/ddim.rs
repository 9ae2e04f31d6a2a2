//! DDIMScheduler ("DDIM"), deterministic (eta = 0, as the SD pipelines default to).

use candle_core::Tensor;

use super::common::{check_index, discrete_timesteps, lin2, scale, to_f32, TrainSchedule};
use super::{Prediction, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::Result;

/// x0 and ε from a model output at ᾱ_t (shared by DDIM, PNDM and LCM).
pub(crate) fn alpha_pred(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f64,
) -> Result<(Tensor, Tensor)> {
    let beta_prod_t = 1.0 - alpha_prod_t;
    let (sa, sb) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
    match prediction {
        Prediction::Epsilon => {
            let x0 = scale(&lin2(sample, 1.0, model_output, -sb)?, 1.0 / sa)?;
            Ok((x0, model_output.clone()))
        }
        Prediction::VPrediction => {
            let x0 = lin2(sample, sa, model_output, -sb)?;
            let eps = lin2(model_output, sa, sample, sb)?;
            Ok((x0, eps))
        }
    }
}

/// q(x_t | x0) for an integer timestep.
pub(crate) fn alpha_add_noise(
    train: &TrainSchedule,
    original: &Tensor,
    noise: &Tensor,
    t: i64,
) -> Result<Tensor> {
    let a = train.alpha_cumprod(t)?;
    lin2(
        &to_f32(original)?,
        a.sqrt(),
        &to_f32(noise)?,
        (1.0 - a).sqrt(),
    )
}

pub(crate) struct Ddim {
    train: TrainSchedule,
    int_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    step_ratio: i64,
    final_alpha_cumprod: f64,
    prediction: Prediction,
    clip_sample: bool,
}

impl Ddim {
    pub fn new(train: TrainSchedule, cfg: &SchedulerConfig, steps: usize) -> Self {
        let spacing = cfg.spacing_or(TimestepSpacing::Leading);
        let int_timesteps = discrete_timesteps(spacing, train.len(), steps, cfg.steps_offset);
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            f64::from(train.alphas_cumprod[0])
        };
        Self {
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            // diffusers steps back by N // steps whatever the spacing.
            step_ratio: (train.len() / steps) as i64,
            int_timesteps,
            train,
            final_alpha_cumprod,
            prediction: cfg.prediction,
            clip_sample: cfg.clip_sample,
        }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        to_f32(sample)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let (model_output, sample) = (to_f32(model_output)?, to_f32(sample)?);
        let t = self.int_timesteps[step_index];
        let prev_t = t - self.step_ratio;
        let alpha_prod_t = self.train.alpha_cumprod(t)?;
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.train.alpha_cumprod(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let (mut x0, eps) = alpha_pred(self.prediction, &model_output, &sample, alpha_prod_t)?;
        if self.clip_sample {
            x0 = x0.clamp(-1f32, 1f32)?;
        }
        lin2(
            &x0,
            alpha_prod_t_prev.sqrt(),
            &eps,
            (1.0 - alpha_prod_t_prev).sqrt(),
        )
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        alpha_add_noise(&self.train, original, noise, self.int_timesteps[step_index])
    }

    fn order(&self) -> usize {
        1
    }
}
