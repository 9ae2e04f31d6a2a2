//! CPU kernels shared by the UNet and the VAE, and a tiny opt-in profiler ([`prof`]).
//!
//! On CPU with f32 tensors every layer here runs as: one output buffer, pre-filled with what is
//! added to the product (bias, per-image channel bias, residual), then one GEMM (the `gemm`
//! crate, both cores) that accumulates straight into it, so there are no separate bias/residual
//! passes, no result copies and no layout copies for NCHW ↔ token-sequence changes (the GEMM
//! reads and writes strided views). Other devices and dtypes fall back to candle's ops.
//!
//! - [`Conv2d`]: 1×1 convs are a GEMM on the input in place; k×k convs go through im2col in
//!   bands of output rows (both cores fill the band, the buffer is reused), one GEMM per band
//!   writing the band's slice of every output channel.
//! - [`Linear`]: `x·Wᵀ (+ bias) (+ residual)`, also straight from / into NCHW tensors.
//! - [`GroupNorm`] (+ SiLU), [`LayerNorm`], [`geglu`]: one parallel pass each.

use candle_core::{CpuStorage, DType, Device, Module, Shape, Storage, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use crate::{EngineError, Result};

/// Opt-in wall-time accounting per operation kind, enabled by `SD_ENGINE_PROFILE=1`.
///
/// Costs one cached flag check per scope when disabled. Scopes should not nest (times are
/// summed per name, not made exclusive).
pub mod prof {
    use std::collections::BTreeMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;

    static ENABLED: OnceLock<bool> = OnceLock::new();
    static TABLE: Mutex<BTreeMap<&'static str, (u64, f64)>> = Mutex::new(BTreeMap::new());

    pub fn enabled() -> bool {
        *ENABLED.get_or_init(|| std::env::var_os("SD_ENGINE_PROFILE").is_some_and(|v| v != "0"))
    }

    /// Adds the time until drop to `name`.
    pub struct Scope {
        name: &'static str,
        start: Option<Instant>,
    }

    pub fn scope(name: &'static str) -> Scope {
        Scope {
            name,
            start: enabled().then(Instant::now),
        }
    }

    impl Drop for Scope {
        fn drop(&mut self) {
            if let Some(t) = self.start {
                let dt = t.elapsed().as_secs_f64();
                if let Ok(mut m) = TABLE.lock() {
                    let e = m.entry(self.name).or_insert((0, 0.0));
                    e.0 += 1;
                    e.1 += dt;
                }
            }
        }
    }

    pub fn reset() {
        if let Ok(mut m) = TABLE.lock() {
            m.clear();
        }
    }

    /// One line per name, slowest first (empty when profiling is off).
    pub fn report() -> String {
        let Ok(m) = TABLE.lock() else {
            return String::new();
        };
        let total: f64 = m.values().map(|v| v.1).sum();
        let mut rows: Vec<_> = m.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let mut out = String::new();
        for (name, (calls, secs)) in rows {
            out.push_str(&format!(
                "  {name:<22} {calls:>6} calls {secs:>8.3} s {:>5.1} %\n",
                100.0 * secs / total.max(1e-12)
            ));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn bad(msg: String) -> EngineError {
    EngineError::InvalidParam(msg)
}

fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Runs `f` on the data of a contiguous f32 CPU tensor; `None` for any other tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !is_cpu_f32(t) {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let (a, b) = layout.contiguous_offsets()?;
    Some(f(&data[a..b]))
}

/// Read access to the data of a contiguous f32 CPU tensor (holds its storage lock).
struct F32View<'a> {
    guard: candle_core::StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl<'a> F32View<'a> {
    fn new(t: &'a Tensor) -> Option<Self> {
        if !is_cpu_f32(t) {
            return None;
        }
        let (guard, layout) = t.storage_and_layout();
        let (a, b) = layout.contiguous_offsets()?;
        Some(Self { guard, range: a..b })
    }

    fn data(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(d)) => &d[self.range.clone()],
            _ => &[],
        }
    }
}

/// A CPU tensor owning `v`.
fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Host copy of a small CPU tensor (bias, norm weights); `None` elsewhere.
fn host_vec(t: &Tensor) -> Option<Vec<f32>> {
    if t.device().is_cpu() {
        t.to_dtype(DType::F32)
            .ok()?
            .flatten_all()
            .ok()?
            .to_vec1()
            .ok()
    } else {
        None
    }
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a function whose body is compiled twice, for baseline x86-64 and for AVX2+FMA, and
/// runs the latter when the CPU has them: the crate is built for baseline x86-64, where these
/// elementwise loops vectorise only 4 wide and without FMA.
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx($($arg: $ty),*) {
                    imp($($arg),*)
                }
                if has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked).
                    return unsafe { avx($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Rows handed to one rayon task at least (keeps scheduling overhead small).
const MIN_ROWS_PER_TASK: usize = 8;

/// Reusable scratch buffers for kernel-internal temporaries (im2col bands, Winograd tiles and
/// kernels). Fresh large allocations are mmapped by the allocator and fault every page in on
/// each call (hundreds of thousands of faults per UNet step at 512 px); pooled ones do not.
/// Contents are stale: every user overwrites what it reads.
mod scratch {
    use std::ops::{Deref, DerefMut};
    use std::sync::Mutex;

    static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
    /// Bytes the idle pool may hold; buffers returned beyond it are freed.
    const POOL_MAX_BYTES: usize = 384 << 20;

    pub(super) struct Scratch {
        buf: Vec<f32>,
        len: usize,
    }

    /// A buffer of at least `len` values (best fit from the pool, else a new one).
    pub(super) fn take(len: usize) -> Scratch {
        let buf = match POOL.lock() {
            Ok(mut pool) => {
                let best = pool
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.len() >= len)
                    .min_by_key(|(_, b)| b.len())
                    .map(|(i, _)| i);
                best.map(|i| pool.swap_remove(i))
            }
            Err(_) => None,
        };
        Scratch {
            buf: buf.unwrap_or_else(|| vec![0f32; len]),
            len,
        }
    }

    /// Frees every idle buffer.
    pub fn release() {
        if let Ok(mut pool) = POOL.lock() {
            pool.clear();
        }
    }

    impl Deref for Scratch {
        type Target = [f32];
        fn deref(&self) -> &[f32] {
            &self.buf[..self.len]
        }
    }

    impl DerefMut for Scratch {
        fn deref_mut(&mut self) -> &mut [f32] {
            &mut self.buf[..self.len]
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let buf = std::mem::take(&mut self.buf);
            if let Ok(mut pool) = POOL.lock() {
                let held: usize = pool.iter().map(|b| b.len() * 4).sum();
                if held + buf.len() * 4 <= POOL_MAX_BYTES {
                    pool.push(buf);
                }
            }
        }
    }
}

/// Frees the kernels' idle scratch buffers (they are otherwise kept for the next call).
pub fn release_scratch() {
    scratch::release();
}

// ---------------------------------------------------------------------------------------------
// GEMM.

/// A read-only strided matrix: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// One past the largest index a `rows × cols` view with these strides touches (0 if empty).
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?
        .checked_add(1)
}

/// `dst = [dst +] lhs · rhs` for `lhs` `m × k`, `rhs` `k × n`, `dst` `m × n` with row stride
/// `dst_rs` and column stride `dst_cs`, on all of candle's CPU threads.
///
/// Every view is bounds-checked, and `dst`'s elements must be distinct (one of its strides
/// at least the extent of the other dimension), so the parallel GEMM cannot race.
pub(crate) fn sgemm(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) -> Result<()> {
    sgemm_impl(dims, dst, dst_strides, accumulate, lhs, rhs, true)
}

/// [`sgemm`] on the calling thread only (for callers that run independent GEMMs in parallel).
pub(crate) fn sgemm_single(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) -> Result<()> {
    sgemm_impl(dims, dst, dst_strides, accumulate, lhs, rhs, false)
}

fn sgemm_impl(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    parallel: bool,
) -> Result<()> {
    let distinct = (dst_cs >= 1 && dst_rs >= n.saturating_mul(dst_cs))
        || (dst_rs >= 1 && dst_cs >= m.saturating_mul(dst_rs))
        || m <= 1 && dst_cs >= 1
        || n <= 1 && dst_rs >= 1;
    let fits = |len: usize, s: Option<usize>| s.is_some_and(|s| s <= len);
    if !distinct
        || !fits(dst.len(), span(m, n, dst_rs, dst_cs))
        || !fits(lhs.data.len(), span(m, k, lhs.rs, lhs.cs))
        || !fits(rhs.data.len(), span(k, n, rhs.rs, rhs.cs))
    {
        return Err(bad(format!(
            "gemm {m}×{k}·{k}×{n}: views out of bounds (dst {} strides {dst_rs}/{dst_cs}, \
             lhs {} strides {}/{}, rhs {} strides {}/{})",
            dst.len(),
            lhs.data.len(),
            lhs.rs,
            lhs.cs,
            rhs.data.len(),
            rhs.rs,
            rhs.cs
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = 0.0;
                }
            }
        }
        return Ok(());
    }
    let t = if parallel { threads() } else { 1 };
    let work = m.saturating_mul(n).saturating_mul(k);
    let parallelism = if t > 1 && work >= PAR_MIN_WORK {
        gemm::Parallelism::Rayon(t)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the GEMM reads or writes was checked to lie inside its slice above;
    // the destination's elements are pairwise distinct, and `dst` (a unique borrow) cannot
    // alias `lhs`/`rhs`.
    unsafe {
        raw_gemm(
            (m, n, k),
            dst.as_mut_ptr(),
            (dst_rs, dst_cs),
            accumulate,
            lhs,
            rhs,
            parallelism,
        );
    }
    Ok(())
}

/// Below this m·n·k a GEMM runs on one thread.
const PAR_MIN_WORK: usize = 1 << 21;

/// `dst = [dst +] lhs · rhs` through the gemm crate, without checks.
///
/// # Safety
/// Every element the views address must be in bounds of its allocation, `dst`'s elements must
/// be pairwise distinct and not overlap `lhs`/`rhs`, and nobody else may access them meanwhile.
unsafe fn raw_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: guaranteed by the caller. With `read_dst` the result is `1·dst + 1·lhs·rhs`,
    // else `lhs·rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// What [`prefill`] adds to one plane.
enum Add<'a> {
    /// The same value everywhere (a conv's bias for one channel).
    Scalar(f32),
    /// One value per position (a linear layer's bias along a row).
    Row(&'a [f32]),
}

/// `planes` planes of `plane` values: `residual` (or 0) plus `add(p)` on plane `p`, in
/// parallel. This is the starting value the GEMMs accumulate into.
fn prefill<'a>(
    planes: usize,
    plane: usize,
    residual: Option<&[f32]>,
    add: impl Fn(usize) -> Add<'a> + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; planes * plane];
    if plane == 0 {
        return out;
    }
    let min = (4096 / plane).max(1);
    let fill = |p: usize, o: &mut [f32], r: Option<&[f32]>| match (r, add(p)) {
        (Some(r), Add::Scalar(a)) => {
            for (o, &r) in o.iter_mut().zip(r) {
                *o = r + a;
            }
        }
        (Some(r), Add::Row(v)) => {
            for ((o, &r), &a) in o.iter_mut().zip(r).zip(v) {
                *o = r + a;
            }
        }
        (None, Add::Scalar(a)) => {
            if a != 0.0 {
                o.fill(a);
            }
        }
        (None, Add::Row(v)) => o.copy_from_slice(&v[..o.len()]),
    };
    match residual {
        Some(r) => out
            .par_chunks_mut(plane)
            .zip(r.par_chunks(plane))
            .with_min_len(min)
            .enumerate()
            .for_each(|(p, (o, r))| fill(p, o, Some(r))),
        None => out
            .par_chunks_mut(plane)
            .with_min_len(min)
            .enumerate()
            .for_each(|(p, o)| fill(p, o, None)),
    }
    out
}

/// [`prefill`] with an optional residual tensor, which must have the result's `dims`.
fn prefill_with<'a>(
    planes: usize,
    plane: usize,
    residual: Option<&Tensor>,
    dims: &[usize],
    add: impl Fn(usize) -> Add<'a> + Sync,
) -> Result<Vec<f32>> {
    let Some(r) = residual else {
        return Ok(prefill(planes, plane, None, add));
    };
    if r.dims() != dims {
        return Err(bad(format!(
            "residual of shape {:?} added to a result of shape {dims:?}",
            r.dims()
        )));
    }
    let r = r.contiguous()?;
    with_f32(&r, |d| prefill(planes, plane, Some(d), &add))
        .ok_or_else(|| bad("residual is not an f32 CPU tensor".into()))
}

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU) in one pass.

