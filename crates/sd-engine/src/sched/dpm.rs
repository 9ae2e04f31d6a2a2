//! DPMSolverMultistepScheduler with `solver_order=2`, midpoint solver: "DPM++ 2M"
//! (`algorithm_type="dpmsolver++"`) and "DPM++ 2M SDE" (`"sde-dpmsolver++"`).

use candle_core::Tensor;

use super::common::{check_index, draw_noise, lin2, multistep_plan, to_f32, TrainSchedule};
use super::{Prediction, ScheduleType, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::Result;

/// VP coefficients for a sigma: α = 1/sqrt(σ²+1), σ_t = σ·α.
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = ln α − ln σ_t (+∞ at σ = 0).
pub(crate) fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// Data (x0) prediction from a model output at `sigma`.
pub(crate) fn x0_pred(
    prediction: Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    match prediction {
        Prediction::Epsilon => lin2(sample, 1.0 / alpha_t, model_output, -sigma_t / alpha_t),
        Prediction::VPrediction => lin2(sample, alpha_t, model_output, -sigma_t),
    }
}

/// `alpha_t * x0 + sigma_t * noise` at the step's sigma (the VP `add_noise`).
pub(crate) fn vp_add_noise(original: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    lin2(&to_f32(original)?, alpha_t, &to_f32(noise)?, sigma_t)
}

pub(crate) struct DpmSolver {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: Prediction,
    sde: bool,
    /// The previous step's data prediction (solver order 2 keeps one).
    prev_x0: Option<Tensor>,
    lower_order_nums: usize,
}

impl DpmSolver {
    pub fn new(
        train: &TrainSchedule,
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: ScheduleType,
        sde: bool,
    ) -> Self {
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let (timesteps, sigmas) = multistep_plan(train, spacing, cfg.steps_offset, steps, schedule);
        Self {
            timesteps,
            sigmas,
            prediction: cfg.prediction,
            sde,
            prev_x0: None,
            lower_order_nums: 0,
        }
    }
}

impl Scheduler for DpmSolver {
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
        let n = self.timesteps.len();
        check_index(step_index, n)?;
        let (model_output, sample) = (to_f32(model_output)?, to_f32(sample)?);
        // final_sigmas_type "zero" makes the last step first order always; with fewer than
        // 15 steps lower_order_final also affects the second-to-last (a no-op at order 2).
        let lower_order_final = step_index == n - 1;
        let m0 = x0_pred(
            self.prediction,
            &model_output,
            &sample,
            self.sigmas[step_index],
        )?;
        let prev_m = self.prev_x0.replace(m0.clone());
        let noise = if self.sde {
            Some(draw_noise(&sample, noise)?)
        } else {
            None
        };

        let sigma_t = self.sigmas[step_index + 1];
        let sigma_s0 = self.sigmas[step_index];
        let (alpha_t, sig_t) = alpha_sigma(sigma_t);
        let (_, sig_s0) = alpha_sigma(sigma_s0);
        let lambda_t = lambda(sigma_t);
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda_t - lambda_s0;

        let first_order = self.lower_order_nums < 1 || lower_order_final || step_index == 0;
        let prev_m = if first_order { None } else { prev_m };
        let mut x = match (self.sde, &prev_m) {
            (false, None) => lin2(&sample, sig_t / sig_s0, &m0, -alpha_t * ((-h).exp() - 1.0))?,
            (true, None) => lin2(
                &sample,
                sig_t / sig_s0 * (-h).exp(),
                &m0,
                alpha_t * (1.0 - (-2.0 * h).exp()),
            )?,
            (sde, Some(m1)) => {
                let sigma_s1 = self.sigmas[step_index - 1];
                let h_0 = lambda_s0 - lambda(sigma_s1);
                let r0 = h_0 / h;
                // D1 = (m0 - m1) / r0
                let d1 = (&m0 - m1)?;
                if !sde {
                    let c = alpha_t * ((-h).exp() - 1.0);
                    let x = lin2(&sample, sig_t / sig_s0, &m0, -c)?;
                    lin2(&x, 1.0, &d1, -0.5 * c / r0)?
                } else {
                    let c = alpha_t * (1.0 - (-2.0 * h).exp());
                    let x = lin2(&sample, sig_t / sig_s0 * (-h).exp(), &m0, c)?;
                    lin2(&x, 1.0, &d1, 0.5 * c / r0)?
                }
            }
        };
        if let Some(noise) = noise {
            let c = sig_t * (1.0 - (-2.0 * h).exp()).sqrt();
            x = lin2(&x, 1.0, &noise, c)?;
        }
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        Ok(x)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        vp_add_noise(original, noise, self.sigmas[step_index])
    }

    fn order(&self) -> usize {
        1
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}
