//! EulerDiscreteScheduler ("Euler"), EulerAncestralDiscreteScheduler ("Euler a") and
//! HeunDiscreteScheduler ("Heun"): Karras-style ODE steps in sigma space.

use candle_core::Tensor;

use super::common::{
    check_index, draw_noise, lin2, scale, sigma_plan, to_f32, ve_pred_x0, TrainSchedule,
};
use super::{Prediction, ScheduleType, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::Result;

/// `init_noise_sigma` of the sigma-based samplers: σ_max, or sqrt(σ_max² + 1) with "leading"
/// spacing (whose first timestep is not the last training step).
fn init_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt() as f32),
    }
}

/// x / sqrt(σ² + 1)
fn scale_in(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    scale(&to_f32(sample)?, 1.0 / (sigma * sigma + 1.0).sqrt())
}

pub(crate) struct Euler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_sigma: f64,
    prediction: Prediction,
    ancestral: bool,
}

impl Euler {
    pub fn new(
        train: &TrainSchedule,
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: ScheduleType,
        ancestral: bool,
    ) -> Self {
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let plan = sigma_plan(train, spacing, cfg.steps_offset, steps, schedule, false);
        Self {
            init_sigma: init_sigma(&plan.sigmas, spacing),
            timesteps: plan.timesteps,
            sigmas: plan.sigmas,
            prediction: cfg.prediction,
            ancestral,
        }
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        scale_in(sample, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let (model_output, sample) = (to_f32(model_output)?, to_f32(sample)?);
        let sigma = self.sigmas[step_index];
        let sigma_next = self.sigmas[step_index + 1];
        let x0 = ve_pred_x0(self.prediction, &model_output, &sample, sigma)?;
        let derivative = scale(&(&sample - &x0)?, 1.0 / sigma)?;
        if !self.ancestral {
            return lin2(&sample, 1.0, &derivative, sigma_next - sigma);
        }
        let (s_from, s_to) = (sigma, sigma_next);
        let sigma_up = (s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from)).sqrt();
        let sigma_down = (s_to * s_to - sigma_up * sigma_up).max(0.0).sqrt();
        let prev = lin2(&sample, 1.0, &derivative, sigma_down - sigma)?;
        // diffusers draws noise on every step, the last included.
        let n = draw_noise(&prev, noise)?;
        lin2(&prev, 1.0, &n, sigma_up)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        lin2(
            &to_f32(original)?,
            1.0,
            &to_f32(noise)?,
            self.sigmas[step_index],
        )
    }

    fn order(&self) -> usize {
        1
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}

/// Heun's second-order method: every step but the last takes two model evaluations, so the
/// timestep list interleaves each timestep twice (`2*steps - 1` entries).
pub(crate) struct Heun {
    timesteps: Vec<f64>,
    /// Interleaved like diffusers: [σ0, σ1, σ1, σ2, σ2, …, 0].
    sigmas: Vec<f64>,
    init_sigma: f64,
    prediction: Prediction,
    /// First-stage derivative, dt and sample while the second stage is pending.
    pending: Option<(Tensor, f64, Tensor)>,
}

impl Heun {
    pub fn new(
        train: &TrainSchedule,
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: ScheduleType,
    ) -> Self {
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let plan = sigma_plan(train, spacing, cfg.steps_offset, steps, schedule, false);
        let s = &plan.sigmas;
        let mut sigmas = vec![s[0]];
        for &v in &s[1..s.len() - 1] {
            sigmas.push(v);
            sigmas.push(v);
        }
        sigmas.push(s[s.len() - 1]);
        let t = &plan.timesteps;
        let mut timesteps = vec![t[0]];
        for &v in &t[1..] {
            timesteps.push(v);
            timesteps.push(v);
        }
        Self {
            init_sigma: init_sigma(&sigmas, spacing),
            timesteps,
            sigmas,
            prediction: cfg.prediction,
            pending: None,
        }
    }
}

impl Scheduler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        scale_in(sample, self.sigmas[step_index])
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
        match self.pending.take() {
            None => {
                let sigma = self.sigmas[step_index];
                let sigma_next = self.sigmas[step_index + 1];
                let x0 = ve_pred_x0(self.prediction, &model_output, &sample, sigma)?;
                let derivative = scale(&(&sample - &x0)?, 1.0 / sigma)?;
                let dt = sigma_next - sigma;
                let prev = lin2(&sample, 1.0, &derivative, dt)?;
                self.pending = Some((derivative, dt, sample));
                Ok(prev)
            }
            Some((prev_derivative, dt, first_sample)) => {
                // The second stage evaluates at the next sigma of the pair.
                let sigma_next = self.sigmas[step_index];
                let x0 = ve_pred_x0(self.prediction, &model_output, &sample, sigma_next)?;
                let derivative = scale(&(&sample - &x0)?, 1.0 / sigma_next)?;
                let avg = lin2(&prev_derivative, 0.5, &derivative, 0.5)?;
                lin2(&first_sample, 1.0, &avg, dt)
            }
        }
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        lin2(
            &to_f32(original)?,
            1.0,
            &to_f32(noise)?,
            self.sigmas[step_index],
        )
    }

    fn order(&self) -> usize {
        2
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}
