//! Scaled dot-product attention that never holds a whole score matrix.
//!
//! The plain formula materialises a `[B, H, Lq, Lk]` score tensor: 1 GB for SD 1.5's first UNet
//! level at 512 px (batch 2) and 1 GB for the VAE's mid attention at 1024 px.
//!
//! - On CPU with f32 tensors, [`sdpa`] / [`sdpa_causal`] run a fused, flash-attention style
//!   kernel ([`fused`]): query blocks of 72 rows walk over key blocks of 256, keeping a running
//!   max and sum (online softmax), so the only scratch memory is a 72×256 score tile per thread.
//!   The products are 6×16 register tiles (AVX2+FMA intrinsics when the CPU has them, portable
//!   loops otherwise).
//! - Elsewhere (other dtypes or devices) the query rows, and when needed the batch×head slices,
//!   are processed in chunks whose scores stay under a byte budget, with candle's matmul and
//!   softmax ([`sdpa_with_budget`]).
//!
//! Both are exact up to float rounding; the tests compare them with the plain formula.

use candle_core::{DType, Device, Tensor, D};

use crate::{EngineError, Result};

/// Default cap on one chunk's score matrix (and its softmax copy), in bytes.
pub const DEFAULT_SCORE_BUDGET_BYTES: usize = 64 << 20;

/// `softmax(q kᵀ / sqrt(D)) v` for q `[B, H, Lq, D]`, k `[B, H, Lk, D]`, v `[B, H, Lk, Dv]`;
/// returns `[B, H, Lq, Dv]`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    dispatch(q, k, v, false)
}

/// Like [`sdpa`] with a causal mask: query row `i` sees keys `0..=i + (Lk - Lq)`
/// (bottom-right aligned; for self-attention `Lq == Lk` this is the usual lower triangle,
/// as CLIP's text transformer uses).
pub fn sdpa_causal(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    dispatch(q, k, v, true)
}

fn dispatch(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if cpu_f32(q) && cpu_f32(k) && cpu_f32(v) {
        fused::sdpa(q, k, v, causal)
    } else {
        sdpa_with_budget(q, k, v, causal, DEFAULT_SCORE_BUDGET_BYTES)
    }
}

