//! LCMScheduler ("LCM"): latent consistency sampling; each step predicts the clean sample
//! and re-noises it to the next timestep with fresh noise.

use candle_core::Tensor;

use super::common::{check_index, draw_noise, lin2, np_linspace, to_f32, TrainSchedule};
use super::ddim::{alpha_add_noise, alpha_pred};
use super::{Prediction, Scheduler, SchedulerConfig};
use crate::{EngineError, Result};

/// diffusers' `original_inference_steps` default: the distillation's 50-step grid.
const ORIGINAL_STEPS: usize = 50;
/// `timestep_scaling`.
const TIMESTEP_SCALING: f64 = 10.0;
const SIGMA_DATA: f64 = 0.5;

pub(crate) struct Lcm {
    train: TrainSchedule,
    int_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    final_alpha_cumprod: f64,
    prediction: Prediction,
    clip_sample: bool,
}

impl Lcm {
    pub fn new(train: TrainSchedule, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        if steps > ORIGINAL_STEPS {
            return Err(EngineError::InvalidParam(format!(
                "LCM supports at most {ORIGINAL_STEPS} steps, got {steps}"
            )));
        }
        let k = (train.len() / ORIGINAL_STEPS) as i64;
        // The distillation grid, descending: 999, 979, …, 19 for 1000 training steps.
        let origin: Vec<i64> = (1..=ORIGINAL_STEPS as i64)
            .rev()
            .map(|j| j * k - 1)
            .collect();
        let int_timesteps: Vec<i64> = np_linspace(0.0, origin.len() as f64, steps, false)
            .into_iter()
            .map(|v| origin[(v.floor() as usize).min(origin.len() - 1)])
            .collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            f64::from(train.alphas_cumprod[0])
        };
        Ok(Self {
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            train,
            final_alpha_cumprod,
            prediction: cfg.prediction,
            clip_sample: cfg.clip_sample,
        })
    }
}

impl Scheduler for Lcm {
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
        noise: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let i = step_index;
        let n = self.int_timesteps.len();
        check_index(i, n)?;
        let (model_output, sample) = (to_f32(model_output)?, to_f32(sample)?);
        let t = self.int_timesteps[i];
        let prev_t = if i + 1 < n {
            self.int_timesteps[i + 1]
        } else {
            t
        };
        let alpha_prod_t = self.train.alpha_cumprod(t)?;
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.train.alpha_cumprod(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        // Consistency-model boundary condition scalings.
        let scaled = t as f64 * TIMESTEP_SCALING;
        let sd2 = SIGMA_DATA * SIGMA_DATA;
        let c_skip = sd2 / (scaled * scaled + sd2);
        let c_out = scaled / (scaled * scaled + sd2).sqrt();
        let (mut x0, _) = alpha_pred(self.prediction, &model_output, &sample, alpha_prod_t)?;
        if self.clip_sample {
            x0 = x0.clamp(-1f32, 1f32)?;
        }
        let denoised = lin2(&x0, c_out, &sample, c_skip)?;
        if i == n - 1 {
            return Ok(denoised);
        }
        let z = draw_noise(&denoised, noise)?;
        lin2(
            &denoised,
            alpha_prod_t_prev.sqrt(),
            &z,
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
