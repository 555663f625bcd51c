//! The AVX2/FMA/F16C kernels (x86-64 CPUs since 2013; the AMD Zen 1 the quick start was tuned
//! on): f32 activations against blocks, and int8 activations with `pmaddubsw`/`pmaddwd`.

use super::{BlockKind, QuantRow};
use std::arch::x86_64::*;

/// IEEE half at byte `i` through the F16C instruction (the AVX-512 kernels' too).
#[inline(always)]
pub(super) unsafe fn f16le(b: *const u8, i: usize) -> f32 {
    let h = u16::from_le_bytes([*b.add(i), *b.add(i + 1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    hsum128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)))
}

#[inline(always)]
unsafe fn hsum128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// 8 unsigned bytes at `p` as 8 f32.
#[inline(always)]
unsafe fn u8x8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
}

/// One weight row against f32 `x`: the same value as the scalar `qdot_row`, 8 wide.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `b` indexes the blocks of the row, x and xsum together
unsafe fn qdot_row(kind: BlockKind, row: *const u8, x: &[f32], xsum: &[f32]) -> f32 {
    let nb = x.len() / 32;
    let bs = kind.bytes();
    let mut acc = _mm256_setzero_ps();
    let mut tail = 0f32;
    let xp = x.as_ptr();
    for b in 0..nb {
        let blk = row.add(b * bs);
        let xb = xp.add(b * 32);
        let d = f16le(blk, 0);
        match kind {
            BlockKind::Q8_0 => {
                let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let lo = _mm256_castsi256_si128(q);
                let hi = _mm256_extracti128_si256(q, 1);
                let c0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
                let c1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
                let c2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
                let c3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
                let mut s = _mm256_mul_ps(c0, _mm256_loadu_ps(xb));
                s = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xb.add(8)), s);
                s = _mm256_fmadd_ps(c2, _mm256_loadu_ps(xb.add(16)), s);
                s = _mm256_fmadd_ps(c3, _mm256_loadu_ps(xb.add(24)), s);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
            }
            BlockKind::Q4_0 | BlockKind::Q4_1 => {
                let qs = _mm_loadu_si128(blk.add(kind.quants_at()) as *const __m128i);
                let mask = _mm_set1_epi8(15);
                let lo = _mm_and_si128(qs, mask); // values 0..16 of the block
                let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask); // values 16..32
                let mut s = _mm256_mul_ps(u8x8(lo), _mm256_loadu_ps(xb));
                s = _mm256_fmadd_ps(u8x8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xb.add(8)), s);
                s = _mm256_fmadd_ps(u8x8(hi), _mm256_loadu_ps(xb.add(16)), s);
                s = _mm256_fmadd_ps(u8x8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xb.add(24)), s);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
                // The offset term: Q4_1's m·Σx, Q4_0's −8·d·Σx.
                tail += if kind == BlockKind::Q4_1 { f16le(blk, 2) * xsum[b] } else { -8.0 * d * xsum[b] };
            }
        }
    }
    hsum(acc) + tail
}

/// Integer dot products of one weight block with 32 int8 activations (`xlo`, `xhi`: values
/// 0..16 and 16..32), as 4 f32 partial sums. `pmaddubsw` multiplies unsigned weight bytes
/// by signed activation bytes into 16-bit pair sums (at most 2·255·127 for Q8_0's |w|,
/// 4·15·127 after Q4's add: no saturation) and `pmaddwd` widens them. 128-bit on purpose:
/// CPUs that split 256-bit integer ops in two run this with fewer micro-ops.
#[inline(always)]
unsafe fn block_dot_i8(kind: BlockKind, blk: *const u8, xlo: __m128i, xhi: __m128i) -> __m128 {
    let pairs = match kind {
        BlockKind::Q8_0 => {
            let wlo = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let whi = _mm_loadu_si128(blk.add(18) as *const __m128i);
            // |w| · (x with w's sign): the unsigned × signed form pmaddubsw takes.
            let a = _mm_maddubs_epi16(_mm_sign_epi8(wlo, wlo), _mm_sign_epi8(xlo, wlo));
            let b = _mm_maddubs_epi16(_mm_sign_epi8(whi, whi), _mm_sign_epi8(xhi, whi));
            return _mm_cvtepi32_ps(_mm_add_epi32(
                _mm_madd_epi16(a, _mm_set1_epi16(1)),
                _mm_madd_epi16(b, _mm_set1_epi16(1)),
            ));
        }
        BlockKind::Q4_0 | BlockKind::Q4_1 => {
            let qs = _mm_loadu_si128(blk.add(kind.quants_at()) as *const __m128i);
            let mask = _mm_set1_epi8(15);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            _mm_add_epi16(_mm_maddubs_epi16(lo, xlo), _mm_maddubs_epi16(hi, xhi))
        }
    };
    _mm_cvtepi32_ps(_mm_madd_epi16(pairs, _mm_set1_epi16(1)))
}

