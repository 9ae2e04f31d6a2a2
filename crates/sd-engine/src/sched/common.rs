//! Numeric building blocks shared by the samplers.
//!
//! Parity with diffusers depends on reproducing where it rounds: the training schedule lives in
//! torch float32 tensors, timestep grids come from numpy float64, and the final sigma lists are
//! cast to float32. Sigma values are therefore kept as `f64` numbers that hold float32 values.

use candle_core::{DType, Tensor};

use super::{BetaSchedule, ScheduleType, SchedulerConfig, TimestepSpacing};
use crate::{EngineError, Result};

/// The 1000-step training schedule as diffusers holds it (float32).
#[derive(Debug, Clone)]
pub(crate) struct TrainSchedule {
    /// ᾱ_t, float32 as `torch.cumprod` (float64 accumulator) leaves it.
    pub alphas_cumprod: Vec<f32>,
    /// σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), ascending in t.
    pub sigmas: Vec<f32>,
    /// ln σ_t, float32 like `np.log` of a float32 array.
    pub log_sigmas: Vec<f32>,
}

impl TrainSchedule {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        if n < 2 {
            return Err(EngineError::InvalidParam(format!(
                "num_train_timesteps must be at least 2, got {n}"
            )));
        }
        if !(cfg.beta_start.is_finite()
            && cfg.beta_end.is_finite()
            && cfg.beta_start > 0.0
            && cfg.beta_end < 1.0
            && cfg.beta_start <= cfg.beta_end)
        {
            return Err(EngineError::InvalidParam(format!(
                "invalid beta range {}..{}",
                cfg.beta_start, cfg.beta_end
            )));
        }
        let betas: Vec<f32> = match cfg.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
        };
        // torch.cumprod on CPU accumulates float32 inputs in float64.
        let mut acc = 1f64;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|&b| {
                acc *= f64::from(1f32 - b);
                acc as f32
            })
            .collect();
        let sigmas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|&a| ((1f32 - a) / a).sqrt())
            .collect();
        let log_sigmas = sigmas.iter().map(|&s| f64::from(s).ln() as f32).collect();
        Ok(Self {
            alphas_cumprod,
            sigmas,
            log_sigmas,
        })
    }

    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// ᾱ at an integer timestep, as f64.
    pub fn alpha_cumprod(&self, t: i64) -> Result<f64> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i))
            .map(|&a| f64::from(a))
            .ok_or_else(|| EngineError::InvalidParam(format!("timestep {t} out of range")))
    }

    /// `np.interp(t, arange(N), sigmas)` for each timestep.
    pub fn interp_sigmas(&self, timesteps: &[f64]) -> Vec<f64> {
        let fp: Vec<f64> = self.sigmas.iter().map(|&s| f64::from(s)).collect();
        timesteps.iter().map(|&t| np_interp(t, &fp)).collect()
    }

    /// diffusers' `_sigma_to_t`: the fractional timestep whose log-sigma matches.
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let ls = &self.log_sigmas;
        let log_sigma = sigma.max(1e-10).ln();
        // cumsum(dists >= 0).argmax(): the first index where the running count peaks.
        let (mut count, mut best, mut best_idx) = (0usize, 0usize, 0usize);
        for (i, &l) in ls.iter().enumerate() {
            if log_sigma - f64::from(l) >= 0.0 {
                count += 1;
            }
            if count > best {
                best = count;
                best_idx = i;
            }
        }
        let low_idx = best_idx.min(ls.len() - 2);
        let high_idx = low_idx + 1;
        let low = ls[low_idx];
        let high = ls[high_idx];
        // (low - high) stays float32 in numpy; the rest is float64.
        let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
        (1.0 - w) * low_idx as f64 + w * high_idx as f64
    }
}

