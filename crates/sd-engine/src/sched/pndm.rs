//! PNDMScheduler ("PLMS") with `skip_prk_steps=True`, as every SD scheduler config sets it:
//! pseudo linear multistep with up to four stored model outputs.

use candle_core::Tensor;

use super::common::{check_index, discrete_timesteps, lin2, to_f32, TrainSchedule};
use super::ddim::alpha_add_noise;
use super::{Prediction, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::Result;

pub(crate) struct Pndm {
    train: TrainSchedule,
    int_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    step_ratio: i64,
    final_alpha_cumprod: f64,
    prediction: Prediction,
    /// Stored model outputs, oldest first (at most 4).
    ets: Vec<Tensor>,
    counter: usize,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn new(train: TrainSchedule, cfg: &SchedulerConfig, steps: usize) -> Self {
        let spacing = cfg.spacing_or(TimestepSpacing::Leading);
        // Ascending base grid, then the PLMS list repeats the second-to-last entry (the first
        // step is taken twice to warm up) and runs descending.
        let mut base = discrete_timesteps(spacing, train.len(), steps, cfg.steps_offset);
        base.reverse();
        let n = base.len();
        let mut plms: Vec<i64> = base[..n - 1].to_vec();
        if n >= 2 {
            plms.push(base[n - 2]);
        }
        plms.push(base[n - 1]);
        plms.reverse();
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            f64::from(train.alphas_cumprod[0])
        };
        Self {
            timesteps: plms.iter().map(|&t| t as f64).collect(),
            int_timesteps: plms,
            step_ratio: (train.len() / steps) as i64,
            train,
            final_alpha_cumprod,
            prediction: cfg.prediction,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        }
    }

    /// Formula (9) of the PNDM paper: x_t → x_{t-δ} given an ε estimate.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let a_t = self.train.alpha_cumprod(t)?;
        let a_prev = if prev_t >= 0 {
            self.train.alpha_cumprod(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let eps = match self.prediction {
            Prediction::Epsilon => model_output.clone(),
            Prediction::VPrediction => lin2(model_output, a_t.sqrt(), sample, b_t.sqrt())?,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        lin2(sample, sample_coeff, &eps, -(a_prev - a_t) / denom)
    }
}

impl Scheduler for Pndm {
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
        let (model_output, mut sample) = (to_f32(model_output)?, to_f32(sample)?);
        let mut t = self.int_timesteps[step_index];
        let mut prev_t = t - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += self.step_ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let eps = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output
        } else if k == 1 && self.counter == 1 {
            if let Some(s) = self.cur_sample.take() {
                sample = s;
            }
            lin2(&model_output, 0.5, &e[0], 0.5)?
        } else if k == 2 {
            lin2(&e[1], 1.5, &e[0], -0.5)?
        } else if k == 3 {
            let a = lin2(&e[2], 23.0 / 12.0, &e[1], -16.0 / 12.0)?;
            lin2(&a, 1.0, &e[0], 5.0 / 12.0)?
        } else {
            let a = lin2(&e[3], 55.0 / 24.0, &e[2], -59.0 / 24.0)?;
            let b = lin2(&e[1], 37.0 / 24.0, &e[0], -9.0 / 24.0)?;
            (a + b)?
        };
        let prev = self.prev_sample(&sample, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        alpha_add_noise(&self.train, original, noise, self.int_timesteps[step_index])
    }

    fn order(&self) -> usize {
        1
    }
}