/// GroupNorm over `[B, C, ...]` with per-channel affine, optionally followed by SiLU.
///
/// On CPU with f32 input this is one fused pass per (image, group) slab, statistics in f64,
/// slabs spread over the cores; elsewhere it falls back to candle's ops.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    weight_host: Option<Vec<f32>>,
    bias_host: Option<Vec<f32>>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let c = weight.dims1()?;
        if bias.dims1()? != c || groups == 0 || !c.is_multiple_of(groups) {
            return Err(bad(format!(
                "group norm: {c} channels, bias {:?}, {groups} groups",
                bias.dims()
            )));
        }
        Ok(Self {
            weight_host: host_vec(&weight),
            bias_host: host_vec(&bias),
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// Loads `weight` and `bias` of `channels` elements.
    pub fn load(vb: VarBuilder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        Self::new(
            vb.get(channels, "weight")?,
            vb.get(channels, "bias")?,
            groups,
            eps,
        )
    }

    pub fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let _p = prof::scope(if silu { "groupnorm+silu" } else { "groupnorm" });
        let dims = x.dims();
        let c = self.weight.dim(0)?;
        if dims.len() < 3 || dims[1] != c {
            return Err(bad(format!(
                "group norm over {c} channels got input {dims:?}"
            )));
        }
        if let (Some(w), Some(b), true) = (&self.weight_host, &self.bias_host, is_cpu_f32(x)) {
            let x = x.contiguous()?;
            let spatial = dims[2..].iter().product::<usize>();
            if let Some(out) = with_f32(&x, |xs| self.run(xs, w, b, spatial, silu)) {
                return tensor(out, dims);
            }
        }
        let gn = candle_nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            c,
            self.groups,
            self.eps,
        )?;
        let y = gn.forward(x)?;
        Ok(if silu { candle_nn::ops::silu(&y)? } else { y })
    }

    fn run(&self, x: &[f32], w: &[f32], b: &[f32], spatial: usize, silu: bool) -> Vec<f32> {
        let cpg = w.len() / self.groups;
        let slab = cpg * spatial;
        let mut out = vec![0f32; x.len()];
        if slab == 0 {
            return out;
        }
        out.par_chunks_mut(slab)
            .zip(x.par_chunks(slab))
            .enumerate()
            .for_each(|(i, (o, xs))| {
                let c0 = (i % self.groups) * cpg;
                gn_slab(xs, o, &w[c0..c0 + cpg], &b[c0..c0 + cpg], self.eps, silu);
            });
        out
    }
}

simd_fn! {
/// Normalises one (image, group) slab: `w.len()` channels of equal size.
fn gn_slab(x: &[f32], out: &mut [f32], w: &[f32], b: &[f32], eps: f64, silu: bool) {
    {
        let n = x.len() as f64;
        let mean = sum_f64(x) / n;
        let var = sum_sq_dev_f64(x, mean as f32) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        let spatial = x.len() / w.len().max(1);
        for (ci, (xs, os)) in x.chunks(spatial).zip(out.chunks_mut(spatial)).enumerate() {
            // y = x·a + b' folds mean, rstd and the affine into one multiply-add.
            let a = (rstd * w[ci] as f64) as f32;
            let bb = (b[ci] as f64 - mean * rstd * w[ci] as f64) as f32;
            if silu {
                for (o, &v) in os.iter_mut().zip(xs) {
                    let y = v * a + bb;
                    *o = y / (1.0 + exp_fast(-y));
                }
            } else {
                for (o, &v) in os.iter_mut().zip(xs) {
                    *o = v * a + bb;
                }
            }
        }
    }
}
}