/// Checks `[B, H, Lq, D]`, `[B, H, Lk, D]`, `[B, H, Lk, Dv]`; returns `(b, h, lq, lk, d, dv)`.
fn check_shapes(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (b, h, lq, d) = q.dims4()?;
    let (kb, kh, lk, kd) = k.dims4()?;
    let (vb, vh, vl, dv) = v.dims4()?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vl) != (b, h, lk) {
        return Err(EngineError::InvalidParam(format!(
            "attention shapes disagree: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if causal && lk < lq {
        return Err(EngineError::InvalidParam(format!(
            "causal attention needs at least as many keys ({lk}) as queries ({lq})"
        )));
    }
    if lk == 0 || d == 0 {
        return Err(EngineError::InvalidParam(format!(
            "attention over no keys or zero-width heads: q {:?}, k {:?}",
            q.dims(),
            k.dims()
        )));
    }
    Ok((b, h, lq, lk, d, dv))
}

/// [`sdpa`] / [`sdpa_causal`] with an explicit byte budget for one chunk's scores.
/// A budget smaller than one score row still processes one row at a time.
pub fn sdpa_with_budget(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    budget_bytes: usize,
) -> Result<Tensor> {
    let (b, h, lq, lk, d, dv) = check_shapes(q, k, v, causal)?;
    let bh = b * h;
    // Scale q (Lq×D values) rather than the scores (Lq×Lk values); this also makes it contiguous.
    let scale = 1.0 / (d as f64).sqrt();
    let q = q.reshape((bh, lq, d))?.affine(scale, 0.0)?;
    let k = k.contiguous()?.reshape((bh, lk, d))?;
    // kᵀ as a strided view: the matmul reads it in place, no copy.
    let kt = k.t()?;
    let v = v.contiguous()?.reshape((bh, lk, dv))?;

    let row_bytes = lk * q.dtype().size_in_bytes();
    // How many (batch·head) slices fit at all, then how many query rows per slice group.
    let bh_step = (budget_bytes / row_bytes.max(1)).clamp(1, bh);
    let rows_step = (budget_bytes / (row_bytes * bh_step).max(1)).clamp(1, lq);

    let mut bh_parts = Vec::with_capacity(bh.div_ceil(bh_step));
    for bh0 in (0..bh).step_by(bh_step) {
        let bn = bh_step.min(bh - bh0);
        let (qg, ktg, vg) = if bn == bh {
            (q.clone(), kt.clone(), v.clone())
        } else {
            (
                q.narrow(0, bh0, bn)?,
                kt.narrow(0, bh0, bn)?,
                v.narrow(0, bh0, bn)?,
            )
        };
        let mut row_parts = Vec::with_capacity(lq.div_ceil(rows_step));
        for r0 in (0..lq).step_by(rows_step) {
            let rn = rows_step.min(lq - r0);
            let qc = if rn == lq {
                qg.clone()
            } else {
                qg.narrow(1, r0, rn)?
            };
            let mut scores = qc.matmul(&ktg)?;
            if causal {
                let mask = causal_mask(r0, rn, lk, lk - lq, scores.dtype(), scores.device())?;
                scores = scores.broadcast_add(&mask)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            drop(scores);
            row_parts.push(probs.matmul(&vg)?);
        }
        bh_parts.push(cat_or_single(row_parts, 1)?);
    }
    let out = cat_or_single(bh_parts, 0)?;
    Ok(out.reshape((b, h, lq, dv))?)
}

fn cat_or_single(mut parts: Vec<Tensor>, dim: usize) -> Result<Tensor> {
    if parts.len() == 1 {
        if let Some(t) = parts.pop() {
            return Ok(t);
        }
    }
    Ok(Tensor::cat(&parts, dim)?)
}

/// Additive mask `[rows, lk]` for query rows `r0..r0+rows`: 0 where key `j <= i + offset`,
/// -inf elsewhere. Every row keeps at least its own position, so softmax stays finite.
fn causal_mask(
    r0: usize,
    rows: usize,
    lk: usize,
    offset: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; rows * lk];
    for i in 0..rows {
        let last = r0 + i + offset;
        for (j, slot) in m[i * lk..(i + 1) * lk].iter_mut().enumerate() {
            if j > last {
                *slot = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (rows, lk), device)?.to_dtype(dtype)?)
}

/// The fused CPU f32 kernel behind [`sdpa`] and [`sdpa_causal`].
pub mod fused {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

    use super::check_shapes;
    use crate::Result;

    /// Query rows per work item (a multiple of MR).
    const QB: usize = 72;
    /// Keys per block of the online softmax.
    const KB: usize = 256;
    /// One register tile: MR rows × NR columns (6 × two 8-lane vectors = 12 accumulators).
    const MR: usize = 6;
    const NR: usize = 16;

    /// `softmax(q kᵀ / sqrt(D)) v` for f32 CPU tensors (see [`super::sdpa`]).
    pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
        sdpa_impl(q, k, v, causal, false)
    }

    /// [`sdpa`] forced onto the portable tiles (tests run both paths on SIMD machines).
    #[cfg(test)]
    pub(super) fn sdpa_portable(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
    ) -> Result<Tensor> {
        sdpa_impl(q, k, v, causal, true)
    }

    fn sdpa_impl(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
        portable: bool,
    ) -> Result<Tensor> {
        let (b, h, lq, _, _, dv) = check_shapes(q, k, v, causal)?;
        // The kernel reads any [B, H, L, D] view whose rows are contiguous (e.g. heads sliced
        // out of a fused QKV projection) in place; anything else is copied first.
        let rows_contiguous = |t: &Tensor| -> Result<Tensor> {
            Ok(if t.stride()[3] == 1 || t.dim(3)? == 1 {
                t.clone()
            } else {
                t.contiguous()?
            })
        };
        let (q, k, v) = (
            rows_contiguous(q)?,
            rows_contiguous(k)?,
            rows_contiguous(v)?,
        );
        let out = q.apply_op3_no_bwd(&k, &v, &FusedAttention { causal, portable })?;
        // The kernel writes token-major [B, Lq, H, Dv]; callers merging heads get it for free.
        debug_assert_eq!(out.dims(), &[b, lq, h, dv]);
        Ok(out.transpose(1, 2)?)
    }

    struct FusedAttention {
        causal: bool,
        portable: bool,
    }

    /// The data of a rank-4 view and its (offset, strides) into it; rows must be contiguous.
    fn view<'a>(
        s: &'a CpuStorage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<(&'a [f32], View)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("fused attention: {what} is not f32");
        };
        let (dims, st) = (l.dims(), l.stride());
        if dims.len() != 4 || (st[3] != 1 && dims[3] != 1) {
            candle_core::bail!("fused attention: {what} rows are not contiguous");
        }
        let v = View {
            off: l.start_offset(),
            batch: st[0],
            head: st[1],
            row: st[2],
        };
        // The last element must be inside the storage (so slicing below cannot fail).
        let last = v.off + (dims[0] - 1) * st[0] + (dims[1] - 1) * st[1] + (dims[2] - 1) * st[2];
        if dims.contains(&0) || last + dims[3] > data.len() {
            candle_core::bail!("fused attention: {what} view {dims:?}/{st:?} outside its storage");
        }
        Ok((data, v))
    }

    impl CustomOp3 for FusedAttention {
        fn name(&self) -> &'static str {
            "fused-sdpa"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let ((q, qv), (k, kv), (v, vv)) =
                (view(s1, l1, "q")?, view(s2, l2, "k")?, view(s3, l3, "v")?);
            let (b, heads, lq, d) = l1.shape().dims4()?;
            let (_, _, lk, _) = l2.shape().dims4()?;
            let (_, _, _, dv) = l3.shape().dims4()?;
            let dims = Dims {
                b,
                heads,
                lq,
                lk,
                d,
                dv,
                q: qv,
                k: kv,
                v: vv,
                scale: 1.0 / (d as f32).sqrt(),
                causal: self.causal,
                portable: self.portable,
            };
            let out = run(q, k, v, &dims);
            Ok((CpuStorage::F32(out), Shape::from_dims(&[b, lq, heads, dv])))
        }
    }

    /// Where row `l` of head `h` of image `b` starts: `off + b·batch + h·head + l·row`.
    #[derive(Clone, Copy)]
    struct View {
        off: usize,
        batch: usize,
        head: usize,
        row: usize,
    }

    impl View {
        fn row(&self, b: usize, h: usize, l: usize) -> usize {
            self.off + b * self.batch + h * self.head + l * self.row
        }
    }

    struct Dims {
        b: usize,
        heads: usize,
        lq: usize,
        lk: usize,
        d: usize,
        dv: usize,
        q: View,
        k: View,
        v: View,
        /// 1/sqrt(D), applied while the query block is laid out.
        scale: f32,
        causal: bool,
        portable: bool,
    }

    /// K and V per (batch·head) in the layouts the register tiles stream linearly:
    /// K as panels of NR keys, each `[D, NR]` (Kᵀ), and V as panels of NR output columns,
    /// each `[Lk_pad, NR]`. Padding is zero.
    struct Packed {
        kt: Vec<f32>,
        v: Vec<f32>,
        lk_pad: usize,
        dv_pad: usize,
    }

    fn pack(k: &[f32], v: &[f32], dims: &Dims) -> Packed {
        let Dims {
            b,
            heads,
            lk,
            d,
            dv,
            ..
        } = *dims;
        let lk_pad = lk.div_ceil(NR) * NR;
        let dv_pad = dv.div_ceil(NR) * NR;
        let bh = b * heads;
        let mut kt = vec![0f32; bh * d * lk_pad];
        let mut vp = vec![0f32; bh * lk_pad * dv_pad];
        let kt_heads = kt.chunks_exact_mut(d * lk_pad);
        let vp_heads = vp.chunks_exact_mut(lk_pad * dv_pad);
        for (i, (ktb, vpb)) in kt_heads.zip(vp_heads).enumerate() {
            let (bi, h) = (i / heads, i % heads);
            for j in 0..lk {
                let row = &k[dims.k.row(bi, h, j)..][..d];
                let panel = &mut ktb[(j / NR) * d * NR..(j / NR + 1) * d * NR];
                for (dd, &x) in row.iter().enumerate() {
                    panel[dd * NR + j % NR] = x;
                }
            }
            for j in 0..lk {
                let row = &v[dims.v.row(bi, h, j)..][..dv];
                for (c, &x) in row.iter().enumerate() {
                    vpb[((c / NR) * lk_pad + j) * NR + c % NR] = x;
                }
            }
        }
        Packed {
            kt,
            v: vp,
            lk_pad,
            dv_pad,
        }
    }

    type Item<'a> = (usize, usize, &'a mut [f32]);

    /// The output is token-major `[B, Lq, H, Dv]`: one work item per (image, block of QB
    /// query rows) owns those rows for every head.
    fn run(q: &[f32], k: &[f32], v: &[f32], dims: &Dims) -> Vec<f32> {
        let row_len = dims.heads * dims.dv;
        let mut out = vec![0f32; dims.b * dims.lq * row_len];
        if out.is_empty() {
            return out;
        }
        let packed = pack(k, v, dims);
        let q_blocks = dims.lq.div_ceil(QB);
        let mut items: Vec<Mutex<Option<Item>>> = Vec::with_capacity(dims.b * q_blocks);
        let mut rest: &mut [f32] = &mut out;
        for b in 0..dims.b {
            for qb in 0..q_blocks {
                let rows = QB.min(dims.lq - qb * QB);
                let (head, tail) = rest.split_at_mut(rows * row_len);
                items.push(Mutex::new(Some((b, qb * QB, head))));
                rest = tail;
            }
        }
        let threads = candle_core::utils::get_num_threads().clamp(1, items.len());
        let next = AtomicUsize::new(0);
        let worker = || {
            let mut scratch = Scratch::new(dims.d, packed.dv_pad);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(slot) = items.get(i) else { break };
                let taken = match slot.lock() {
                    Ok(mut g) => g.take(),
                    Err(p) => p.into_inner().take(),
                };
                if let Some((b, q0, o)) = taken {
                    for h in 0..dims.heads {
                        block(q, &packed, dims, (b, h), q0, o, &mut scratch);
                    }
                }
            }
        };
        if threads == 1 {
            worker();
        } else {
            std::thread::scope(|s| {
                for _ in 1..threads {
                    s.spawn(worker);
                }
                worker();
            });
        }
        out
    }

    /// Per-thread buffers: the query block, the score tile, the output accumulator and the
    /// running max / sum of every row.
    struct Scratch {
        q: Vec<f32>,
        s: Vec<f32>,
        o: Vec<f32>,
        m: Vec<f32>,
        l: Vec<f32>,
    }

    impl Scratch {
        fn new(d: usize, dv_pad: usize) -> Self {
            Self {
                q: vec![0f32; QB * d],
                s: vec![0f32; QB * KB],
                o: vec![0f32; QB * dv_pad],
                m: vec![0f32; QB],
                l: vec![0f32; QB],
            }
        }
    }

    /// The two register-tiled products. Slices are exactly as long as documented; the
    /// implementations check that once and return without touching anything otherwise.
    trait Tiles {
        /// S[r][c0 + c] = Σ_d qtile[d][r] · panel[d][c] for r < MR, c < NR, where `qtile` is
        /// `[D, MR]`, `panel` is `[D, NR]` and `s` holds MR rows of KB scores.
        fn qk(qtile: &[f32], panel: &[f32], s: &mut [f32], c0: usize);
        /// O[r][c0 + c] += Σ_j p[r][j] · vpanel[j][c] for r < MR, c < NR, j < kn, where `p`
        /// holds MR rows of KB probabilities, `vpanel` is `[kn, NR]` and `o` holds MR rows
        /// of `stride` outputs.
        fn pv(p: &[f32], kn: usize, vpanel: &[f32], o: &mut [f32], stride: usize, c0: usize);
    }

    /// Portable fallback (and the reference for the SIMD tiles).
    struct Scalar;

    impl Tiles for Scalar {
        fn qk(qtile: &[f32], panel: &[f32], s: &mut [f32], c0: usize) {
            let mut acc = [[0f32; NR]; MR];
            for (qv, kv) in qtile.chunks_exact(MR).zip(panel.chunks_exact(NR)) {
                for (accr, &a) in acc.iter_mut().zip(qv) {
                    for (x, &k) in accr.iter_mut().zip(kv) {
                        *x += a * k;
                    }
                }
            }
            for (accr, srow) in acc.iter().zip(s.chunks_exact_mut(KB)) {
                srow[c0..c0 + NR].copy_from_slice(accr);
            }
        }

        fn pv(p: &[f32], kn: usize, vpanel: &[f32], o: &mut [f32], stride: usize, c0: usize) {
            for (prow, orow) in p.chunks_exact(KB).zip(o.chunks_exact_mut(stride)) {
                let orow = &mut orow[c0..c0 + NR];
                for (&a, vr) in prow[..kn].iter().zip(vpanel.chunks_exact(NR)) {
                    for (x, &v) in orow.iter_mut().zip(vr) {
                        *x += a * v;
                    }
                }
            }
        }
    }

    /// AVX2 + FMA tiles: 12 accumulators in ymm registers.
    #[cfg(target_arch = "x86_64")]
    struct Avx2;

    #[cfg(target_arch = "x86_64")]
    impl Tiles for Avx2 {
        #[inline(always)]
        fn qk(qtile: &[f32], panel: &[f32], s: &mut [f32], c0: usize) {
            use std::arch::x86_64::*;
            let d = qtile.len() / MR;
            if qtile.len() != d * MR || panel.len() != d * NR || s.len() < MR * KB || c0 + NR > KB {
                return;
            }
            // SAFETY: only called from `block_avx2` (AVX2 and FMA present). Every pointer
            // offset stays inside the slices checked above: qtile[dd·MR + r] with
            // dd < d, r < MR; panel[dd·NR + 0..16]; s[r·KB + c0 + 0..16] with c0 + 16 ≤ KB.
            unsafe {
                let (qp, kp) = (qtile.as_ptr(), panel.as_ptr());
                let mut acc = [[_mm256_setzero_ps(); 2]; MR];
                for dd in 0..d {
                    let k0 = _mm256_loadu_ps(kp.add(dd * NR));
                    let k1 = _mm256_loadu_ps(kp.add(dd * NR + 8));
                    for (r, accr) in acc.iter_mut().enumerate() {
                        let a = _mm256_broadcast_ss(&*qp.add(dd * MR + r));
                        accr[0] = _mm256_fmadd_ps(a, k0, accr[0]);
                        accr[1] = _mm256_fmadd_ps(a, k1, accr[1]);
                    }
                }
                let sp = s.as_mut_ptr();
                for (r, accr) in acc.iter().enumerate() {
                    _mm256_storeu_ps(sp.add(r * KB + c0), accr[0]);
                    _mm256_storeu_ps(sp.add(r * KB + c0 + 8), accr[1]);
                }
            }
        }

        #[inline(always)]
        fn pv(p: &[f32], kn: usize, vpanel: &[f32], o: &mut [f32], stride: usize, c0: usize) {
            use std::arch::x86_64::*;
            if p.len() < MR * KB
                || kn > KB
                || vpanel.len() < kn * NR
                || c0 + NR > stride
                || o.len() < (MR - 1) * stride + c0 + NR
            {
                return;
            }
            // SAFETY: only called from `block_avx2` (AVX2 and FMA present). Offsets stay in
            // the checked slices: p[r·KB + j] with j < kn ≤ KB; vpanel[j·NR + 0..16] with
            // j < kn; o[r·stride + c0 + 0..16] with r < MR.
            unsafe {
                let (pp, vp, op) = (p.as_ptr(), vpanel.as_ptr(), o.as_mut_ptr());
                let mut acc = [[_mm256_setzero_ps(); 2]; MR];
                for (r, accr) in acc.iter_mut().enumerate() {
                    accr[0] = _mm256_loadu_ps(op.add(r * stride + c0));
                    accr[1] = _mm256_loadu_ps(op.add(r * stride + c0 + 8));
                }
                for j in 0..kn {
                    let v0 = _mm256_loadu_ps(vp.add(j * NR));
                    let v1 = _mm256_loadu_ps(vp.add(j * NR + 8));
                    for (r, accr) in acc.iter_mut().enumerate() {
                        let a = _mm256_broadcast_ss(&*pp.add(r * KB + j));
                        accr[0] = _mm256_fmadd_ps(a, v0, accr[0]);
                        accr[1] = _mm256_fmadd_ps(a, v1, accr[1]);
                    }
                }
                for (r, accr) in acc.iter().enumerate() {
                    _mm256_storeu_ps(op.add(r * stride + c0), accr[0]);
                    _mm256_storeu_ps(op.add(r * stride + c0 + 8), accr[1]);
                }
            }
        }
    }

    fn block(
        q: &[f32],
        p: &Packed,
        dims: &Dims,
        bh: (usize, usize),
        q0: usize,
        out: &mut [f32],
        sc: &mut Scratch,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if !dims.portable
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above); the function
                // has no other preconditions.
                unsafe { block_avx2(q, p, dims, bh, q0, out, sc) };
                return;
            }
        }
        block_impl::<Scalar, false>(q, p, dims, bh, q0, out, sc);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn block_avx2(
        q: &[f32],
        p: &Packed,
        dims: &Dims,
        bh: (usize, usize),
        q0: usize,
        out: &mut [f32],
        sc: &mut Scratch,
    ) {
        block_impl::<Avx2, true>(q, p, dims, bh, q0, out, sc);
    }

    /// `a * b + c`, fused when the caller is compiled with FMA (a plain call to `mul_add`
    /// without hardware FMA would go through a slow software routine).
    #[inline(always)]
    fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    /// `e^x` for x ≤ 0 (scores minus their running max), branch-free so it vectorises:
    /// Cody–Waite range reduction to `2^n · e^r`, |r| ≤ ln2/2, and a degree-6 polynomial
    /// (relative error ~2e-7). Anything below -87 (including -inf from masking) gives 0.
    #[inline(always)]
    fn exp_neg<const FMA: bool>(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        // 1.5·2²³: adding it rounds to an integer (ties to even) held in the low mantissa bits.
        const MAGIC: f32 = 12_582_912.0;
        // Plain compare/select and bit tricks only, so every step is one vector instruction.
        let xc = if x > -87.0 { x } else { -87.0 };
        let t = madd::<FMA>(xc, LOG2E, MAGIC);
        let n = t - MAGIC;
        let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, xc));
        let mut y = 1.0 / 720.0;
        y = madd::<FMA>(y, r, 1.0 / 120.0);
        y = madd::<FMA>(y, r, 1.0 / 24.0);
        y = madd::<FMA>(y, r, 1.0 / 6.0);
        y = madd::<FMA>(y, r, 0.5);
        y = madd::<FMA>(y, r, 1.0);
        y = madd::<FMA>(y, r, 1.0);
        // n ∈ [-126, 0]: its two's-complement value sits in t's low bits.
        let ni = t.to_bits().wrapping_sub(MAGIC.to_bits());
        let pow2 = f32::from_bits(ni.wrapping_add(127) << 23);
        if x > -87.0 {
            y * pow2
        } else {
            0.0
        }
    }

    #[inline(always)]
    /// Head `h` of image `b`, query rows `q0..q0 + QB`: `out` holds those rows for all heads
    /// (`H·Dv` values each); this head's columns are `h·Dv..(h + 1)·Dv`.
    fn block_impl<T: Tiles, const FMA: bool>(
        q: &[f32],
        p: &Packed,
        dims: &Dims,
        (b, h): (usize, usize),
        q0: usize,
        out: &mut [f32],
        sc: &mut Scratch,
    ) {
        let Dims {
            heads,
            lq,
            lk,
            d,
            dv,
            scale,
            causal,
            ..
        } = *dims;
        let bh = b * heads + h;
        let (lk_pad, dv_pad) = (p.lk_pad, p.dv_pad);
        let rows = QB.min(lq - q0);
        let rows_pad = rows.div_ceil(MR) * MR;
        // Causal: query row i (global) sees keys up to i + (lk - lq).
        let offset = lk - lq.min(lk);
        let kend = if causal {
            (q0 + rows + offset).min(lk)
        } else {
            lk
        };

        // The query block, scaled by 1/sqrt(D) and transposed per tile of MR rows to `[D, MR]`.
        sc.q[..rows_pad * d].fill(0.0);
        for i in 0..rows {
            let row = &q[dims.q.row(b, h, q0 + i)..][..d];
            let tile = &mut sc.q[(i / MR) * d * MR..(i / MR + 1) * d * MR];
            for (dd, &x) in row.iter().enumerate() {
                tile[dd * MR + i % MR] = x * scale;
            }
        }
        sc.o[..rows_pad * dv_pad].fill(0.0);
        sc.m[..rows_pad].fill(f32::NEG_INFINITY);
        sc.l[..rows_pad].fill(0.0);
        let kt = &p.kt[bh * d * lk_pad..(bh + 1) * d * lk_pad];
        let vv = &p.v[bh * lk_pad * dv_pad..(bh + 1) * lk_pad * dv_pad];

        for kb0 in (0..kend).step_by(KB) {
            let kn = KB.min(kend - kb0);
            let kn_pad = kn.div_ceil(NR) * NR;

            // S = Q · Kᵀ over a rows_pad × kn_pad tile.
            let kpanels = &kt[kb0 * d..(kb0 + kn_pad) * d];
            let q_tiles = sc.q[..rows_pad * d].chunks_exact(d * MR);
            for (qtile, stile) in q_tiles.zip(sc.s.chunks_exact_mut(MR * KB)) {
                for (pi, panel) in kpanels.chunks_exact(d * NR).enumerate() {
                    T::qk(qtile, panel, stile, pi * NR);
                }
            }

            // Online softmax: mask, new running max, rescale what was accumulated so far.
            for i in 0..rows_pad {
                let srow = &mut sc.s[i * KB..i * KB + kn_pad];
                // Padding keys and (causal) future keys form a suffix of the row.
                let visible = if causal {
                    (q0 + i + offset + 1).saturating_sub(kb0).min(kn)
                } else {
                    kn
                };
                srow[visible..].fill(f32::NEG_INFINITY);
                let mut lanes = [f32::NEG_INFINITY; 8];
                for ch in srow.chunks_exact(8) {
                    for (m, &x) in lanes.iter_mut().zip(ch) {
                        *m = if x > *m { x } else { *m };
                    }
                }
                let row_max = lanes.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let m_old = sc.m[i];
                let m_new = m_old.max(row_max);
                if m_new == f32::NEG_INFINITY {
                    // Nothing visible yet in this row (cannot happen: key 0 is always
                    // visible in the first block); keep the state consistent anyway.
                    srow.fill(0.0);
                    continue;
                }
                let alpha = exp_neg::<FMA>(m_old - m_new);
                for x in srow.iter_mut() {
                    *x = exp_neg::<FMA>(*x - m_new);
                }
                let mut sums = [0f32; 8];
                for ch in srow.chunks_exact(8) {
                    for (s, &x) in sums.iter_mut().zip(ch) {
                        *s += x;
                    }
                }
                sc.l[i] = sc.l[i] * alpha + sums.iter().sum::<f32>();
                sc.m[i] = m_new;
                if alpha != 1.0 {
                    for x in &mut sc.o[i * dv_pad..(i + 1) * dv_pad] {
                        *x *= alpha;
                    }
                }
            }

            // O += P · V over rows_pad × dv_pad.
            let p_tiles = sc.s.chunks_exact(MR * KB);
            let o_tiles = sc.o[..rows_pad * dv_pad].chunks_exact_mut(MR * dv_pad);
            for (ptile, otile) in p_tiles.zip(o_tiles) {
                for (ci, vpanel) in vv.chunks_exact(lk_pad * NR).enumerate() {
                    let vpanel = &vpanel[kb0 * NR..(kb0 + kn_pad) * NR];
                    T::pv(ptile, kn_pad, vpanel, otile, dv_pad, ci * NR);
                }
            }
        }

        for (i, orow) in out.chunks_exact_mut(heads * dv).enumerate().take(rows) {
            let inv = 1.0 / sc.l[i];
            let orow = &mut orow[h * dv..(h + 1) * dv];
            for (o, &x) in orow.iter_mut().zip(&sc.o[i * dv_pad..i * dv_pad + dv]) {
                *o = x * inv;
            }
        }
    }
}

