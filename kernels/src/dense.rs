//! Linears over f32, bf16 and f16 weights read as stored (safetensors checkpoints).
//!
//! Decode (fewer than [`GEMV_MAX_ROWS`] activation rows) reads each weight row once, converting
//! it to f32 in registers: a bf16 step moves bf16 bytes, never an f32 copy of the weight. Each
//! path gives the f32 dot product up to summation order:
//! - portable: plain Rust, eight accumulators;
//! - AVX2 (with F16C; also the `avxvnni` level): 8 lanes, bf16 widened by a shift, f16 by `vcvtph2ps`;
//! - AVX-512 (the `avx512vnni` level): 16 lanes; and where the CPU has AVX512-BF16 and the
//!   activation row is exactly representable in bf16 (a bf16 model's activations are), bf16
//!   weights go through `vdpbf16ps`: bf16 products are exact in f32, so this is the same sum.
//!
//! Prefill (more rows) converts a tile of weight rows at a time to f32 into an f32 GEMM
//! ([`crate::cpu::tiled_linear`]); f32 weights go straight to the GEMM.

use crate::isa::CpuKernels;
use half::{bf16, f16};

/// Below this many activation rows a linear reads its weight row by row (decode); from it on,
/// tile by tile into an f32 GEMM.
pub const GEMV_MAX_ROWS: usize = 8;

