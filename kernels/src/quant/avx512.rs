//! AVX-512 kernels for f32 activations against blocks as stored (exact mode): a 32-value
//! block is two 16-lane halves, so each block takes half the conversions and FMAs of the
//! AVX2 kernel. The same value as the scalar `qdot_row` up to f32 summation order.

use super::avx2::f16le;
use super::BlockKind;
use std::arch::x86_64::*;

/// One weight row against f32 `x` (`xsum`: its block sums, for Q4's offsets).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `b` indexes the blocks of the row, x and xsum together
unsafe fn qdot_row<const K: u8>(row: *const u8, x: &[f32], xsum: &[f32]) -> f32 {
    let kind = BlockKind::from_tag(K);
    let (nb, bs) = (x.len() / 32, kind.bytes());
    let (mut acc, mut tail) = (_mm512_setzero_ps(), 0f32);
    let xp = x.as_ptr();
    let nib = _mm_set1_epi8(15);
    for b in 0..nb {
        let blk = row.add(b * bs);
        let (x0, x1) = (_mm512_loadu_ps(xp.add(b * 32)), _mm512_loadu_ps(xp.add(b * 32 + 16)));
        let d = f16le(blk, 0);
        let (w0, w1) = match kind {
            BlockKind::Q8_0 => (
                _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2) as *const __m128i)),
                _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(18) as *const __m128i)),
            ),
            BlockKind::Q4_0 | BlockKind::Q4_1 => {
                let qs = _mm_loadu_si128(blk.add(kind.quants_at()) as *const __m128i);
                (
                    _mm512_cvtepu8_epi32(_mm_and_si128(qs, nib)),
                    _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), nib)),
                )
            }
        };
        let s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(w1), x1, _mm512_mul_ps(_mm512_cvtepi32_ps(w0), x0));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc);
        // The offset term: Q4_1's m·Σx, Q4_0's −8·d·Σx.
        match kind {
            BlockKind::Q8_0 => {}
            BlockKind::Q4_0 => tail += -8.0 * d * xsum[b],
            BlockKind::Q4_1 => tail += f16le(blk, 2) * xsum[b],
        }
    }
    _mm512_reduce_add_ps(acc) + tail
}

/// `out[i]` = row `first + i` of `w` against `x`, for f32 activations.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub unsafe fn qdot_rows(
    kind: BlockKind,
    w: &[u8],
    row_bytes: usize,
    x: &[f32],
    xsum: &[f32],
    out: &mut [f32],
    first: usize,
) {
    let base = w.as_ptr().add(first * row_bytes);
    // One copy of the loop per format, so the format's branches leave the inner loop.
    for (r, o) in out.iter_mut().enumerate() {
        let row = base.add(r * row_bytes);
        *o = match kind {
            BlockKind::Q4_0 => qdot_row::<0>(row, x, xsum),
            BlockKind::Q4_1 => qdot_row::<1>(row, x, xsum),
            BlockKind::Q8_0 => qdot_row::<2>(row, x, xsum),
        };
    }
}
