//! LMSDiscreteScheduler ("LMS"): linear multistep over up to four past derivatives, with
//! coefficients integrated from the Lagrange basis in sigma.

use candle_core::Tensor;

use super::common::{check_index, lin2, scale, sigma_plan, to_f32, ve_pred_x0, TrainSchedule};
use super::{Prediction, ScheduleType, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::Result;

const MAX_ORDER: usize = 4;

pub(crate) struct Lms {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_sigma: f64,
    prediction: Prediction,
    /// Past derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn new(
        train: &TrainSchedule,
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: ScheduleType,
    ) -> Self {
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let plan = sigma_plan(train, spacing, cfg.steps_offset, steps, schedule, false);
        let max = plan
            .sigmas
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        let init_sigma = match spacing {
            TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt() as f32),
            _ => max,
        };
        Self {
            timesteps: plan.timesteps,
            sigmas: plan.sigmas,
            init_sigma,
            prediction: cfg.prediction,
            derivatives: Vec::new(),
        }
    }

    /// ∫_{σ_t}^{σ_{t+1}} ∏_{k≠current} (τ − σ_{t−k}) / (σ_{t−current} − σ_{t−k}) dτ.
    /// The integrand is a polynomial of degree < 4, so 3-point Gauss–Legendre is exact.
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = &self.sigmas;
        let basis = |tau: f64| {
            let mut prod = 1.0;
            for k in 0..order {
                if k == current {
                    continue;
                }
                prod *= (tau - s[t - k]) / (s[t - current] - s[t - k]);
            }
            prod
        };
        let (a, b) = (s[t], s[t + 1]);
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let node = (3.0f64 / 5.0).sqrt();
        half * (5.0 / 9.0 * basis(mid - half * node)
            + 8.0 / 9.0 * basis(mid)
            + 5.0 / 9.0 * basis(mid + half * node))
    }
}

impl Scheduler for Lms {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        scale(&to_f32(sample)?, 1.0 / (sigma * sigma + 1.0).sqrt())
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
        let sigma = self.sigmas[step_index];
        let x0 = ve_pred_x0(self.prediction, &model_output, &sample, sigma)?;
        let derivative = scale(&(&sample - &x0)?, 1.0 / sigma)?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > MAX_ORDER {
            self.derivatives.remove(0);
        }
        // diffusers takes the order from the step index (not from how many derivatives it
        // holds) and zips the coefficients with the derivatives it has, newest first.
        let order = (step_index + 1).min(MAX_ORDER);
        let mut prev = sample;
        for (current, d) in (0..order).zip(self.derivatives.iter().rev()) {
            let c = self.coefficient(order, step_index, current);
            prev = lin2(&prev, 1.0, d, c)?;
        }
        Ok(prev)
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