/// The offset term of one block: Q4_0's −8·d·Σx, Q4_1's m·Σx.
#[inline(always)]
unsafe fn block_offset(kind: BlockKind, blk: *const u8, d: f32, xsum: f32) -> f32 {
    match kind {
        BlockKind::Q8_0 => 0.0,
        BlockKind::Q4_0 => -8.0 * d * xsum,
        BlockKind::Q4_1 => f16le(blk, 2) * xsum,
    }
}

/// How far ahead of the block being read each weight row is prefetched, in bytes.
const PREFETCH: usize = 384;

/// `R` weight rows (`row_bytes` apart from `row`) against one int8 row. The rows share each
/// activation load and keep `R` independent FMA chains in flight (see `rows_i8` for the
/// `R` in use).
#[inline(always)]
unsafe fn qdot_tile_i8<const K: u8, const R: usize>(row: *const u8, row_bytes: usize, x: &QuantRow) -> [f32; R] {
    let kind = BlockKind::from_tag(K);
    let bs = kind.bytes();
    let mut acc = [_mm_setzero_ps(); R];
    let mut tail = [0f32; R];
    let xq = x.q.as_ptr();
    for b in 0..x.d.len() {
        let xlo = _mm_loadu_si128(xq.add(b * 32) as *const __m128i);
        let xhi = _mm_loadu_si128(xq.add(b * 32 + 16) as *const __m128i);
        let (xd, xs) = (x.d[b], x.sum[b]);
        for r in 0..R {
            let blk = row.add(r * row_bytes + b * bs);
            _mm_prefetch::<_MM_HINT_T0>(blk.add(PREFETCH) as *const i8);
            let d = f16le(blk, 0);
            acc[r] = _mm_fmadd_ps(_mm_set1_ps(d * xd), block_dot_i8(kind, blk, xlo, xhi), acc[r]);
            tail[r] += block_offset(kind, blk, d, xs);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum128(acc[r]) + tail[r];
    }
    out
}

/// [`super::quantize_row_i8`], 32 values at a time: the same scales, and the same integers
/// (the same `trunc(y + copysign(0.49999997, y))` arithmetic).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row(x: &[f32]) -> QuantRow {
    let nb = x.len() / 32;
    let mut q = vec![0i8; nb * 32];
    let (mut d, mut sum, mut isum) = (Vec::with_capacity(nb), Vec::with_capacity(nb), Vec::with_capacity(nb));
    let sign = _mm256_set1_ps(-0.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..nb {
        let p = x.as_ptr().add(b * 32);
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        let m = _mm256_max_ps(m01, m23);
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let half = _mm256_set1_ps(super::HALF_BELOW);
        let i = [0, 1, 2, 3].map(|j| {
            let y = _mm256_mul_ps(v[j], inv);
            _mm256_cvttps_epi32(_mm256_add_ps(y, _mm256_or_ps(_mm256_and_ps(y, sign), half)))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b00_00_00_01)));
        // i32 → i16 → i8 packs work within 128-bit lanes; the permute restores value order.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        let packed = _mm256_permutevar8x32_epi32(packed, order);
        _mm256_storeu_si256(q.as_mut_ptr().add(b * 32) as *mut __m256i, packed);
        d.push(scale);
        sum.push(scale * s as f32);
        isum.push(s);
    }
    QuantRow { q, d, sum, isum }
}

/// `out[i]` = row `first + i` of `w` against `x`, for f32 activations.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn qdot_rows(
    kind: BlockKind,
    w: &[u8],
    row_bytes: usize,
    x: &[f32],
    xsum: &[f32],
    out: &mut [f32],
    first: usize,
) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = qdot_row(kind, w.as_ptr().add((first + i) * row_bytes), x, xsum);
    }
}

/// `out[i]` = row `first + i` of `w` against `x`, for int8 activations.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn qdot_rows_i8(kind: BlockKind, w: &[u8], row_bytes: usize, x: &QuantRow, out: &mut [f32], first: usize) {
    // One copy of the loop per format, so the format's branches leave the inner loop.
    match kind {
        BlockKind::Q4_0 => rows_i8::<0>(w, row_bytes, x, out, first),
        BlockKind::Q4_1 => rows_i8::<1>(w, row_bytes, x, out, first),
        BlockKind::Q8_0 => rows_i8::<2>(w, row_bytes, x, out, first),
    }
}

#[inline(always)]
unsafe fn rows_i8<const K: u8>(w: &[u8], row_bytes: usize, x: &QuantRow, out: &mut [f32], first: usize) {
    // One row at a time: a single forward stream per thread. Tiles of 2–8 rows share the
    // activation loads and run as fast from cache, but from memory (how decode reads the
    // weights) their interleaved streams were 20–40% slower on the development machine
    // (`cargo run --release -p autodeploy-kernels --example qgemv`).
    let base = w.as_ptr().add(first * row_bytes);
    for (r, o) in out.iter_mut().enumerate() {
        *o = qdot_tile_i8::<K, 1>(base.add(r * row_bytes), row_bytes, x)[0];
    }
}