/// Sum in f64 of f32 values: 16 f32 lanes per 1024-value chunk (vectorisable, exact enough
/// for that few terms), chunks added in f64.
#[inline(always)]
fn sum_f64(x: &[f32]) -> f64 {
    x.chunks(1024)
        .map(|c| {
            let mut acc = [0f32; 16];
            let mut it = c.chunks_exact(16);
            for v in &mut it {
                for (a, &v) in acc.iter_mut().zip(v) {
                    *a += v;
                }
            }
            let tail: f32 = it.remainder().iter().sum();
            acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64
        })
        .sum()
}

/// `Σ (x - m)²` in the same chunked way as [`sum_f64`].
#[inline(always)]
fn sum_sq_dev_f64(x: &[f32], m: f32) -> f64 {
    x.chunks(1024)
        .map(|c| {
            let mut acc = [0f32; 16];
            let mut it = c.chunks_exact(16);
            for v in &mut it {
                for (a, &v) in acc.iter_mut().zip(v) {
                    let d = v - m;
                    *a += d * d;
                }
            }
            let tail: f32 = it.remainder().iter().map(|&v| (v - m) * (v - m)).sum();
            acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64
        })
        .sum()
}

/// `e^x` without branches (vectorises): range reduction by ln 2 and a degree-7 polynomial;
/// relative error below 3e-7 over the whole f32 range (inputs clamped to [-87, 88]).
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // Round to nearest by the 1.5·2^23 trick (no floor/round call needed without SSE4.1).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2_E + MAGIC) - MAGIC;
    // ln 2 split in two (Cody-Waite) so r is exact enough.
    let r = x - k * 0.693_359_4 - k * -2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// `erf(x)` (Abramowitz & Stegun 7.1.26: 1.5e-7 absolute in exact arithmetic, below 6e-7 in
/// f32), branch-free.
#[inline(always)]
fn erf_fast(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp_fast(-a * a)).copysign(x)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension.

/// LayerNorm over the last dimension with affine weight and bias (one parallel pass on CPU).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    weight_host: Option<Vec<f32>>,
    bias_host: Option<Vec<f32>>,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        let c = weight.dims1()?;
        if bias.dims1()? != c {
            return Err(bad(format!(
                "layer norm: weight {:?}, bias {:?}",
                weight.dims(),
                bias.dims()
            )));
        }
        Ok(Self {
            weight_host: host_vec(&weight),
            bias_host: host_vec(&bias),
            inner: candle_nn::LayerNorm::new(weight, bias, eps),
            eps,
        })
    }

    pub fn load(vb: VarBuilder, channels: usize, eps: f64) -> Result<Self> {
        Self::new(vb.get(channels, "weight")?, vb.get(channels, "bias")?, eps)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _p = prof::scope("layernorm");
        if let (Some(w), Some(b), true) = (&self.weight_host, &self.bias_host, is_cpu_f32(x)) {
            let c = w.len();
            if x.dims().last() == Some(&c) && c > 0 {
                let x = x.contiguous()?;
                let eps = self.eps;
                let out = with_f32(&x, |xs| {
                    let mut out = vec![0f32; xs.len()];
                    out.par_chunks_mut(c)
                        .zip(xs.par_chunks(c))
                        .with_min_len(MIN_ROWS_PER_TASK)
                        .for_each(|(o, r)| ln_row(o, r, w, b, eps));
                    out
                });
                if let Some(out) = out {
                    return tensor(out, x.dims());
                }
            }
        }
        Ok(self.inner.forward(x)?)
    }
}

simd_fn! {
/// One LayerNorm row: `(r - mean)·rstd·w + b`.
fn ln_row(o: &mut [f32], r: &[f32], w: &[f32], b: &[f32], eps: f64) {
    let n = r.len() as f64;
    let mean = sum_f64(r) / n;
    let var = sum_sq_dev_f64(r, mean as f32) / n;
    let rstd = 1.0 / (var + eps).sqrt();
    let (m, s) = (mean as f32, rstd as f32);
    for (((o, &v), &w), &b) in o.iter_mut().zip(r).zip(w).zip(b) {
        *o = (v - m) * s * w + b;
    }
}
}

// ---------------------------------------------------------------------------------------------
// GEGLU.

/// `a · GELU(g)` (exact erf GELU) for `h = [a, g]` split in halves along the last dimension:
/// `[..., 2n]` → `[..., n]`, one parallel pass on CPU.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let _p = prof::scope("geglu");
    let dims = h.dims().to_vec();
    let two_n = dims.last().copied().unwrap_or(0);
    if two_n % 2 != 0 || two_n == 0 {
        return Err(bad(format!(
            "geglu needs an even last dimension, got {dims:?}"
        )));
    }
    let n = two_n / 2;
    let mut out_dims = dims.clone();
    if let Some(l) = out_dims.last_mut() {
        *l = n;
    }
    if is_cpu_f32(h) {
        let h = h.contiguous()?;
        let out = with_f32(&h, |hs| {
            let mut out = vec![0f32; hs.len() / 2];
            out.par_chunks_mut(n)
                .zip(hs.par_chunks(two_n))
                .with_min_len(MIN_ROWS_PER_TASK)
                .for_each(|(o, r)| geglu_row(o, r));
            out
        });
        if let Some(out) = out {
            return tensor(out, out_dims);
        }
    }
    let a = h.narrow(candle_core::D::Minus1, 0, n)?;
    let g = h.narrow(candle_core::D::Minus1, n, n)?.gelu_erf()?;
    Ok((a * g)?)
}

simd_fn! {
/// `o = a · GELU(g)` for a row `r = [a, g]`.
fn geglu_row(o: &mut [f32], r: &[f32]) {
    let (a, g) = r.split_at(o.len());
    for ((o, &a), &g) in o.iter_mut().zip(a).zip(g) {
        *o = a * gelu_erf(g);
    }
}
}