/// `torch.linspace(a, b, n, dtype=float32)` on CPU, bit for bit: float32 endpoints and step,
/// each value one fused multiply-add from the nearer end.
pub(crate) fn torch_linspace_f32(a: f64, b: f64, n: usize) -> Vec<f32> {
    let start = a as f32;
    let end = b as f32;
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` (float64).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = if endpoint { num - 1 } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num)
                .map(|i| i as f64 / div as f64 * delta + start)
                .collect()
        } else {
            (0..num).map(|i| i as f64 * step + start).collect()
        }
    } else {
        (0..num).map(|i| i as f64 * delta + start).collect()
    };
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for floats: numpy fills `start + i * (x1 - x0)`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if !(len.is_finite() && len > 0.0) {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let x1 = start + step;
        out.push(x1);
        let delta = x1 - start;
        for i in 2..len {
            out.push(start + i as f64 * delta);
        }
    }
    out
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0];
    }
    let last = (n - 1) as f64;
    if x >= last {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// Float timesteps for the sigma-based samplers (Euler, LMS, Heun, KDPM2), descending,
/// already rounded to float32 as diffusers stores them.
pub(crate) fn float_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let f32r = |v: f64| f64::from(v as f32);
    match spacing {
        TimestepSpacing::Linspace => {
            // np.linspace(..., dtype=float32) computes in float64 and casts.
            let mut t: Vec<f64> = np_linspace(0.0, (num_train - 1) as f64, steps, true)
                .into_iter()
                .map(f32r)
                .collect();
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = num_train / steps;
            (0..steps)
                .rev()
                .map(|i| f32r((i * ratio) as f64) + steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            np_arange(num_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|v| f32r(v.round_ties_even()) - 1.0)
                .collect()
        }
    }
}

/// Karras et al. (2022) sigmas between `sigma_max` and `sigma_min`, rho = 7.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n, true)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log space.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n, true)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Timesteps and sigmas for the Euler-family samplers (`set_timesteps` of EulerDiscrete,
/// LMS, Heun and KDPM2 before their interleaving). `sigmas` has `steps + 1` float32 values,
/// the last one 0.
pub(crate) struct SigmaPlan {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
}

pub(crate) fn sigma_plan(
    train: &TrainSchedule,
    spacing: TimestepSpacing,
    steps_offset: usize,
    steps: usize,
    schedule: ScheduleType,
    round_karras_timesteps: bool,
) -> SigmaPlan {
    let timesteps = float_timesteps(spacing, train.len(), steps, steps_offset);
    let interp = train.interp_sigmas(&timesteps);
    let (timesteps, sigmas) = match schedule {
        ScheduleType::Normal => (timesteps, interp),
        ScheduleType::Karras | ScheduleType::Exponential => {
            let (lo, hi) = (interp[interp.len() - 1], interp[0]);
            let sig = if schedule == ScheduleType::Karras {
                karras_sigmas(lo, hi, steps)
            } else {
                exponential_sigmas(lo, hi, steps)
            };
            let ts = sig
                .iter()
                .map(|&s| {
                    let t = train.sigma_to_t(s);
                    if round_karras_timesteps && schedule == ScheduleType::Karras {
                        t.round_ties_even()
                    } else {
                        f64::from(t as f32)
                    }
                })
                .collect();
            (ts, sig)
        }
    };
    let mut sigmas: Vec<f64> = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
    sigmas.push(0.0);
    SigmaPlan { timesteps, sigmas }
}

/// Integer timesteps of the multistep solvers (DPM-Solver++, UniPC), which space
/// `steps + 1` points and drop the last. Returns (timesteps, sigmas with a final 0).
pub(crate) fn multistep_plan(
    train: &TrainSchedule,
    spacing: TimestepSpacing,
    steps_offset: usize,
    steps: usize,
    schedule: ScheduleType,
) -> (Vec<f64>, Vec<f64>) {
    let n_train = train.len();
    let timesteps: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<i64> = np_linspace(0.0, (n_train - 1) as f64, steps + 1, true)
                .into_iter()
                .map(|v| v.round_ties_even() as i64)
                .collect();
            t.reverse();
            t.truncate(steps);
            t
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            np_arange(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|v| v.round_ties_even() as i64 - 1)
                .collect()
        }
    };
    let train_sigmas: Vec<f64> = train.sigmas.iter().map(|&s| f64::from(s)).collect();
    let (timesteps, sigmas): (Vec<f64>, Vec<f64>) = match schedule {
        ScheduleType::Normal => {
            let t: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
            let s = t.iter().map(|&t| np_interp(t, &train_sigmas)).collect();
            (t, s)
        }
        ScheduleType::Karras | ScheduleType::Exponential => {
            let (lo, hi) = (train_sigmas[0], train_sigmas[n_train - 1]);
            let sig = if schedule == ScheduleType::Karras {
                karras_sigmas(lo, hi, steps)
            } else {
                exponential_sigmas(lo, hi, steps)
            };
            // Karras timesteps are rounded; exponential ones are truncated by the int64 cast.
            let t = sig
                .iter()
                .map(|&s| {
                    let t = train.sigma_to_t(s);
                    if schedule == ScheduleType::Karras {
                        t.round_ties_even()
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            (t, sig)
        }
    };
    let mut sigmas: Vec<f64> = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
    sigmas.push(0.0);
    (timesteps, sigmas)
}

/// Integer timesteps of DDIM-style samplers (DDIM, PNDM's base grid), descending.
pub(crate) fn discrete_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<i64> = np_linspace(0.0, (num_train - 1) as f64, steps, true)
                .into_iter()
                .map(|v| v.round_ties_even() as i64)
                .collect();
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = num_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            np_arange(num_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|v| v.round_ties_even() as i64 - 1)
                .collect()
        }
    }
}

/// `x * a`
pub(crate) fn scale(x: &Tensor, a: f64) -> Result<Tensor> {
    Ok(x.affine(a, 0.0)?)
}

/// `x * a + y * b`
pub(crate) fn lin2(x: &Tensor, a: f64, y: &Tensor, b: f64) -> Result<Tensor> {
    Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?)
}

/// Samplers compute in float32 whatever the caller's latent dtype.
pub(crate) fn to_f32(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?)
}

/// Draws one noise tensor of `like`'s shape through the caller's generator.
pub(crate) fn draw_noise(
    like: &Tensor,
    noise: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = noise(like.dims())?;
    if n.dims() != like.dims() {
        return Err(EngineError::InvalidParam(format!(
            "noise source returned shape {:?}, expected {:?}",
            n.dims(),
            like.dims()
        )));
    }
    Ok(n.to_dtype(DType::F32)?.to_device(like.device())?)
}

/// Checks a step index against the schedule length.
pub(crate) fn check_index(step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        return Err(EngineError::InvalidParam(format!(
            "step index {step_index} out of range for a schedule of {len} timesteps"
        )));
    }
    Ok(())
}

/// Converts an epsilon or v prediction into x0 for the sigma (VE) parametrisation used by
/// the Euler family: x = x0 + σ·ε.
pub(crate) fn ve_pred_x0(
    prediction: super::Prediction,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    match prediction {
        super::Prediction::Epsilon => lin2(sample, 1.0, model_output, -sigma),
        super::Prediction::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(model_output, -sigma / s2.sqrt(), sample, 1.0 / s2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_style_grids() {
        assert_eq!(
            np_linspace(0.0, 1.0, 5, true),
            vec![0.0, 0.25, 0.5, 0.75, 1.0]
        );
        assert_eq!(
            np_linspace(0.0, 50.0, 4, false),
            vec![0.0, 12.5, 25.0, 37.5]
        );
        assert_eq!(np_linspace(3.0, 7.0, 1, true), vec![3.0]);
        let a = np_arange(1000.0, 0.0, -1000.0 / 3.0);
        assert_eq!(a.len(), 3);
        let r: Vec<f64> = np_arange(1000.0, 0.0, -1000.0 / 7.0)
            .into_iter()
            .map(f64::round_ties_even)
            .collect();
        assert_eq!(r, vec![1000.0, 857.0, 714.0, 571.0, 429.0, 286.0, 143.0]);
    }

    #[test]
    fn sd_training_schedule_endpoints() -> Result<()> {
        let t = TrainSchedule::new(&SchedulerConfig::default())?;
        assert_eq!(t.len(), 1000);
        // Known diffusers values for SD's scaled_linear schedule.
        assert!((f64::from(t.sigmas[0]) - 0.029_167_535).abs() < 1e-8);
        assert!((f64::from(t.sigmas[999]) - 14.614_646_9).abs() < 1e-6);
        // sigma_to_t inverts the table at the grid points.
        assert!((t.sigma_to_t(f64::from(t.sigmas[500])) - 500.0).abs() < 1e-3);
        Ok(())
    }

    #[test]
    fn discrete_spacings() {
        assert_eq!(
            discrete_timesteps(TimestepSpacing::Leading, 1000, 4, 1),
            vec![751, 501, 251, 1]
        );
        assert_eq!(
            discrete_timesteps(TimestepSpacing::Linspace, 1000, 4, 1),
            vec![999, 666, 333, 0]
        );
        assert_eq!(
            discrete_timesteps(TimestepSpacing::Trailing, 1000, 4, 1),
            vec![999, 749, 499, 249]
        );
    }
}