/// A dense weight `[n, k]`, row-major, in its stored dtype.
#[derive(Clone, Copy, Debug)]
pub enum Dense<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Dense<'a> {
    /// Values `start..start + len` (one expert's matrix of a stacked weight).
    pub fn range(&self, start: usize, len: usize) -> Dense<'a> {
        let r = start..start + len;
        match *self {
            Dense::F32(w) => Dense::F32(&w[r]),
            Dense::BF16(w) => Dense::BF16(&w[r]),
            Dense::F16(w) => Dense::F16(&w[r]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Dense::F32(w) => w.len(),
            Dense::BF16(w) => w.len(),
            Dense::F16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `j0..j1` (of `k` values) as f32 into `out`.
    fn rows_f32(&self, k: usize, j0: usize, j1: usize, out: &mut [f32]) {
        let r = j0 * k..j1 * k;
        match self {
            Dense::F32(w) => out.copy_from_slice(&w[r]),
            Dense::BF16(w) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(&w[r], out),
            Dense::F16(w) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(&w[r], out),
        }
    }
}

/// How one activation row meets the weight rows, chosen once per call.
enum Path {
    Portable,
    Avx2,
    Avx512,
    /// `vdpbf16ps` with the row in bf16 (exact: every value was a bf16).
    Avx512Bf16(Vec<u16>),
}

/// Whether the CPU has AVX512-BF16 (`vdpbf16ps`), on top of the `avx512vnni` level.
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn path_for(kernels: CpuKernels, w: &Dense, x: &[f32]) -> Path {
    match kernels.at_most_detected() {
        CpuKernels::Portable => Path::Portable,
        CpuKernels::Avx2 | CpuKernels::AvxVnni => Path::Avx2,
        CpuKernels::Avx512Vnni => {
            if matches!(w, Dense::BF16(_)) && has_avx512_bf16() && x.iter().all(|v| v.to_bits() & 0xffff == 0) {
                Path::Avx512Bf16(x.iter().map(|v| (v.to_bits() >> 16) as u16).collect())
            } else {
                Path::Avx512
            }
        }
    }
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ + bias`, W read as stored; `kernels` caps the SIMD path
/// (within what the CPU runs).
#[allow(clippy::too_many_arguments)]
pub fn dense_linear(
    kernels: CpuKernels,
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    w: Dense,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    assert_eq!(w.len(), n * k, "dense linear weight");
    assert_eq!(x.len(), m * k, "dense linear input");
    assert_eq!(y.len(), m * n, "dense linear output");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "dense linear bias");
    }
    if m >= GEMV_MAX_ROWS || k == 0 {
        match w {
            Dense::F32(wf) => return crate::cpu::linear(m, n, k, x, wf, bias, y),
            _ => crate::cpu::tiled_linear(m, n, k, x, &|j0, j1, tile| w.rows_f32(k, j0, j1, tile), y),
        }
    } else {
        let paths: Vec<Path> = x.chunks(k).map(|xr| path_for(kernels, &w, xr)).collect();
        // About 8 chunks per thread (as the block kernels), whole 16-row groups.
        let chunk = n.div_ceil(8 * crate::pool::threads()).next_multiple_of(16).max(16);
        crate::pool::by_channel_chunks(m, n, chunk, y, |i, out, first| {
            let xr = &x[i * k..(i + 1) * k];
            for (r, o) in out.iter_mut().enumerate() {
                *o = dot_row(&paths[i], &w, first + r, k, xr);
            }
        });
    }
    crate::quant::add_bias(y, n, bias);
}

/// Weight row `j` against `x` on `path`.
fn dot_row(path: &Path, w: &Dense, j: usize, k: usize, x: &[f32]) -> f32 {
    let r = j * k..(j + 1) * k;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `path_for` picked each SIMD path only where the CPU has its features (AVX2, FMA,
    // F16C for `Avx2`; AVX-512 F/BW for `Avx512`; AVX512-BF16 too for `Avx512Bf16`), and the
    // row and `x` are both `k` long (checked by the caller).
    unsafe {
        let (p, t) = match w {
            Dense::F32(w) => (w[r.clone()].as_ptr() as *const u8, 0),
            Dense::BF16(w) => (w[r.clone()].as_ptr() as *const u8, 1),
            Dense::F16(w) => (w[r.clone()].as_ptr() as *const u8, 2),
        };
        match (path, t) {
            (Path::Portable, _) => {}
            (Path::Avx2, 0) => return simd::dot256::<0>(p, x),
            (Path::Avx2, 1) => return simd::dot256::<1>(p, x),
            (Path::Avx2, _) => return simd::dot256::<2>(p, x),
            (Path::Avx512Bf16(xb), 1) => return simd::dot_bf16(p as *const u16, xb),
            (_, 0) => return simd::dot512::<0>(p, x),
            (_, 1) => return simd::dot512::<1>(p, x),
            (_, _) => return simd::dot512::<2>(p, x),
        }
    }
    let _ = path;
    match w {
        Dense::F32(w) => dot_portable(&w[r], x, |v| *v),
        Dense::BF16(w) => dot_portable(&w[r], x, |v| v.to_f32()),
        Dense::F16(w) => dot_portable(&w[r], x, |v| v.to_f32()),
    }
}

fn dot_portable<T>(w: &[T], x: &[f32], f: impl Fn(&T) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
    let (wt, xt) = (wc.remainder(), xc.remainder());
    for (wb, xb) in wc.zip(xc) {
        for l in 0..8 {
            acc[l] += f(&wb[l]) * xb[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in wt.iter().zip(xt) {
        s += f(a) * b;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// 8 weights at `p` (element `i`) as f32: `T` 0 = f32, 1 = bf16, 2 = f16.
    #[inline(always)]
    unsafe fn load8<const T: u8>(p: *const u8, i: usize) -> __m256 {
        match T {
            0 => _mm256_loadu_ps((p as *const f32).add(i)),
            1 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                (p as *const u16).add(i) as *const __m128i,
            )))),
            _ => _mm256_cvtph_ps(_mm_loadu_si128((p as *const u16).add(i) as *const __m128i)),
        }
    }

    /// 16 weights at `p` (element `i`) as f32.
    #[inline(always)]
    unsafe fn load16<const T: u8>(p: *const u8, i: usize) -> __m512 {
        match T {
            0 => _mm512_loadu_ps((p as *const f32).add(i)),
            1 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                (p as *const u16).add(i) as *const __m256i,
            )))),
            _ => _mm512_cvtph_ps(_mm256_loadu_si256((p as *const u16).add(i) as *const __m256i)),
        }
    }

    /// The scalar tail: element `i` of the row at `p` as f32.
    #[inline(always)]
    unsafe fn at<const T: u8>(p: *const u8, i: usize) -> f32 {
        match T {
            0 => *(p as *const f32).add(i),
            1 => f32::from_bits((*(p as *const u16).add(i) as u32) << 16),
            _ => half::f16::from_bits(*(p as *const u16).add(i)).to_f32(),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot256<const T: u8>(w: *const u8, x: &[f32]) -> f32 {
        let (k, xp) = (x.len(), x.as_ptr());
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= k {
            a0 = _mm256_fmadd_ps(load8::<T>(w, i), _mm256_loadu_ps(xp.add(i)), a0);
            a1 = _mm256_fmadd_ps(load8::<T>(w, i + 8), _mm256_loadu_ps(xp.add(i + 8)), a1);
            i += 16;
        }
        if i + 8 <= k {
            a0 = _mm256_fmadd_ps(load8::<T>(w, i), _mm256_loadu_ps(xp.add(i)), a0);
            i += 8;
        }
        let s = _mm256_add_ps(a0, a1);
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut r = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
        while i < k {
            r += at::<T>(w, i) * x[i];
            i += 1;
        }
        r
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn dot512<const T: u8>(w: *const u8, x: &[f32]) -> f32 {
        let (k, xp) = (x.len(), x.as_ptr());
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= k {
            a0 = _mm512_fmadd_ps(load16::<T>(w, i), _mm512_loadu_ps(xp.add(i)), a0);
            a1 = _mm512_fmadd_ps(load16::<T>(w, i + 16), _mm512_loadu_ps(xp.add(i + 16)), a1);
            i += 32;
        }
        if i + 16 <= k {
            a0 = _mm512_fmadd_ps(load16::<T>(w, i), _mm512_loadu_ps(xp.add(i)), a0);
            i += 16;
        }
        let mut r = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        while i < k {
            r += at::<T>(w, i) * x[i];
            i += 1;
        }
        r
    }

    /// bf16 weights against the activation row in bf16 (`xb`), 32 products a `vdpbf16ps`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn dot_bf16(w: *const u16, xb: &[u16]) -> f32 {
        let (k, xp) = (xb.len(), xb.as_ptr());
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let ld = |p: *const u16| -> __m512bh { std::mem::transmute(_mm512_loadu_si512(p as *const _)) };
        let mut i = 0;
        while i + 64 <= k {
            a0 = _mm512_dpbf16_ps(a0, ld(w.add(i)), ld(xp.add(i)));
            a1 = _mm512_dpbf16_ps(a1, ld(w.add(i + 32)), ld(xp.add(i + 32)));
            i += 64;
        }
        if i + 32 <= k {
            a0 = _mm512_dpbf16_ps(a0, ld(w.add(i)), ld(xp.add(i)));
            i += 32;
        }
        let mut r = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        while i < k {
            r += f32::from_bits((*w.add(i) as u32) << 16) * f32::from_bits((xb[i] as u32) << 16);
            i += 1;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tests::rand;

    /// The f64 reference of `x · Wᵀ + bias` with W given as f32.
    fn reference(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
                y[i * n + j] = (s + bias[j] as f64) as f32;
            }
        }
        y
    }

    fn check(got: &[f32], want: &[f32], what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: element {i}: {g} vs {w}");
        }
    }

    /// Every path the CPU runs, every dtype, decode and prefill row counts, lengths with and
    /// without SIMD tails, against the f64 reference of the same (rounded) weights.
    #[test]
    fn every_path_matches_the_reference() {
        for &(m, n, k) in &[(1, 37, 64), (1, 40, 576), (3, 33, 100), (2, 16, 7), (9, 50, 96), (1, 5, 0)] {
            let x32 = rand(m * k, 1);
            let wf = rand(n * k, 2);
            let bias = rand(n, 3);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            // Activations as a bf16 model has them (exact in bf16), and arbitrary f32.
            let xb: Vec<f32> = x32.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            for x in [&x32, &xb] {
                for (w, wref) in [
                    (Dense::F32(&wf), wf.clone()),
                    (Dense::BF16(&wb), wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
                    (Dense::F16(&wh), wh.iter().map(|v| v.to_f32()).collect()),
                ] {
                    let want = reference(m, n, k, x, &wref, &bias);
                    for path in CpuKernels::ALL.into_iter().filter(|p| p.supported()) {
                        let mut y = vec![f32::NAN; m * n];
                        dense_linear(path, m, n, k, x, w, Some(&bias), &mut y);
                        check(
                            &y,
                            &want,
                            &format!("{m}x{n}x{k} {w:?} on {}", path.name()).chars().take(60).collect::<String>(),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rows_take_the_bf16_instruction_only_when_exact() {
        if !(CpuKernels::Avx512Vnni.supported() && has_avx512_bf16()) {
            return;
        }
        let w = vec![bf16::ONE; 4];
        assert!(matches!(path_for(CpuKernels::Avx512Vnni, &Dense::BF16(&w), &[1.0, 0.5]), Path::Avx512Bf16(_)));
        assert!(matches!(path_for(CpuKernels::Avx512Vnni, &Dense::BF16(&w), &[1.0, 0.1]), Path::Avx512));
        assert!(matches!(path_for(CpuKernels::Avx2, &Dense::BF16(&w), &[1.0, 0.5]), Path::Avx2));
    }
}