/// GELU with the erf form (PyTorch's default GELU), through [`erf_fast`].
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    (erf_fast(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

// ---------------------------------------------------------------------------------------------
// Convolution.

/// Cap on one band's im2col buffer.
const CONV_BAND_BYTES: usize = 24 << 20;

/// A 2-D convolution (NCHW, square kernel, no groups, no dilation).
///
/// On CPU with f32 tensors: the kernel is used as a `[C_out, C_in·k·k]` matrix (a view of the
/// loaded weight, no copy); 1×1 convs are one GEMM per image on the input in place; k×k convs
/// fill an im2col buffer for a band of output rows (row copies for stride 1, both cores) and
/// one GEMM per band writes `[C_out, rows·W_out]`, which is exactly that band of every output
/// channel. The output starts as bias (+ per-image channel bias) (+ residual) and the GEMMs
/// accumulate into it. Other devices/dtypes use candle's conv.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    /// `[C_out, C_in·k·k]` sharing the weight's storage; `None` unless the weight is a
    /// contiguous f32 CPU tensor.
    w_flat: Option<Tensor>,
    bias: Option<Vec<f32>>,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
    /// Winograd-transformed kernel `[C_out][16][C_in]`, made on first use when small enough.
    wino_u: std::sync::OnceLock<Vec<f32>>,
}

impl Conv2d {
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if kh != kw || stride == 0 {
            return Err(bad(format!(
                "conv weight {:?} with stride {stride} is not supported",
                weight.dims()
            )));
        }
        let w_flat = if is_cpu_f32(&weight) && weight.is_contiguous() {
            Some(weight.reshape((c_out, c_in * kh * kw))?)
        } else {
            None
        };
        let bias_host = match &bias {
            Some(b) => {
                if b.dims1()? != c_out {
                    return Err(bad(format!(
                        "conv bias {:?} for {c_out} output channels",
                        b.dims()
                    )));
                }
                host_vec(b)
            }
            None => None,
        };
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Ok(Self {
            inner: candle_nn::Conv2d::new(weight, bias, cfg),
            w_flat,
            bias: bias_host,
            c_in,
            c_out,
            k: kh,
            stride,
            padding,
            wino_u: std::sync::OnceLock::new(),
        })
    }

    /// Loads `weight` `[cout, cin, k, k]` and `bias` `[cout]`.
    pub fn load(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let w = vb.get((cout, cin, k, k), "weight")?;
        let b = vb.get(cout, "bias")?;
        Self::new(w, Some(b), stride, padding)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, None)
    }

    /// `conv(x) + residual + channel_bias`, where `residual` has the output's shape and
    /// `channel_bias` `[B, C_out]` is added over each output plane.
    pub fn forward_with(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        channel_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let _p = prof::scope(match (self.k, self.stride) {
            (1, _) => "conv1x1",
            (3, 1) => "conv3x3",
            (3, 2) => "conv3x3/s2",
            _ => "conv",
        });
        let (b, c, h, w) = x.dims4()?;
        let (k, s, p) = (self.k, self.stride, self.padding);
        let fast = is_cpu_f32(x)
            && c == self.c_in
            && h + 2 * p >= k
            && w + 2 * p >= k
            && channel_bias.is_none_or(is_cpu_f32);
        let Some(w_flat) = self.w_flat.as_ref().filter(|_| fast) else {
            let mut y = self.inner.forward(x)?;
            if let Some(cb) = channel_bias {
                y = y.broadcast_add(&cb.unsqueeze(2)?.unsqueeze(3)?)?;
            }
            if let Some(r) = residual {
                y = (y + r)?;
            }
            return Ok(y);
        };
        let oh = (h + 2 * p - k) / s + 1;
        let ow = (w + 2 * p - k) / s + 1;
        let c_out = self.c_out;
        let plane = oh * ow;
        let cb = match channel_bias {
            Some(t) => {
                if t.dims() != [b, c_out] {
                    return Err(bad(format!(
                        "channel bias {:?} for a [{b}, {c_out}, ..] conv output",
                        t.dims()
                    )));
                }
                Some(t.flatten_all()?.to_vec1::<f32>()?)
            }
            None => None,
        };
        let dims = [b, c_out, oh, ow];
        let mut out = prefill_with(b * c_out, plane, residual, &dims, |i| {
            Add::Scalar(
                self.bias.as_ref().map_or(0.0, |v| v[i % c_out])
                    + cb.as_ref().map_or(0.0, |v| v[i]),
            )
        })?;
        let x = x.contiguous()?;
        let done = with_f32(&x, |xs| {
            with_f32(w_flat, |ws| self.run(xs, ws, &mut out, (b, h, w), (oh, ow)))
        });
        match done {
            Some(Some(r)) => r?,
            _ => return Err(bad("conv: tensors are not f32 on the CPU".into())),
        }
        tensor(out, dims.to_vec())
    }

    fn run(
        &self,
        x: &[f32],
        wt: &[f32],
        out: &mut [f32],
        (b, h, w): (usize, usize, usize),
        (oh, ow): (usize, usize),
    ) -> Result<()> {
        let (c, c_out, k, s, p) = (self.c_in, self.c_out, self.k, self.stride, self.padding);
        let (plane_in, plane) = (h * w, oh * ow);
        let kk = c * k * k;
        let weight = Mat {
            data: wt,
            rs: kk,
            cs: 1,
        };
        if k == 1 && s == 1 && p == 0 {
            for (img, out_b) in x
                .chunks_exact(c * plane_in)
                .zip(out.chunks_exact_mut(c_out * plane))
            {
                let rhs = Mat {
                    data: img,
                    rs: plane_in,
                    cs: 1,
                };
                sgemm((c_out, plane, c), out_b, (plane, 1), true, weight, rhs)?;
            }
            return Ok(());
        }
        if self.use_winograd(b, oh, ow) {
            return self.run_winograd(x, wt, out, (b, h, w), (oh, ow));
        }
        let band = (CONV_BAND_BYTES / (kk * ow * 4).max(1)).clamp(1, oh);
        let mut col = scratch::take(kk * band * ow);
        for (img, out_b) in x
            .chunks_exact(c * plane_in)
            .zip(out.chunks_exact_mut(c_out * plane))
            .take(b)
        {
            for y0 in (0..oh).step_by(band) {
                let rows = band.min(oh - y0);
                let n = rows * ow;
                let col = &mut col[..kk * n];
                im2col_band(img, (h, w), (k, s, p), (y0, rows, ow), col);
                let rhs = Mat {
                    data: col,
                    rs: n,
                    cs: 1,
                };
                sgemm(
                    (c_out, n, kk),
                    &mut out_b[y0 * ow..],
                    (plane, 1),
                    true,
                    weight,
                    rhs,
                )?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Feed-forward with GEGLU.

/// Rows of one block of [`geglu_feed_forward`].
const FF_BLOCK_ROWS: usize = 1024;

/// `out(GEGLU(proj(x))) + residual` for `x` `[..., C]`: `proj` `C → 2N`, `out` `N → C'`.
///
/// On CPU the rows go through in blocks: the block's `2N`-wide projection and its GEGLU live in
/// scratch buffers and the block's result is accumulated straight into the output, so neither
/// the `[rows, 2N]` projection nor the `[rows, N]` gate is ever allocated (at 512 px the first
/// is 84 MB per transformer block) and both stay in cache.
pub fn geglu_feed_forward(
    x: &Tensor,
    proj: &Linear,
    out: &Linear,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let _p = prof::scope("feed-forward");
    let (c, two_n, o) = (proj.in_dim(), proj.out_dim(), out.out_dim());
    let n = two_n / 2;
    if two_n % 2 != 0 || out.in_dim() != n || x.dims().last() != Some(&c) {
        return Err(bad(format!(
            "feed-forward {c}→{two_n}→GEGLU→{}→{o} applied to {:?}",
            out.in_dim(),
            x.dims()
        )));
    }
    if !(proj.can_run(x) && out.can_run(x)) {
        return out.forward_with(&geglu(&proj.forward(x)?)?, residual);
    }
    let rows = x.elem_count() / c.max(1);
    let mut out_dims = x.dims().to_vec();
    if let Some(l) = out_dims.last_mut() {
        *l = o;
    }
    let mut y = prefill_with(rows, o, residual, &out_dims, |_| out.row_bias())?;
    let x = x.contiguous()?;
    let (Some(xv), Some(w1v), Some(w2v)) = (
        F32View::new(&x),
        F32View::new(&proj.weight),
        F32View::new(&out.weight),
    ) else {
        return Err(bad("feed-forward: tensors are not f32 on the CPU".into()));
    };
    let (xs, w1, w2) = (xv.data(), w1v.data(), w2v.data());
    let block = FF_BLOCK_ROWS.min(rows).max(1);
    let mut h = scratch::take(block * two_n);
    let mut g = scratch::take(block * n);
    for r0 in (0..rows).step_by(block) {
        let rb = block.min(rows - r0);
        let h = &mut h[..rb * two_n];
        let g = &mut g[..rb * n];
        let acc = match &proj.bias_host {
            Some(b1) => {
                h.par_chunks_mut(two_n)
                    .with_min_len(MIN_ROWS_PER_TASK)
                    .for_each(|r| r.copy_from_slice(b1));
                true
            }
            None => false,
        };
        let lhs = Mat {
            data: &xs[r0 * c..],
            rs: c,
            cs: 1,
        };
        sgemm(
            (rb, two_n, c),
            h,
            (two_n, 1),
            acc,
            lhs,
            Mat {
                data: w1,
                rs: 1,
                cs: c,
            },
        )?;
        g.par_chunks_mut(n)
            .zip(h.par_chunks(two_n))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(o, r)| geglu_row(o, r));
        let lhs = Mat {
            data: g,
            rs: n,
            cs: 1,
        };
        sgemm(
            (rb, o, n),
            &mut y[r0 * o..],
            (o, 1),
            true,
            lhs,
            Mat {
                data: w2,
                rs: 1,
                cs: n,
            },
        )?;
    }
    tensor(y, out_dims)
}

// ---------------------------------------------------------------------------------------------
// Winograd F(2×2, 3×3) for 3×3 stride-1 convolutions.
//
// Each 2×2 block of outputs comes from a 4×4 input tile d: Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A,
// 16 products per tile and channel pair instead of 36, so the GEMMs (one per tile position
// ξ = 0..16: M_ξ[C_out × tiles] = U_ξ[C_out × C_in] · V_ξ[C_in × tiles]) do 2.25× less work
// than im2col's. The transforms are adds only; f32 rounding stays within a few ulps of the
// direct sum (see the tests). Matrices (cross-correlation form, as PyTorch's conv):
//   Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1],
//   Aᵀ = [1 1 1 0; 0 1 -1 -1].

/// Output pixels (all images) below which the weight transform costs more than it saves.
const WINO_MIN_PIXELS: usize = 256;
/// Cap on one band's transformed input plus products.
const WINO_BAND_BYTES: usize = 32 << 20;
/// Transformed kernels up to this size are kept after first use (the high-resolution levels'
/// convs, where the transform per call would cost the most relative to the GEMMs); larger ones
/// are transformed per call into scratch memory. SD 1.5 keeps about 0.5 GB.
const WINO_CACHE_MAX_BYTES: usize = 40 << 20;

fn winograd_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SD_ENGINE_WINOGRAD").is_none_or(|v| v != "0"))
}

/// `U = G g Gᵀ` for every (co, ci) of a `[C_out, C_in, 3, 3]` kernel, laid out
/// `[C_out][16][C_in]` so each output channel is one contiguous block.
fn wino_weights(w: &[f32], c_in: usize, u: &mut [f32]) {
    u.par_chunks_mut(16 * c_in)
        .zip(w.par_chunks(9 * c_in))
        .for_each(|(uc, wc)| {
            {
                for (ci, g) in wc.chunks_exact(9).enumerate() {
                    // t = G g (4×3), then each row of t times Gᵀ.
                    let mut t = [[0f32; 3]; 4];
                    for j in 0..3 {
                        let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                        t[0][j] = g0;
                        t[1][j] = 0.5 * (g0 + g1 + g2);
                        t[2][j] = 0.5 * (g0 - g1 + g2);
                        t[3][j] = g2;
                    }
                    for (i, &[a, b, c]) in t.iter().enumerate() {
                        let row = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                        for (j, &v) in row.iter().enumerate() {
                            uc[(i * 4 + j) * c_in + ci] = v;
                        }
                    }
                }
            }
        });
}

/// Geometry of one Winograd conv call.
#[derive(Clone, Copy)]
struct WinoDims {
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    p: usize,
    oh: usize,
    ow: usize,
    /// Tile rows per image and tiles per tile row.
    th: usize,
    tw: usize,
}

/// `V[ci][ξ][t] = (Bᵀ d B)_ξ` for the tiles of global tile rows `r0..r1` (row `r` is tile row
/// `r % th` of image `r / th`; tile `t = (r - r0)·tw + tx`), zero padding outside the image.
fn wino_input(x: &[f32], d: WinoDims, (r0, r1): (usize, usize), v: &mut [f32]) {
    let nt = (r1 - r0) * d.tw;
    v.par_chunks_mut(16 * nt)
        .enumerate()
        .take(d.c_in)
        .for_each(|(ci, vc)| wino_input_channel(x, d, r0, r1, ci, vc));
}

simd_fn! {
/// [`wino_input`] for input channel `ci` (`vc` is its `[16][tiles]` block).
fn wino_input_channel(x: &[f32], d: WinoDims, r0: usize, r1: usize, ci: usize, vc: &mut [f32]) {
    let WinoDims { c_in, h, w, p, th, tw, .. } = d;
    let nt = (r1 - r0) * tw;
    let rl = 2 * tw + 2;
                // Four padded input rows, then their column transforms (c_j per tile).
                let mut rows = vec![0f32; 4 * rl];
                let mut cols = vec![0f32; 16 * tw];
                for r in r0..r1 {
                    let (img, ty) = (r / th, r % th);
                    let plane = &x[(img * c_in + ci) * h * w..][..h * w];
                    for (i, row) in rows.chunks_exact_mut(rl).enumerate() {
                        row.fill(0.0);
                        let iy = 2 * ty + i;
                        if iy < p || iy - p >= h {
                            continue;
                        }
                        let src = &plane[(iy - p) * w..][..w];
                        // row[q] = src[q - p]
                        let n = w.min(rl - p);
                        row[p..p + n].copy_from_slice(&src[..n]);
                    }
                    for (row, cr) in rows.chunks_exact(rl).zip(cols.chunks_exact_mut(4 * tw)) {
                        let (c0, rest) = cr.split_at_mut(tw);
                        let (c1, rest) = rest.split_at_mut(tw);
                        let (c2, c3) = rest.split_at_mut(tw);
                        for (tx, q) in row.windows(4).step_by(2).take(tw).enumerate() {
                            c0[tx] = q[0] - q[2];
                            c1[tx] = q[1] + q[2];
                            c2[tx] = q[2] - q[1];
                            c3[tx] = q[1] - q[3];
                        }
                    }
                    let t0 = (r - r0) * tw;
                    for j in 0..4 {
                        let col = |i: usize| &cols[(i * 4 + j) * tw..][..tw];
                        let (d0, d1, d2, d3) = (col(0), col(1), col(2), col(3));
                        let (v0, rest) = vc[j * nt + t0..].split_at_mut(4 * nt);
                        let (v1, rest) = rest.split_at_mut(4 * nt);
                        let (v2, v3) = rest.split_at_mut(4 * nt);
                        let (v0, v1, v2, v3) =
                            (&mut v0[..tw], &mut v1[..tw], &mut v2[..tw], &mut v3[..tw]);
                        for t in 0..tw {
                            v0[t] = d0[t] - d2[t];
                            v1[t] = d1[t] + d2[t];
                            v2[t] = d2[t] - d1[t];
                            v3[t] = d1[t] - d3[t];
                        }
                    }
                }
}
}

simd_fn! {
/// Adds `Aᵀ M A` of the band's tiles to the output planes of one channel (`planes[img]`).
fn wino_output(
    m: &[f32],
    d: WinoDims,
    co: usize,
    r0: usize,
    r1: usize,
    planes: &mut [&mut [f32]],
    scratch: &mut Vec<f32>,
) {
    let WinoDims {
        c_out,
        oh,
        ow,
        th,
        tw,
        ..
    } = d;
    {
        let nt = (r1 - r0) * tw;
        scratch.resize(8 * tw, 0.0);
        for r in r0..r1 {
            let (img, ty) = (r / th, r % th);
            let t0 = (r - r0) * tw;
            let mm = |i: usize, j: usize| &m[((i * 4 + j) * c_out + co) * nt + t0..][..tw];
            // s_i,j = rows of Aᵀ M: s0 = M0 + M1 + M2, s1 = M1 - M2 - M3 (per column j).
            let (s0, s1) = scratch.split_at_mut(4 * tw);
            for j in 0..4 {
                let (m0, m1, m2, m3) = (mm(0, j), mm(1, j), mm(2, j), mm(3, j));
                let (a, b) = (&mut s0[j * tw..][..tw], &mut s1[j * tw..][..tw]);
                for t in 0..tw {
                    a[t] = m0[t] + m1[t] + m2[t];
                    b[t] = m1[t] - m2[t] - m3[t];
                }
            }
            let plane = &mut *planes[img];
            for (i, s) in [&*s0, &*s1].into_iter().enumerate() {
                let oy = 2 * ty + i;
                if oy >= oh {
                    continue;
                }
                let row = &mut plane[oy * ow..][..ow];
                let (x0, x1, x2, x3) = (&s[..tw], &s[tw..2 * tw], &s[2 * tw..3 * tw], &s[3 * tw..]);
                let mut pairs = row.chunks_exact_mut(2);
                for (t, pr) in (&mut pairs).enumerate() {
                    pr[0] += x0[t] + x1[t] + x2[t];
                    pr[1] += x1[t] - x2[t] - x3[t];
                }
                if let [last] = pairs.into_remainder() {
                    let t = tw - 1;
                    *last += x0[t] + x1[t] + x2[t];
                }
            }
        }
    }
}
}
impl Conv2d {
    /// Whether this call goes through [`Conv2d::run_winograd`].
    fn use_winograd(&self, b: usize, oh: usize, ow: usize) -> bool {
        self.k == 3
            && self.stride == 1
            && self.c_in >= 16
            && self.c_out >= 16
            && b * oh * ow >= WINO_MIN_PIXELS
            && winograd_enabled()
    }

    /// 3×3 stride-1 conv by Winograd F(2×2, 3×3), accumulating into `out` `[B, C_out, oh, ow]`.
    fn run_winograd(
        &self,
        x: &[f32],
        wt: &[f32],
        out: &mut [f32],
        (b, h, w): (usize, usize, usize),
        (oh, ow): (usize, usize),
    ) -> Result<()> {
        let (c_in, c_out) = (self.c_in, self.c_out);
        let d = WinoDims {
            c_in,
            c_out,
            h,
            w,
            p: self.padding,
            oh,
            ow,
            th: oh.div_ceil(2),
            tw: ow.div_ceil(2),
        };
        let fresh;
        let u: &[f32] = if c_in * c_out * 64 <= WINO_CACHE_MAX_BYTES {
            self.wino_u.get_or_init(|| {
                let _p = prof::scope("wino.weights");
                let mut u = vec![0f32; c_out * 16 * c_in];
                wino_weights(wt, c_in, &mut u);
                u
            })
        } else {
            let _p = prof::scope("wino.weights");
            let mut u = scratch::take(c_out * 16 * c_in);
            wino_weights(wt, c_in, &mut u);
            fresh = u;
            &fresh
        };
        let rows_total = b * d.th;
        let band = (WINO_BAND_BYTES / (64 * (c_in + c_out) * d.tw).max(1)).clamp(1, rows_total);
        let nt_max = band * d.tw;
        let mut v = scratch::take(c_in * 16 * nt_max);
        let mut m = scratch::take(16 * c_out * nt_max);
        // Output planes grouped by channel: by_co[co][img].
        let plane = oh * ow;
        let mut by_co: Vec<Vec<&mut [f32]>> = (0..c_out).map(|_| Vec::with_capacity(b)).collect();
        for (i, pl) in out.chunks_exact_mut(plane).enumerate() {
            by_co[i % c_out].push(pl);
        }
        for r0 in (0..rows_total).step_by(band) {
            let r1 = (r0 + band).min(rows_total);
            let nt = (r1 - r0) * d.tw;
            let v = &mut v[..c_in * 16 * nt];
            let m = &mut m[..16 * c_out * nt];
            {
                let _p = prof::scope("wino.input");
                wino_input(x, d, (r0, r1), v);
            }
            {
                let _p = prof::scope("wino.gemm");
                let v = &*v;
                m.par_chunks_mut(c_out * nt)
                    .enumerate()
                    .try_for_each(|(xi, mx)| {
                        let lhs = Mat {
                            data: &u[xi * c_in..],
                            rs: 16 * c_in,
                            cs: 1,
                        };
                        let rhs = Mat {
                            data: &v[xi * nt..],
                            rs: 16 * nt,
                            cs: 1,
                        };
                        sgemm_single((c_out, nt, c_in), mx, (nt, 1), false, lhs, rhs)
                    })?;
            }
            let _p = prof::scope("wino.output");
            let m = &*m;
            by_co
                .par_iter_mut()
                .enumerate()
                .for_each_init(Vec::new, |scratch, (co, planes)| {
                    wino_output(m, d, co, r0, r1, planes, scratch)
                });
        }
        Ok(())
    }
}

/// Fills `col` (`[c·k·k, rows·ow]`) with the input patches of output rows `y0..y0+rows`:
/// row `(ci·k + kh)·k + kw` holds `x[ci, y·s + kh - p, x·s + kw - p]`, zero outside the image.
/// Rows are spread over the cores.
fn im2col_band(
    img: &[f32],
    (h, w): (usize, usize),
    (k, s, p): (usize, usize, usize),
    (y0, rows, ow): (usize, usize, usize),
    col: &mut [f32],
) {
    let n = rows * ow;
    if n == 0 {
        return;
    }
    col.par_chunks_mut(n)
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(r, dst)| {
            let (ci, kh, kw) = (r / (k * k), (r / k) % k, r % k);
            let plane = &img[ci * h * w..(ci + 1) * h * w];
            for (yy, drow) in dst.chunks_exact_mut(ow).enumerate() {
                let iy = (y0 + yy) * s + kh;
                if iy < p || iy - p >= h {
                    drow.fill(0.0);
                    continue;
                }
                let src = &plane[(iy - p) * w..(iy - p + 1) * w];
                if s == 1 {
                    // Output x reads input x + kw - p: one contiguous copy, zeros around it.
                    let x_lo = p.saturating_sub(kw).min(ow);
                    let x_hi = (w + p).saturating_sub(kw).clamp(x_lo, ow);
                    drow[..x_lo].fill(0.0);
                    drow[x_hi..].fill(0.0);
                    let i_lo = x_lo + kw - p;
                    drow[x_lo..x_hi].copy_from_slice(&src[i_lo..i_lo + (x_hi - x_lo)]);
                } else {
                    for (xx, dv) in drow.iter_mut().enumerate() {
                        let ix = xx * s + kw;
                        *dv = if ix >= p && ix - p < w {
                            src[ix - p]
                        } else {
                            0.0
                        };
                    }
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Linear.

/// `y = x·Wᵀ + b` with `W` `[out, in]` (a 1×1 conv weight `[out, in, 1, 1]` is accepted too).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    weight: Tensor,
    bias: Option<Tensor>,
    bias_host: Option<Vec<f32>>,
    fast: bool,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = match *weight.dims() {
            [o, i] | [o, i, 1, 1] => weight.reshape((o, i))?,
            _ => return Err(bad(format!("linear weight of shape {:?}", weight.dims()))),
        };
        let out = weight.dim(0)?;
        if let Some(b) = &bias {
            if b.dims1()? != out {
                return Err(bad(format!("linear bias {:?} for {out} outputs", b.dims())));
            }
        }
        Ok(Self {
            fast: is_cpu_f32(&weight) && weight.is_contiguous(),
            bias_host: bias.as_ref().and_then(host_vec),
            weight,
            bias,
        })
    }

    /// Loads `weight` `[out, in]` (and `bias` `[out]` when `bias`).
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let w = vb.get((out_dim, in_dim), "weight")?;
        let b = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::new(w, b)
    }

    /// Loads a 1×1 conv `weight` `[out, in, 1, 1]` and `bias` as a linear layer.
    pub fn load_conv1x1(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let w = vb.get((out_dim, in_dim, 1, 1), "weight")?;
        Self::new(w, Some(vb.get(out_dim, "bias")?))
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    fn row_bias(&self) -> Add<'_> {
        match &self.bias_host {
            Some(b) => Add::Row(b),
            None => Add::Scalar(0.0),
        }
    }

    fn can_run(&self, x: &Tensor) -> bool {
        self.fast && is_cpu_f32(x) && (self.bias.is_none() || self.bias_host.is_some())
    }

    /// `x` `[..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None)
    }

    /// `x·Wᵀ + b + residual` (`residual` with the output's shape).
    pub fn forward_with(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let _p = prof::scope("linear");
        let (i, o) = (self.in_dim(), self.out_dim());
        let dims = x.dims();
        if dims.last() != Some(&i) {
            return Err(bad(format!("linear {i}→{o} applied to input {dims:?}")));
        }
        let mut out_dims = dims.to_vec();
        if let Some(l) = out_dims.last_mut() {
            *l = o;
        }
        if !self.can_run(x) {
            let y = x.broadcast_matmul(&self.weight.t()?)?;
            let y = match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            return Ok(match residual {
                Some(r) => (y + r)?,
                None => y,
            });
        }
        let rows = x.elem_count() / i.max(1);
        // Each "plane" of the prefill is one output row.
        let mut out = prefill_with(rows, o, residual, &out_dims, |_| self.row_bias())?;
        let x = x.contiguous()?;
        let acc = residual.is_some() || self.bias_host.is_some();
        self.gemm_into(&x, &mut out, rows, (i, 1), (o, 1), acc)?;
        tensor(out, out_dims)
    }

    /// `dst (rows × out, strides dst_strides) [+]= x (rows × in, strides x_strides) · Wᵀ`
    /// (a destination with nothing to add is written, not read: reading freshly allocated
    /// pages first costs a second page fault per page).
    fn gemm_into(
        &self,
        x: &Tensor,
        dst: &mut [f32],
        rows: usize,
        x_strides: (usize, usize),
        dst_strides: (usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let (i, o) = (self.in_dim(), self.out_dim());
        let done = with_f32(x, |xs| {
            with_f32(&self.weight, |ws| {
                let lhs = Mat {
                    data: xs,
                    rs: x_strides.0,
                    cs: x_strides.1,
                };
                // Wᵀ as a strided view: element (in j, out c) at c·in + j.
                let rhs = Mat {
                    data: ws,
                    rs: 1,
                    cs: i,
                };
                sgemm((rows, o, i), dst, dst_strides, accumulate, lhs, rhs)
            })
        });
        match done {
            Some(Some(r)) => r,
            _ => Err(bad(
                "linear: tensors are not contiguous f32 on the CPU".into()
            )),
        }
    }

    /// NCHW `[B, in, H, W]` → token sequence `[B, H·W, out]` (the GEMM reads the channels-first
    /// input in place; no permute copy).
    pub fn forward_nchw_to_seq(&self, x: &Tensor) -> Result<Tensor> {
        let _p = prof::scope("linear");
        let (b, c, h, w) = x.dims4()?;
        let o = self.out_dim();
        if c != self.in_dim() {
            return Err(bad(format!(
                "linear {}→{o} applied to NCHW input {:?}",
                self.in_dim(),
                x.dims()
            )));
        }
        let hw = h * w;
        if !self.can_run(x) {
            let seq = x.flatten_from(2)?.transpose(1, 2)?;
            return self.forward(&seq.contiguous()?);
        }
        let x = x.contiguous()?;
        let mut out = prefill(b * hw, o, None, |_| self.row_bias());
        for bi in 0..b {
            let xb = x.get(bi)?;
            let dst = &mut out[bi * hw * o..(bi + 1) * hw * o];
            // Token t, channel j of image bi is at j·HW + t.
            self.gemm_into(&xb, dst, hw, (1, hw), (o, 1), self.bias_host.is_some())?;
        }
        tensor(out, (b, hw, o))
    }

    /// Token sequence `[B, H·W, in]` → NCHW `[B, out, H, W]` plus `residual` (NCHW, same shape),
    /// written channels-first by the GEMM (no permute copy).
    pub fn forward_seq_to_nchw(
        &self,
        s: &Tensor,
        (h, w): (usize, usize),
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let _p = prof::scope("linear");
        let (b, l, i) = s.dims3()?;
        let o = self.out_dim();
        if i != self.in_dim() || l != h * w {
            return Err(bad(format!(
                "linear {}→{o} applied to {:?} for a {h}×{w} map",
                self.in_dim(),
                s.dims()
            )));
        }
        let dims = [b, o, h, w];
        if !self.can_run(s) {
            let y = self.forward(s)?.transpose(1, 2)?.reshape((b, o, h, w))?;
            return Ok(match residual {
                Some(r) => (y + r)?,
                None => y,
            });
        }
        let mut out = prefill_with(b * o, l, residual, &dims, |p| {
            Add::Scalar(self.bias_host.as_ref().map_or(0.0, |v| v[p % o]))
        })?;
        let s = s.contiguous()?;
        for bi in 0..b {
            let sb = s.get(bi)?;
            let dst = &mut out[bi * o * l..(bi + 1) * o * l];
            // Output (token t, channel c) goes to c·L + t.
            let acc = residual.is_some() || self.bias_host.is_some();
            self.gemm_into(&sb, dst, l, (i, 1), (1, l), acc)?;
        }
        tensor(out, dims.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn rand_input(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic values in -2..2 without an RNG dependency.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flat")
            .max(0)
            .expect("max")
            .to_scalar::<f32>()
            .expect("s")
    }

    #[test]
    fn fused_group_norm_matches_candle() {
        let x = rand_input(&[2, 64, 5, 3], 3);
        let w = rand_input(&[64], 4);
        let b = rand_input(&[64], 5);
        let ours = GroupNorm::new(w.clone(), b.clone(), 32, 1e-6).expect("gn");
        let reference = candle_nn::GroupNorm::new(w, b, 64, 32, 1e-6).expect("gn");
        let want = reference.forward(&x).expect("ref");
        let got = ours.forward(&x, false).expect("ours");
        assert!(max_diff(&got, &want) < 1e-5);
        let want = candle_nn::ops::silu(&want).expect("silu");
        let got = ours.forward(&x, true).expect("ours");
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn conv_matches_candle() {
        // (batch, c_in, c_out, h, w, k, stride, padding)
        for (b, ci, co, h, w, k, s, p) in [
            (2, 3, 5, 7, 9, 3, 1, 1),
            (1, 4, 6, 8, 8, 3, 2, 0),
            (1, 2, 3, 9, 6, 3, 2, 1),
            (1, 3, 2, 5, 5, 1, 1, 0),
            (2, 3, 4, 3, 5, 1, 1, 0),
            (1, 2, 2, 4, 6, 5, 1, 2),
            (2, 3, 4, 1, 1, 3, 1, 1),
        ] {
            let x = rand_input(&[b, ci, h, w], 1);
            let wt = rand_input(&[co, ci, k, k], 2);
            let bias = rand_input(&[co], 3);
            let ours = Conv2d::new(wt.clone(), Some(bias.clone()), s, p).expect("conv");
            let cfg = Conv2dConfig {
                padding: p,
                stride: s,
                ..Default::default()
            };
            let theirs = candle_nn::Conv2d::new(wt, Some(bias), cfg);
            let want = theirs.forward(&x).expect("candle");
            let got = ours.forward(&x).expect("ours");
            assert!(
                max_diff(&got, &want) < 1e-4,
                "{b} {ci} {co} {h} {w} {k} {s} {p}"
            );
            // Non-contiguous input takes the same path after a copy.
            let xt = x
                .transpose(2, 3)
                .expect("t")
                .contiguous()
                .expect("c")
                .transpose(2, 3)
                .expect("t");
            assert!(max_diff(&ours.forward(&xt).expect("ours t"), &want) < 1e-4);

            // Residual and per-image channel bias are folded into the output.
            let res = rand_input(want.dims(), 4);
            let cb = rand_input(&[b, co], 5);
            let got = ours.forward_with(&x, Some(&res), Some(&cb)).expect("with");
            let want2 = (want
                .broadcast_add(&cb.unsqueeze(2).expect("u").unsqueeze(3).expect("u"))
                .expect("cb")
                + &res)
                .expect("res");
            assert!(max_diff(&got, &want2) < 1e-4);
        }
    }

    #[test]
    fn conv_bands_cover_tall_images() {
        // Enough rows that the output is produced in several bands.
        let (ci, co, h, w) = (64, 8, 180, 160);
        let x = rand_input(&[1, ci, h, w], 6);
        let wt = rand_input(&[co, ci, 3, 3], 7);
        let ours = Conv2d::new(wt.clone(), None, 1, 1).expect("conv");
        assert!(CONV_BAND_BYTES / (ci * 9 * w * 4) < h);
        let theirs = candle_nn::Conv2d::new(
            wt,
            None,
            Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
        );
        let want = theirs.forward(&x).expect("candle");
        assert!(max_diff(&ours.forward(&x).expect("ours"), &want) < 1e-3);
    }

    #[test]
    fn winograd_matches_candle() {
        // (batch, c_in, c_out, h, w, padding); odd sizes leave partial edge tiles, the last
        // case spans several bands.
        for (b, ci, co, h, w, p) in [
            (2, 16, 24, 16, 16, 1),
            (1, 20, 16, 17, 23, 1),
            (2, 16, 16, 17, 19, 0),
            (1, 16, 17, 20, 19, 2),
            (2, 64, 64, 128, 128, 1),
        ] {
            let x = rand_input(&[b, ci, h, w], 11);
            let wt = (rand_input(&[co, ci, 3, 3], 12) * 0.1).expect("scale");
            let bias = rand_input(&[co], 13);
            let ours = Conv2d::new(wt.clone(), Some(bias.clone()), 1, p).expect("conv");
            let (oh, ow) = (h + 2 * p - 2, w + 2 * p - 2);
            assert!(ours.use_winograd(b, oh, ow));
            let theirs = candle_nn::Conv2d::new(
                wt,
                Some(bias),
                Conv2dConfig {
                    padding: p,
                    ..Default::default()
                },
            );
            let want = theirs.forward(&x).expect("candle");
            let got = ours.forward(&x).expect("ours");
            let scale = want
                .abs()
                .expect("abs")
                .flatten_all()
                .expect("f")
                .max(0)
                .expect("max")
                .to_scalar::<f32>()
                .expect("s");
            let d = max_diff(&got, &want);
            assert!(
                d < 1e-5 * scale.max(1.0),
                "{b} {ci} {co} {h} {w} {p}: {d} vs {scale}"
            );
        }
    }

    #[test]
    fn linear_paths_match_candle() {
        let (b, c, h, w, o) = (2, 6, 3, 4, 5);
        let wt = rand_input(&[o, c], 1);
        let bias = rand_input(&[o], 2);
        let lin = Linear::new(wt.clone(), Some(bias.clone())).expect("lin");
        let reference = candle_nn::Linear::new(wt.clone(), Some(bias.clone()));
        let x = rand_input(&[b, h * w, c], 3);
        let want = reference.forward(&x).expect("ref");
        assert!(max_diff(&lin.forward(&x).expect("ours"), &want) < 1e-5);
        let res = rand_input(&[b, h * w, o], 4);
        let got = lin.forward_with(&x, Some(&res)).expect("res");
        assert!(max_diff(&got, &(&want + &res).expect("add")) < 1e-5);
        assert!(lin.forward_with(&x, Some(&x)).is_err());

        // NCHW in, tokens out.
        let xn = rand_input(&[b, c, h, w], 5);
        let seq = xn
            .flatten_from(2)
            .expect("f")
            .transpose(1, 2)
            .expect("t")
            .contiguous()
            .expect("c");
        let want = reference.forward(&seq).expect("ref");
        let got = lin.forward_nchw_to_seq(&xn).expect("ours");
        assert!(max_diff(&got, &want) < 1e-5);

        // Tokens in, NCHW out with a residual; a 1×1 conv weight is the same layer.
        let lin2 = Linear::new(
            rand_input(&[c, o], 6).reshape((c, o, 1, 1)).expect("r"),
            Some(rand_input(&[c], 7)),
        )
        .expect("lin2");
        let reference2 = candle_nn::Linear::new(rand_input(&[c, o], 6), Some(rand_input(&[c], 7)));
        let s = rand_input(&[b, h * w, o], 8);
        let want = reference2
            .forward(&s)
            .expect("ref")
            .transpose(1, 2)
            .expect("t")
            .reshape((b, c, h, w))
            .expect("r");
        let want = (want + &xn).expect("add");
        let got = lin2
            .forward_seq_to_nchw(&s, (h, w), Some(&xn))
            .expect("ours");
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn layer_norm_and_geglu_match_candle() {
        let x = rand_input(&[2, 7, 24], 1);
        let w = rand_input(&[24], 2);
        let b = rand_input(&[24], 3);
        let ours = LayerNorm::new(w.clone(), b.clone(), 1e-5).expect("ln");
        let want = candle_nn::LayerNorm::new(w, b, 1e-5)
            .forward(&x)
            .expect("ref");
        assert!(max_diff(&ours.forward(&x).expect("ours"), &want) < 1e-5);

        let h = (rand_input(&[2, 5, 16], 4) * 2.0).expect("scale");
        let a = h.narrow(2, 0, 8).expect("a");
        let g = h.narrow(2, 8, 8).expect("g").gelu_erf().expect("gelu");
        let want = (a * g).expect("mul");
        // |a·GELU(g)| ≤ 16 here; erf_fast is within 6e-7 absolute.
        assert!(max_diff(&geglu(&h).expect("ours"), &want) < 5e-6);
        assert!(geglu(&rand_input(&[2, 3], 5)).is_err());
    }

    #[test]
    fn feed_forward_matches_composition() {
        let (c, n, rows) = (8, 12, 2 * 600);
        let proj =
            Linear::new(rand_input(&[2 * n, c], 1), Some(rand_input(&[2 * n], 2))).expect("p");
        let out = Linear::new(rand_input(&[c, n], 3), Some(rand_input(&[c], 4))).expect("o");
        let x = rand_input(&[2, rows / 2, c], 5);
        let res = rand_input(&[2, rows / 2, c], 6);
        let want = out
            .forward_with(
                &geglu(&proj.forward(&x).expect("p")).expect("g"),
                Some(&res),
            )
            .expect("o");
        let got = geglu_feed_forward(&x, &proj, &out, Some(&res)).expect("ff");
        assert!(max_diff(&got, &want) < 1e-4);
        assert!(geglu_feed_forward(&x, &out, &proj, None).is_err());
    }

    #[test]
    fn fast_exp_and_erf_are_accurate() {
        let mut worst_exp = 0f32;
        let mut worst_erf = 0f32;
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.004_35; // -87 ..= 87
            let e = libm_exp(x);
            worst_exp = worst_exp.max(((exp_fast(x) - e) / e).abs());
            let y = i as f32 * 0.000_5; // -10 ..= 10
            worst_erf = worst_erf.max((erf_fast(y) - candle_core::cpu::erf::erf_f32(y)).abs());
        }
        assert!(worst_exp < 3e-7, "exp {worst_exp}");
        assert!(worst_erf < 6e-7, "erf {worst_erf}");
        assert_eq!(erf_fast(0.0), 0.0);
        assert_eq!(exp_fast(-1000.0), exp_fast(-87.0));
        // The SIMD-dispatched loop gives the same numbers as the scalar one.
        let v: Vec<f32> = (0..100).map(|i| i as f32 * 0.37 - 18.0).collect();
        let mut a = vec![0f32; 50];
        geglu_row(&mut a, &v);
        let b: Vec<f32> = v[..50]
            .iter()
            .zip(&v[50..])
            .map(|(&a, &g)| a * 0.5 * g * (1.0 + candle_core::cpu::erf::erf_f32(g / 2f32.sqrt())))
            .collect();
        for (a, b) in a.iter().zip(&b) {
            assert!(((a - b) / b).abs() < 1e-6);
        }
    }

    fn libm_exp(x: f32) -> f32 {
        (x as f64).exp() as f32
    }

    #[test]
    fn gemm_rejects_views_outside_their_slices() {
        let a = [1f32; 6];
        let mut d = [0f32; 4];
        let lhs = Mat {
            data: &a,
            rs: 3,
            cs: 1,
        };
        let rhs = Mat {
            data: &a,
            rs: 2,
            cs: 1,
        };
        // 2×3 · 3×2 fits.
        sgemm((2, 2, 3), &mut d, (2, 1), false, lhs, rhs).expect("fits");
        assert_eq!(d, [3.0; 4]);
        // k = 4 reads past the end.
        assert!(sgemm((2, 2, 4), &mut d, (2, 1), false, lhs, rhs).is_err());
        // Overlapping destination rows.
        assert!(sgemm((2, 2, 3), &mut d, (1, 1), false, lhs, rhs).is_err());
    }
}
