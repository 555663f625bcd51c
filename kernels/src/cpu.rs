//! CPU kernels in f32: GEMM through the `gemm` crate (blocked, SIMD, all cores through rayon)
//! and attention. Callers convert other dtypes to f32 and round the result, which is what torch's
//! CPU kernels do for bf16/f16 (f32 accumulation, one rounding at the end).

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

pub use crate::quant::BlockKind;

/// Row-major strided view of a matrix operand: element (r, c) is at `r * rs + c * cs`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        MatRef { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major `[cols, rows]` matrix, without copying.
    pub fn transposed(data: &'a [f32], rows_of_stored: usize) -> Self {
        MatRef { data, rs: 1, cs: rows_of_stored }
    }
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(last < self.data.len(), "{what}: {rows}x{cols} view exceeds buffer of {}", self.data.len());
    }
}

fn parallelism(flops: usize) -> Parallelism {
    // Below ~64k multiply-adds, spawning threads costs more than it saves.
    if flops < (1 << 16) || rayon::current_num_threads() == 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// `c[m, n] = a[m, k] · b[k, n]` (c row-major, overwritten).
pub fn matmul(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32]) {
    a.check(m, k, "matmul lhs");
    b.check(k, n, "matmul rhs");
    assert_eq!(c.len(), m * n, "matmul output");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    // SAFETY: the views were bounds-checked above and `c` is exactly m*n, row-major.
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m * n * k),
        );
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]`: torch's `linear`.
pub fn linear(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    matmul(m, n, k, MatRef::row_major(x, k), MatRef::transposed(w, k), y);
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear bias");
        for row in y.chunks_exact_mut(n) {
            for (o, bi) in row.iter_mut().zip(b) {
                *o += bi;
            }
        }
    }
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ` for many rows (prefill) with `W` in a format the GEMM does not
/// read: `fill(j0, j1, tile)` writes rows `j0..j1` of W as f32 into a per-thread tile (about 128
/// KiB, so it stays in cache), that tile's GEMM runs single-threaded, and tiles spread over the
/// pool. W is never expanded whole.
pub(crate) fn tiled_linear(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    fill: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
    y: &mut [f32],
) {
    assert_eq!(x.len(), m * k, "tiled linear input");
    assert_eq!(y.len(), m * n, "tiled linear output");
    thread_local! {
        static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let tn = (32768 / k.max(1)).next_multiple_of(16).clamp(16, 256);
    struct Out(*mut f32);
    // SAFETY: tiles write disjoint column ranges of `y` (see below).
    unsafe impl Sync for Out {}
    let out = Out(y.as_mut_ptr());
    let out = &out;
    crate::pool::for_each_chunk(n.div_ceil(tn), &|t| {
        let (j0, j1) = (t * tn, ((t + 1) * tn).min(n));
        TILE.with_borrow_mut(|tile| {
            tile.resize((j1 - j0) * k, 0.0);
            fill(j0, j1, tile);
            // SAFETY: x is m×k row-major, the tile (j1-j0)×k row-major, read as its transpose;
            // the destination is columns j0..j1 of y (m×n row-major), which no other tile
            // writes, and y outlives the pool call.
            unsafe {
                gemm(
                    m,
                    j1 - j0,
                    k,
                    out.0.add(j0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    tile.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    });
}

/// Dimensions of a scaled-dot-product attention call, layout `[batch, heads, seq, dim]`.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub v_dim: usize,
}

/// Keys or values as an FP8 (E4M3) KV cache at `scale` stores and returns them: each
/// `e4m3(x / scale) · scale`, saturating at ±448·scale.
pub fn kv_fp8_round(xs: &mut [f32], scale: f32) {
    xs.iter_mut().for_each(|x| *x = crate::quant::lowbit::fake_quant_e4m3(*x, scale));
}

/// How attention scores are formed and masked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    pub scale: f32,
    /// Key j > query i is masked (top-left aligned, as torch's `is_causal`).
    pub causal: bool,
    /// With `causal`: query i sees only keys j > i - window (itself and the window - 1 before
    /// it), as transformers' sliding-window masks.
    pub window: Option<usize>,
    /// With `causal`: query i sees only the keys of its own chunk of `chunk` positions,
    /// j ≥ ⌊i / chunk⌋·chunk (Llama 4's chunked attention).
    pub chunk: Option<usize>,
    /// Scores become `cap · tanh(score / cap)` before the mask (Gemma 2's soft-capping).
    pub softcap: Option<f32>,
    /// K and V as an FP8 KV cache holds them, `(k_scale, v_scale)`: each value `x` read back as
    /// `e4m3(x / scale) · scale` (`kv_fp8_round`). The kernels take k and v as given; whoever
    /// stores or hands them over rounds them.
    pub kv_fp8: Option<(f32, f32)>,
}

impl Scores {
    pub fn causal(scale: f32) -> Scores {
        Scores { scale, causal: true, window: None, chunk: None, softcap: None, kv_fp8: None }
    }

    /// The first key position a query at position `pos` sees.
    #[inline]
    pub fn first_key(&self, pos: usize) -> usize {
        let w = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let c = self.chunk.map_or(0, |c| pos / c.max(1) * c.max(1));
        w.max(c)
    }

    /// A raw dot product's score: scaled, then soft-capped.
    #[inline]
    pub fn score(&self, dot: f32) -> f32 {
        let s = dot * self.scale;
        match self.softcap {
            Some(c) => c * (s / c).tanh(),
            None => s,
        }
    }
}

/// torch's `scaled_dot_product_attention` without a mask tensor: softmax(q·kᵀ·scale)·v, query
/// head h reading kv head h / (q_heads / kv_heads), masked and capped as `sc` says.
pub fn attention(d: AttnDims, q: &[f32], k: &[f32], v: &[f32], sc: Scores, out: &mut [f32]) {
    assert!(
        d.kv_heads > 0 && d.q_heads.is_multiple_of(d.kv_heads),
        "attention: heads {} vs kv heads {}",
        d.q_heads,
        d.kv_heads
    );
    assert_eq!(q.len(), d.batch * d.q_heads * d.q_len * d.head_dim, "attention q");
    assert_eq!(k.len(), d.batch * d.kv_heads * d.kv_len * d.head_dim, "attention k");
    assert_eq!(v.len(), d.batch * d.kv_heads * d.kv_len * d.v_dim, "attention v");
    assert_eq!(out.len(), d.batch * d.q_heads * d.q_len * d.v_dim, "attention out");
    let group = d.q_heads / d.kv_heads;
    // One task per (batch, head, query row): rows are independent.
    out.par_chunks_mut(d.v_dim).enumerate().for_each_init(
        || vec![0f32; d.kv_len],
        |scores, (row, o)| {
            let i = row % d.q_len;
            let bh = row / d.q_len;
            let (b, h) = (bh / d.q_heads, bh % d.q_heads);
            let kvh = b * d.kv_heads + h / group;
            let qrow = &q[row * d.head_dim..(row + 1) * d.head_dim];
            let kbase = &k[kvh * d.kv_len * d.head_dim..(kvh + 1) * d.kv_len * d.head_dim];
            let vbase = &v[kvh * d.kv_len * d.v_dim..(kvh + 1) * d.kv_len * d.v_dim];
            let end = if sc.causal { (i + 1).min(d.kv_len) } else { d.kv_len };
            let first = if sc.causal { sc.first_key(i).min(end) } else { 0 };
            let n = end - first;
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores[..n].iter_mut().enumerate() {
                let krow = &kbase[(first + j) * d.head_dim..(first + j + 1) * d.head_dim];
                *s = sc.score(dot(qrow, krow));
                max = max.max(*s);
            }
            o.fill(0.0);
            if n == 0 {
                // torch yields NaN for a fully masked row; no row is fully masked when kv_len > 0.
                o.fill(f32::NAN);
                return;
            }
            let mut sum = 0.0f32;
            for s in scores[..n].iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (j, &p) in scores[..n].iter().enumerate() {
                let vrow = &vbase[(first + j) * d.v_dim..(first + j + 1) * d.v_dim];
                for (oo, vv) in o.iter_mut().zip(vrow) {
                    *oo += p * vv;
                }
            }
            let inv = 1.0 / sum;
            for oo in o.iter_mut() {
                *oo *= inv;
            }
        },
    );
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { simd::dot(a, b) };
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise the loop.
    let mut acc = [0f32; 8];
    let n = a.len().min(b.len());
    let chunks = n / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..n {
        s += a[i] * b[i];
    }
    s
}

/// The memory read bandwidth this machine gives the decode kernels, in bytes per second:
/// summing a 512 MiB buffer (far larger than the caches) on the decode pool, best of 3. The
/// floor a CPU decode step is held to is weight bytes over this.
pub fn measure_read_bandwidth() -> f64 {
    let buf = vec![1u64; 64 << 20];
    let chunk = 1 << 16;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let sums: Vec<std::sync::atomic::AtomicU64> =
            (0..buf.len() / chunk).map(|_| std::sync::atomic::AtomicU64::new(0)).collect();
        let t0 = std::time::Instant::now();
        crate::pool::for_each_chunk(sums.len(), &|c| {
            let s = buf[c * chunk..(c + 1) * chunk].iter().fold(0u64, |a, v| a.wrapping_add(*v));
            sums[c].store(s, std::sync::atomic::Ordering::Relaxed);
        });
        best = best.min(t0.elapsed().as_secs_f64());
        std::hint::black_box(&sums);
    }
    (buf.len() * 8) as f64 / best
}

/// `y += alpha · x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { simd::axpy(alpha, x, y) };
    }
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

/// `out[i] = scale · (a · b[i·stride ..][..a.len()])`: one query against a run of keys `stride`
/// apart (a page of the KV cache), in one call.
pub fn dots_strided(a: &[f32], b: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    let d = a.len();
    if let Some(last) = out.len().checked_sub(1) {
        assert!(
            last * stride + d <= b.len(),
            "dots_strided: {} rows of {d} at stride {stride} exceed {}",
            out.len(),
            b.len()
        );
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); every row is in bounds (asserted).
        return unsafe { simd::dots_strided(a, b, stride, scale, out) };
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = dot_portable(a, &b[i * stride..i * stride + d]) * scale;
    }
}

/// `y += Σ_i w[i] · x[i·stride ..][..y.len()]`: the weighted sum of a run of values `stride`
/// apart (a page of the KV cache), in one call.
pub fn axpys_strided(w: &[f32], x: &[f32], stride: usize, y: &mut [f32]) {
    let d = y.len();
    if let Some(last) = w.len().checked_sub(1) {
        assert!(
            last * stride + d <= x.len(),
            "axpys_strided: {} rows of {d} at stride {stride} exceed {}",
            w.len(),
            x.len()
        );
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); every row is in bounds (asserted).
        return unsafe { simd::axpys_strided(w, x, stride, y) };
    }
    for (i, &a) in w.iter().enumerate() {
        for (o, v) in y.iter_mut().zip(&x[i * stride..i * stride + d]) {
            *o += a * v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
            i += 16;
        }
        if i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            i += 8;
        }
        let s = _mm256_add_ps(s0, s1);
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut r = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
        while i < n {
            r += a[i] * b[i];
            i += 1;
        }
        r
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_strided(a: &[f32], b: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = dot(a, b.get_unchecked(i * stride..i * stride + a.len())) * scale;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpys_strided(w: &[f32], x: &[f32], stride: usize, y: &mut [f32]) {
        let d = y.len();
        for (i, &a) in w.iter().enumerate() {
            axpy(a, x.get_unchecked(i * stride..i * stride + d), y);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))));
            i += 8;
        }
        while i < n {
            y[i] += alpha * x[i];
            i += 1;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn naive_matmul(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    /// Deterministic values in [-1, 1) (xorshift), shared by the kernels' tests.
    pub(crate) fn rand(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matmul_and_linear_match_naive() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 96, 128)] {
            let a = rand(m * k, 1);
            let b = rand(k * n, 2);
            let mut c = vec![0f32; m * n];
            matmul(m, n, k, MatRef::row_major(&a, k), MatRef::row_major(&b, n), &mut c);
            let r = naive_matmul(m, n, k, &a, &b);
            for (x, y) in c.iter().zip(&r) {
                assert!((x - y).abs() < 1e-4, "{m}x{n}x{k}: {x} vs {y}");
            }
            // linear with w = bᵀ stored [n, k]
            let mut w = vec![0f32; n * k];
            for p in 0..k {
                for j in 0..n {
                    w[j * k + p] = b[p * n + j];
                }
            }
            let bias = rand(n, 3);
            let mut y = vec![0f32; m * n];
            linear(m, n, k, &a, &w, Some(&bias), &mut y);
            for i in 0..m * n {
                assert!((y[i] - r[i] - bias[i % n]).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn dot_and_axpy_match_scalar_at_every_length() {
        for n in [0, 1, 7, 8, 15, 16, 17, 64, 100] {
            let (a, b) = (rand(n, 3), rand(n, 4));
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-5, "dot of {n}");
            assert!((dot_portable(&a, &b) - want).abs() < 1e-5, "portable dot of {n}");
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            assert!(y.iter().zip(a.iter().zip(&b)).all(|(o, (x, z))| (o - (z + 0.5 * x)).abs() < 1e-6), "axpy of {n}");
        }
    }

    #[test]
    fn strided_runs_match_one_call_per_row() {
        for (rows, d, stride) in [(0, 64, 192), (1, 64, 64), (5, 64, 192), (16, 17, 40)] {
            let a = rand(d, 7);
            let b = rand(rows.max(1) * stride + d, 8);
            let mut got = vec![0f32; rows];
            dots_strided(&a, &b, stride, 0.25, &mut got);
            for (i, g) in got.iter().enumerate() {
                let want = 0.25 * dot_portable(&a, &b[i * stride..i * stride + d]);
                assert!((g - want).abs() < 1e-5, "dots_strided row {i} of {rows}x{d}: {g} vs {want}");
            }
            let w = rand(rows, 9);
            let (mut y, mut want) = (rand(d, 10), rand(d, 10));
            axpys_strided(&w, &b, stride, &mut y);
            for (i, &wi) in w.iter().enumerate() {
                for (o, v) in want.iter_mut().zip(&b[i * stride..i * stride + d]) {
                    *o += wi * v;
                }
            }
            assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "axpys_strided {rows}x{d}");
        }
    }

    #[test]
    fn attention_matches_naive_with_gqa_and_causal() {
        let d = AttnDims { batch: 2, q_heads: 4, kv_heads: 2, q_len: 5, kv_len: 5, head_dim: 8, v_dim: 8 };
        let q = rand(2 * 4 * 5 * 8, 4);
        let k = rand(2 * 2 * 5 * 8, 5);
        let v = rand(2 * 2 * 5 * 8, 6);
        let mut out = vec![0f32; q.len()];
        attention(d, &q, &k, &v, Scores::causal(0.3), &mut out);
        // Query row 0 attends only key 0: output equals v row 0 of its kv head.
        for b in 0..2 {
            for h in 0..4 {
                let o = &out[((b * 4 + h) * 5) * 8..][..8];
                let vr = &v[((b * 2 + h / 2) * 5) * 8..][..8];
                assert_eq!(o, vr);
            }
        }
        // Last row: full softmax over all keys, computed naively.
        let (b, h, i) = (1, 3, 4);
        let qr = &q[((b * 4 + h) * 5 + i) * 8..][..8];
        let kv = b * 2 + h / 2;
        let s: Vec<f32> = (0..5).map(|j| dot(qr, &k[(kv * 5 + j) * 8..][..8]) * 0.3).collect();
        let mx = s.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
        let z: f32 = e.iter().sum();
        for c in 0..8 {
            let want: f32 = (0..5).map(|j| e[j] / z * v[(kv * 5 + j) * 8 + c]).sum();
            let got = out[((b * 4 + h) * 5 + i) * 8 + c];
            assert!((want - got).abs() < 1e-5, "{want} vs {got}");
        }
    }

    #[test]
    fn attention_window_and_softcap_match_naive() {
        let d = AttnDims { batch: 1, q_heads: 2, kv_heads: 1, q_len: 7, kv_len: 7, head_dim: 8, v_dim: 8 };
        let q = rand(2 * 7 * 8, 14);
        let k = rand(7 * 8, 15);
        let v = rand(7 * 8, 16);
        let sc = Scores { scale: 0.9, causal: true, window: Some(3), chunk: None, softcap: Some(0.5), kv_fp8: None };
        let mut out = vec![0f32; q.len()];
        attention(d, &q, &k, &v, sc, &mut out);
        for h in 0..2 {
            for i in 0..7 {
                let qr = &q[(h * 7 + i) * 8..][..8];
                // Keys i-2..=i (window 3), each score capped at 0.5·tanh(s/0.5).
                let keys: Vec<usize> = (0..7).filter(|&j| j <= i && i - j < 3).collect();
                let s: Vec<f32> = keys.iter().map(|&j| 0.5 * (0.9 * dot(qr, &k[j * 8..][..8]) / 0.5).tanh()).collect();
                let mx = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                for c in 0..8 {
                    let want: f32 = keys.iter().zip(&e).map(|(&j, &p)| p / z * v[j * 8 + c]).sum();
                    let got = out[(h * 7 + i) * 8 + c];
                    assert!((want - got).abs() < 1e-5, "head {h} row {i}: {want} vs {got}");
                }
            }
        }
    }
}
