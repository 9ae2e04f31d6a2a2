//! KDPM2DiscreteScheduler ("DPM2") and KDPM2AncestralDiscreteScheduler ("DPM2 a"):
//! k-diffusion's DPM-Solver-2, a midpoint method in log-sigma with two model evaluations
//! per step, so the timestep list interleaves the midpoint timesteps.

use candle_core::Tensor;

use super::common::{
    check_index, draw_noise, lin2, scale, sigma_plan, to_f32, ve_pred_x0, TrainSchedule,
};
use super::{Prediction, ScheduleType, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::{EngineError, Result};

/// exp(lerp(ln a, ln b, 0.5)) in float32 as torch computes it (weight 0.5 takes the
/// `end - (end - start) * 0.5` branch; ln 0 = -inf gives 0 or NaN exactly as there).
fn log_midpoint(a: f32, b: f32) -> f32 {
    let (la, lb) = (a.ln(), b.ln());
    (lb - (lb - la) * 0.5).exp()
}

/// diffusers' `cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`.
fn interleave(x: &[f64]) -> Vec<f64> {
    let mut out = vec![x[0]];
    for &v in &x[1..] {
        out.push(v);
        out.push(v);
    }
    out.push(x[x.len() - 1]);
    out
}

pub(crate) struct Kdpm2 {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    sigmas_interpol: Vec<f64>,
    /// Ancestral only.
    sigmas_up: Vec<f64>,
    sigmas_down: Vec<f64>,
    init_sigma: f64,
    prediction: Prediction,
    ancestral: bool,
    /// The first-stage input while the second stage is pending.
    first_sample: Option<Tensor>,
}

impl Kdpm2 {
    pub fn new(
        train: &TrainSchedule,
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: ScheduleType,
        ancestral: bool,
    ) -> Self {
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let plan = sigma_plan(train, spacing, cfg.steps_offset, steps, schedule, true);
        let s: Vec<f32> = plan.sigmas.iter().map(|&v| v as f32).collect();
        let n = s.len(); // steps + 1, last is 0
        let (mut up, mut down) = (vec![0f32; n], vec![0f32; n]);
        let interpol: Vec<f32> = if ancestral {
            for k in 0..n {
                let next = if k + 1 < n { s[k + 1] } else { 0.0 };
                let (s2, n2) = (s[k] * s[k], next * next);
                up[k] = (n2 * (s2 - n2) / s2).sqrt();
                down[k] = (n2 - up[k] * up[k]).sqrt();
            }
            down[n - 1] = 0.0;
            let mut si: Vec<f32> = (0..n).map(|k| log_midpoint(s[k], down[k])).collect();
            for v in si.iter_mut().skip(n.saturating_sub(2)) {
                *v = 0.0;
            }
            si
        } else {
            // Midpoint between each sigma and the previous one (roll(1)).
            (0..n)
                .map(|k| log_midpoint(s[k], s[(k + n - 1) % n]))
                .collect()
        };
        let to64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let karras = schedule == ScheduleType::Karras;
        let t_interp: Vec<f64> = interpol
            .iter()
            .map(|&v| {
                let t = train.sigma_to_t(f64::from(v));
                // Karras timesteps are float64 there; the others float32.
                if karras {
                    t
                } else {
                    f64::from(t as f32)
                }
            })
            .collect();
        let t = &plan.timesteps;
        let mut timesteps = vec![t[0]];
        for k in 1..t.len() {
            // Non-ancestral pairs (interp[k], t[k]); ancestral (interp[k-1], t[k]).
            timesteps.push(if ancestral {
                t_interp[k - 1]
            } else {
                t_interp[k]
            });
            timesteps.push(t[k]);
        }
        let sigmas = interleave(&to64(&s));
        let max = sigmas.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let init_sigma = match spacing {
            TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt() as f32),
            _ => max,
        };
        Self {
            timesteps,
            sigmas,
            sigmas_interpol: interleave(&to64(&interpol)),
            sigmas_up: interleave(&to64(&up)),
            sigmas_down: interleave(&to64(&down)),
            init_sigma,
            prediction: cfg.prediction,
            ancestral,
            first_sample: None,
        }
    }
}

impl Scheduler for Kdpm2 {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let sigma = match (&self.first_sample, self.ancestral) {
            (None, _) => self.sigmas[step_index],
            (Some(_), false) => self.sigmas_interpol[step_index],
            (Some(_), true) => self.sigmas_interpol[step_index.saturating_sub(1)],
        };
        scale(&to_f32(sample)?, 1.0 / (sigma * sigma + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let i = step_index;
        check_index(i, self.timesteps.len())?;
        let (model_output, sample) = (to_f32(model_output)?, to_f32(sample)?);
        match self.first_sample.take() {
            None => {
                let sigma = self.sigmas[i];
                let sigma_interpol = if self.ancestral {
                    self.sigmas_interpol[i]
                } else {
                    self.sigmas_interpol[i + 1]
                };
                let x0 = ve_pred_x0(self.prediction, &model_output, &sample, sigma)?;
                let derivative = scale(&(&sample - &x0)?, 1.0 / sigma)?;
                let prev = lin2(&sample, 1.0, &derivative, sigma_interpol - sigma)?;
                self.first_sample = Some(sample);
                Ok(prev)
            }
            Some(first) => {
                if i == 0 {
                    return Err(EngineError::InvalidParam(
                        "DPM2 second stage cannot be step 0".to_string(),
                    ));
                }
                let sigma = self.sigmas[i - 1];
                let (sigma_interpol, target) = if self.ancestral {
                    (self.sigmas_interpol[i - 1], self.sigmas_down[i - 1])
                } else {
                    (self.sigmas_interpol[i], self.sigmas[i])
                };
                let x0 = ve_pred_x0(self.prediction, &model_output, &sample, sigma_interpol)?;
                let derivative = scale(&(&sample - &x0)?, 1.0 / sigma_interpol)?;
                let prev = lin2(&first, 1.0, &derivative, target - sigma)?;
                if !self.ancestral {
                    return Ok(prev);
                }
                let n = draw_noise(&prev, noise)?;
                lin2(&prev, 1.0, &n, self.sigmas_up[i - 1])
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
