//! UniPCMultistepScheduler ("UniPC"): solver_order 2, bh2, data prediction, with the
//! UniC corrector applied at every step after the first.

use candle_core::Tensor;

use super::common::{check_index, lin2, multistep_plan, to_f32, TrainSchedule};
use super::dpm::{alpha_sigma, lambda, vp_add_noise, x0_pred};
use super::{Prediction, ScheduleType, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::Result;

const SOLVER_ORDER: usize = 2;

/// The B(h) = expm1(h) coefficient vector b_k = φ_k(h)·k!/B(h) for k = 1..=order (hh = −h).
fn b_coeffs(hh: f64, order: usize) -> (f64, f64, Vec<f64>) {
    let h_phi_1 = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0;
    let b_h = hh.exp_m1();
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    (h_phi_1, b_h, b)
}

pub(crate) struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: Prediction,
    /// Converted (x0) model outputs of the last steps, oldest first.
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
    last_sample: Option<Tensor>,
    this_order: usize,
}

impl UniPc {
    pub fn new(
        train: &TrainSchedule,
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: ScheduleType,
    ) -> Self {
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let (timesteps, sigmas) = multistep_plan(train, spacing, cfg.steps_offset, steps, schedule);
        Self {
            timesteps,
            sigmas,
            prediction: cfg.prediction,
            outputs: Vec::new(),
            lower_order_nums: 0,
            last_sample: None,
            this_order: 1,
        }
    }

    /// UniP: predicts x at sigmas[i+1] from x at sigmas[i] and the stored outputs.
    fn predictor(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let (sigma_t, sigma_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let (alpha_t, sig_t) = alpha_sigma(sigma_t);
        let (_, sig_s0) = alpha_sigma(sigma_s0);
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - lambda_s0;
        let m0 = &self.outputs[self.outputs.len() - 1];
        let (h_phi_1, b_h, _) = b_coeffs(-h, order);
        let x_t = lin2(x, sig_t / sig_s0, m0, -alpha_t * h_phi_1)?;
        if order < 2 {
            return Ok(x_t);
        }
        // order 2: one difference, rho_p = 0.5.
        let rk = (lambda(self.sigmas[i - 1]) - lambda_s0) / h;
        let m1 = &self.outputs[self.outputs.len() - 2];
        let d1 = (m1 - m0)?;
        lin2(&x_t, 1.0, &d1, -alpha_t * b_h * 0.5 / rk)
    }

    /// UniC: corrects the sample at sigmas[i] using this step's output `model_t`.
    fn corrector(&self, model_t: &Tensor, last: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let (sigma_t, sigma_s0) = (self.sigmas[i], self.sigmas[i - 1]);
        let (alpha_t, sig_t) = alpha_sigma(sigma_t);
        let (_, sig_s0) = alpha_sigma(sigma_s0);
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - lambda_s0;
        let m0 = &self.outputs[self.outputs.len() - 1];
        let (h_phi_1, b_h, b) = b_coeffs(-h, order);
        let x_t = lin2(last, sig_t / sig_s0, m0, -alpha_t * h_phi_1)?;
        let d1_t = (model_t - m0)?;
        if order < 2 {
            return lin2(&x_t, 1.0, &d1_t, -alpha_t * b_h * 0.5);
        }
        // Solve [[1, 1], [rk, 1]] · rho = b.
        let rk = (lambda(self.sigmas[i - 2]) - lambda_s0) / h;
        let rho0 = (b[0] - b[1]) / (1.0 - rk);
        let rho1 = b[0] - rho0;
        let m1 = &self.outputs[self.outputs.len() - 2];
        let d1 = (m1 - m0)?;
        let x = lin2(&x_t, 1.0, &d1, -alpha_t * b_h * rho0 / rk)?;
        lin2(&x, 1.0, &d1_t, -alpha_t * b_h * rho1)
    }
}

impl Scheduler for UniPc {
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
        let i = step_index;
        let n = self.timesteps.len();
        check_index(i, n)?;
        let (model_output, mut sample) = (to_f32(model_output)?, to_f32(sample)?);
        let m_t = x0_pred(self.prediction, &model_output, &sample, self.sigmas[i])?;
        if i > 0 {
            if let Some(last) = self.last_sample.take() {
                if !self.outputs.is_empty() {
                    let order = self.this_order.min(self.outputs.len()).min(i);
                    sample = self.corrector(&m_t, &last, i, order)?;
                }
            }
        }
        if self.outputs.len() >= SOLVER_ORDER {
            self.outputs.remove(0);
        }
        self.outputs.push(m_t);
        // lower_order_final: the last step is first order.
        let order = SOLVER_ORDER.min(n - i).min(self.lower_order_nums + 1);
        self.this_order = order;
        self.last_sample = Some(sample.clone());
        let order = order.min(self.outputs.len()).min(i + 1);
        let prev = self.predictor(&sample, i, order)?;
        if self.lower_order_nums < SOLVER_ORDER {
            self.lower_order_nums += 1;
        }
        Ok(prev)
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