/// Reference implementation of the plain formula (whole score matrix), for tests and benches.
pub fn sdpa_reference(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let (lq, lk) = (q.dim(2)?, k.dim(2)?);
    let mut scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
    if causal {
        let mask = causal_mask(0, lq, lk, lk.saturating_sub(lq), scores.dtype(), q.device())?;
        scores = scores.broadcast_add(&mask)?;
    }
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    Ok(probs.matmul(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // Small deterministic LCG so tests need no RNG crate.
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().expect("a").to_vec1().expect("a");
        let b: Vec<f32> = b.flatten_all().expect("b").to_vec1().expect("b");
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    #[test]
    fn chunked_equals_plain_formula() {
        let q = rand(&[2, 3, 37, 8], 1);
        let k = rand(&[2, 3, 29, 8], 2);
        let v = rand(&[2, 3, 29, 5], 3);
        let want = sdpa_reference(&q, &k, &v, false).expect("ref");
        // Budgets: everything at once, a few rows per chunk, one (batch·head) slice and one row at a time.
        for budget in [usize::MAX / 4, 29 * 4 * 6 * 5, 29 * 4 * 2, 1] {
            let got = sdpa_with_budget(&q, &k, &v, false, budget).expect("sdpa");
            assert_eq!(got.dims(), &[2, 3, 37, 5]);
            let diff = max_rel_diff(&got, &want);
            assert!(diff < 1e-5, "budget {budget}: rel diff {diff}");
        }
        let got = sdpa(&q, &k, &v).expect("sdpa");
        assert!(max_rel_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn causal_equals_masked_formula_and_ignores_future_keys() {
        let q = rand(&[1, 2, 11, 4], 4);
        let k = rand(&[1, 2, 11, 4], 5);
        let v = rand(&[1, 2, 11, 4], 6);
        let want = sdpa_reference(&q, &k, &v, true).expect("ref");
        for budget in [usize::MAX / 4, 11 * 4 * 3, 1] {
            let got = sdpa_with_budget(&q, &k, &v, true, budget).expect("sdpa");
            assert!(max_rel_diff(&got, &want) < 1e-5, "budget {budget}");
        }
        // Row 0 attends only to key 0, so its output is exactly v[.., 0, ..].
        let got = sdpa_causal(&q, &k, &v).expect("sdpa");
        let row0 = got.narrow(2, 0, 1).expect("row");
        let v0 = v.narrow(2, 0, 1).expect("v0");
        assert!(max_rel_diff(&row0, &v0) < 1e-6);
        // Changing the last key/value must not change earlier rows.
        let v2 =
            Tensor::cat(&[v.narrow(2, 0, 10).expect("n"), rand(&[1, 2, 1, 4], 9)], 2).expect("cat");
        let got2 = sdpa_causal(&q, &k, &v2).expect("sdpa");
        let a = got.narrow(2, 0, 10).expect("a");
        let b = got2.narrow(2, 0, 10).expect("b");
        assert!(max_rel_diff(&a, &b) < 1e-7);
        // ... while unmasked attention does see it.
        let full = sdpa(&q, &k, &v).expect("full");
        assert!(max_rel_diff(&full, &want) > 1e-3);
    }

    #[test]
    fn non_contiguous_inputs_are_accepted() {
        // [B, L, H, D] transposed to [B, H, L, D], as attention layers produce them.
        let q = rand(&[1, 9, 2, 4], 7).transpose(1, 2).expect("t");
        let k = rand(&[1, 9, 2, 4], 8).transpose(1, 2).expect("t");
        let v = rand(&[1, 9, 2, 4], 9).transpose(1, 2).expect("t");
        let want = sdpa_reference(&q, &k, &v, false).expect("ref");
        let got = sdpa_with_budget(&q, &k, &v, false, 9 * 4).expect("sdpa");
        assert!(max_rel_diff(&got, &want) < 1e-5);

        // Heads sliced out of one fused [B, L, 3, H, D] projection are read in place, with
        // a ragged number of rows and keys; the result is token-major underneath.
        let (b, l, h, d) = (2, 77, 3, 5);
        let qkv = rand(&[b, l, 3, h, d], 10);
        let part = |i: usize| {
            qkv.narrow(2, i, 1)
                .and_then(|t| t.squeeze(2))
                .and_then(|t| t.transpose(1, 2))
                .expect("view")
        };
        let (q, k, v) = (part(0), part(1), part(2));
        assert!(!q.is_contiguous());
        let c = |t: &Tensor| t.contiguous().expect("c");
        let want = sdpa_reference(&c(&q), &c(&k), &c(&v), false).expect("ref");
        for got in [
            fused::sdpa(&q, &k, &v, false).expect("fused"),
            fused::sdpa_portable(&q, &k, &v, false).expect("portable"),
        ] {
            assert!(max_rel_diff(&got, &want) < 1e-5);
            assert!(got.transpose(1, 2).expect("t").is_contiguous());
        }
    }

    #[test]
    fn fused_kernel_handles_ragged_shapes() {
        // Sizes that are not multiples of the 6×16 register tile or the 72×256 blocks.
        for (lq, lk, d, dv) in [
            (70, 300, 5, 7),
            (1, 1, 3, 2),
            (130, 17, 40, 40),
            (5, 520, 16, 33),
        ] {
            let q = rand(&[2, 3, lq, d], 11);
            let k = rand(&[2, 3, lk, d], 12);
            let v = rand(&[2, 3, lk, dv], 13);
            let want = sdpa_reference(&q, &k, &v, false).expect("ref");
            for portable in [false, true] {
                let got = if portable {
                    fused::sdpa_portable(&q, &k, &v, false)
                } else {
                    fused::sdpa(&q, &k, &v, false)
                }
                .expect("fused");
                assert_eq!(got.dims(), &[2, 3, lq, dv]);
                let diff = max_rel_diff(&got, &want);
                assert!(
                    diff < 1e-5,
                    "{lq}x{lk} d{d} dv{dv} {portable}: rel diff {diff}"
                );
            }
        }
        // Causal, across several key blocks, square (CLIP) and with more keys than queries.
        for (lq, lk) in [(77, 77), (300, 300), (40, 600)] {
            let q = rand(&[1, 2, lq, 8], 21);
            let k = rand(&[1, 2, lk, 8], 22);
            let v = rand(&[1, 2, lk, 8], 23);
            let want = sdpa_reference(&q, &k, &v, true).expect("ref");
            let got = fused::sdpa(&q, &k, &v, true).expect("fused");
            let diff = max_rel_diff(&got, &want);
            assert!(diff < 1e-5, "causal {lq}x{lk}: rel diff {diff}");
            let got = fused::sdpa_portable(&q, &k, &v, true).expect("fused");
            let diff = max_rel_diff(&got, &want);
            assert!(diff < 1e-5, "portable causal {lq}x{lk}: rel diff {diff}");
        }
    }

    #[test]
    fn fused_kernel_is_stable_for_large_scores() {
        // Scores far beyond exp's range must not overflow (the running max is subtracted).
        let q = (rand(&[1, 1, 9, 4], 31) * 300.0).expect("scale");
        let k = (rand(&[1, 1, 600, 4], 32) * 300.0).expect("scale");
        let v = rand(&[1, 1, 600, 3], 33);
        let want = sdpa_reference(&q, &k, &v, false).expect("ref");
        let got = sdpa(&q, &k, &v).expect("fused");
        assert!(max_rel_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let q = rand(&[1, 2, 3, 4], 1);
        let k = rand(&[1, 2, 5, 3], 2);
        let v = rand(&[1, 2, 5, 4], 3);
        assert!(sdpa(&q, &k, &v).is_err());
        let k = rand(&[1, 2, 2, 4], 2);
        let v = rand(&[1, 2, 2, 4], 3);
        assert!(sdpa_causal(&q, &k, &v).is_err());
    }
}
