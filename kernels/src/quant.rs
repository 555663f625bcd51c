//! Linear layers over block-quantized weights (ggml's Q4_0, Q4_1 and Q8_0 layouts), read as
//! stored so that a decode step moves the quantized bytes, not f32's.
//!
//! Two ways to take the dot product of an activation row with a weight row:
//! - f32 activations ([`qlinear`]): each block is expanded in registers and multiplied with f32
//!   FMAs. The only error against dequantize-then-GEMM is f32 summation order.
//! - int8 activations ([`qlinear_i8`]): each 32-value block of the activation row is quantized to
//!   int8 with its own scale (`d = max|x| / 127`, llama.cpp's Q8 activation format), and blocks
//!   are multiplied with integer instructions (`pmaddubsw`/`pmaddwd`), four times fewer
//!   conversions per block. This adds the activation rounding error (at most `d / 2` per value).

/// Block-quantized weight formats the linear kernels read as stored (ggml layouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// 32 values: f16 d, 16 bytes of nibbles; `(q - 8)·d`
    Q4_0,
    /// 32 values: f16 d, f16 m, 16 bytes of nibbles; `q·d + m`
    Q4_1,
    /// 32 values: f16 d, 32 i8; `q·d`
    Q8_0,
}

impl BlockKind {
    pub fn bytes(self) -> usize {
        match self {
            BlockKind::Q4_0 => 18,
            BlockKind::Q4_1 => 20,
            BlockKind::Q8_0 => 34,
        }
    }

    /// The format of a const-generic tag (0, 1, 2), for kernels specialised per format.
    #[inline(always)]
    const fn from_tag(tag: u8) -> BlockKind {
        match tag {
            0 => BlockKind::Q4_0,
            1 => BlockKind::Q4_1,
            _ => BlockKind::Q8_0,
        }
    }

    /// Byte offset of the 16 nibble bytes (Q4) or 32 int8 values (Q8) in a block.
    fn quants_at(self) -> usize {
        if self == BlockKind::Q4_1 {
            4
        } else {
            2
        }
    }
}

#[inline(always)]
fn f16le(b: &[u8], i: usize) -> f32 {
    half_f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// IEEE half to f32 without a dependency (the kernels crate stays math-only).
#[inline(always)]
pub(crate) fn half_f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// Expands blocks of `kind` from `blocks` until `out` is full, on the calling thread.
fn dequantize_serial(kind: BlockKind, blocks: &[u8], out: &mut [f32]) {
    let bs = kind.bytes();
    for (blk, o) in blocks.chunks_exact(bs).zip(out.chunks_exact_mut(32)) {
        let d = f16le(blk, 0);
        let qs = &blk[kind.quants_at()..];
        match kind {
            BlockKind::Q8_0 => {
                for (v, q) in o.iter_mut().zip(&qs[..32]) {
                    *v = (*q as i8) as f32 * d;
                }
            }
            BlockKind::Q4_0 | BlockKind::Q4_1 => {
                let (scale, offset) = if kind == BlockKind::Q4_1 { (d, f16le(blk, 2)) } else { (d, -8.0 * d) };
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    lo[j] = (qs[j] & 15) as f32 * scale + offset;
                    hi[j] = (qs[j] >> 4) as f32 * scale + offset;
                }
            }
        }
    }
}

/// Checks a quantized linear's buffers against its dimensions; returns the bytes of one weight row.
fn check_qlinear(m: usize, n: usize, k: usize, x: &[f32], kind: BlockKind, w: &[u8], y: &[f32]) -> usize {
    assert!(k.is_multiple_of(32), "qlinear: k = {k} is not a multiple of 32");
    let row_bytes = k / 32 * kind.bytes();
    assert_eq!(w.len(), n * row_bytes, "qlinear weight bytes");
    assert_eq!(x.len(), m * k, "qlinear input");
    assert_eq!(y.len(), m * n, "qlinear output");
    row_bytes
}

/// Adds `bias[n]` to every row of `y`.
fn add_bias(y: &mut [f32], n: usize, bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in y.chunks_mut(n) {
            for (v, bj) in row.iter_mut().zip(b) {
                *v += bj;
            }
        }
    }
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ + bias` for many rows (prefill) with `W` block-quantized: a tile
/// of W's rows at a time is dequantized into a per-thread buffer that stays in cache, and that
/// tile's GEMM runs single-threaded; tiles spread over the pool. W is never expanded whole.
#[allow(clippy::too_many_arguments)]
pub fn qlinear_tiled(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    kind: BlockKind,
    w: &[u8],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let row_bytes = check_qlinear(m, n, k, x, kind, w, y);
    thread_local! {
        static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // About 128 KiB of f32 weights per tile.
    let tn = (32768 / k).next_multiple_of(16).clamp(16, 256);
    struct Out(*mut f32);
    // SAFETY: tiles write disjoint column ranges of `y` (see below).
    unsafe impl Sync for Out {}
    let out = Out(y.as_mut_ptr());
    let out = &out;
    crate::pool::for_each_chunk(n.div_ceil(tn), &|t| {
        let (j0, j1) = (t * tn, ((t + 1) * tn).min(n));
        TILE.with_borrow_mut(|tile| {
            tile.resize((j1 - j0) * k, 0.0);
            dequantize_serial(kind, &w[j0 * row_bytes..j1 * row_bytes], tile);
            // SAFETY: x is m×k row-major, the tile (j1-j0)×k row-major, read as its transpose;
            // the destination is columns j0..j1 of y (m×n row-major), which no other tile
            // writes, and y outlives the pool call.
            unsafe {
                gemm::gemm(
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
                    gemm::Parallelism::None,
                );
            }
        });
    });
    add_bias(y, n, bias);
}

/// One activation row quantized per 32-value block: `x ≈ q · d` within each block.
pub struct QuantRow {
    pub q: Vec<i8>,
    /// Scale of each block.
    pub d: Vec<f32>,
    /// `d · Σq` of each block: the row's block sums as the integer dot products see them
    /// (Q4_0's and Q4_1's offset terms).
    pub sum: Vec<f32>,
}

/// Quantizes `x` (a multiple of 32 long) to int8 per block, rounding to nearest (ties away from
/// zero).
pub fn quantize_row_i8(x: &[f32]) -> QuantRow {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { avx2::quantize_row(x) };
    }
    quantize_row_portable(x)
}

/// Rounds to nearest, ties away from zero (llama.cpp rounds its 8-bit activations with
/// `roundf`), by the arithmetic the SIMD path uses: `trunc(y + copysign(0.49999997, y))`.
#[inline(always)]
fn round_half_away(y: f32) -> f32 {
    (y + HALF_BELOW.copysign(y)).trunc()
}

/// The largest f32 below 0.5.
const HALF_BELOW: f32 = 0.49999997;

fn quantize_row_portable(x: &[f32]) -> QuantRow {
    let nb = x.len() / 32;
    let mut q = vec![0i8; x.len()];
    let (mut d, mut sum) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
    for (xb, qb) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut s = 0i32;
        for (o, v) in qb.iter_mut().zip(xb) {
            let r = round_half_away(v * inv).clamp(-127.0, 127.0) as i8;
            *o = r;
            s += r as i32;
        }
        d.push(scale);
        sum.push(scale * s as f32);
    }
    QuantRow { q, d, sum }
}

/// Dot product of one quantized weight row with f32 `x`, block by block. `xsum[b]` is the sum
/// of `x` over block `b` (the offset terms).
#[inline(always)]
fn qdot_row(kind: BlockKind, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let bs = kind.bytes();
    let mut acc = 0f32;
    for (b, (blk, xb)) in row.chunks_exact(bs).zip(x.chunks_exact(32)).enumerate() {
        let d = f16le(blk, 0);
        let qs = &blk[kind.quants_at()..];
        match kind {
            BlockKind::Q8_0 => {
                let mut s = [0f32; 8];
                for (j, (q, xv)) in qs[..32].iter().zip(xb).enumerate() {
                    s[j % 8] += (*q as i8) as f32 * xv;
                }
                acc += d * s.iter().sum::<f32>();
            }
            BlockKind::Q4_0 | BlockKind::Q4_1 => {
                let mut s = [0f32; 16];
                for j in 0..16 {
                    s[j] = (qs[j] & 15) as f32 * xb[j] + (qs[j] >> 4) as f32 * xb[j + 16];
                }
                let dot: f32 = s.iter().sum();
                acc +=
                    if kind == BlockKind::Q4_1 { d * dot + f16le(blk, 2) * xsum[b] } else { d * (dot - 8.0 * xsum[b]) };
            }
        }
    }
    acc
}

/// Dot product of one quantized weight row with an int8 row: integer products within a block,
/// scaled by both blocks' scales.
#[inline(always)]
fn qdot_row_i8(kind: BlockKind, row: &[u8], x: &QuantRow) -> f32 {
    let bs = kind.bytes();
    let mut acc = 0f32;
    for (b, (blk, xq)) in row.chunks_exact(bs).zip(x.q.chunks_exact(32)).enumerate() {
        let d = f16le(blk, 0);
        let qs = &blk[kind.quants_at()..];
        let dot: i32 = match kind {
            BlockKind::Q8_0 => qs[..32].iter().zip(xq).map(|(w, v)| (*w as i8) as i32 * *v as i32).sum(),
            BlockKind::Q4_0 | BlockKind::Q4_1 => {
                (0..16).map(|j| (qs[j] & 15) as i32 * xq[j] as i32 + (qs[j] >> 4) as i32 * xq[j + 16] as i32).sum()
            }
        };
        acc += match kind {
            BlockKind::Q8_0 => d * x.d[b] * dot as f32,
            BlockKind::Q4_0 => d * (x.d[b] * dot as f32 - 8.0 * x.sum[b]),
            BlockKind::Q4_1 => d * x.d[b] * dot as f32 + f16le(blk, 2) * x.sum[b],
        };
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockKind, QuantRow};
    use std::arch::x86_64::*;

    /// IEEE half at byte `i` through the F16C instruction.
    #[inline(always)]
    unsafe fn f16le(b: *const u8, i: usize) -> f32 {
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
        let (mut d, mut sum) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
        let sign = _mm256_set1_ps(-0.0);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..nb {
            let p = x.as_ptr().add(b * 32);
            let v =
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
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
        }
        QuantRow { q, d, sum }
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
    pub unsafe fn qdot_rows_i8(
        kind: BlockKind,
        w: &[u8],
        row_bytes: usize,
        x: &QuantRow,
        out: &mut [f32],
        first: usize,
    ) {
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
}

/// Whether this CPU runs the AVX2/FMA/F16C kernels (checked once, cached by std).
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// How one activation row meets the weight rows.
enum Activations<'a> {
    F32 { x: &'a [f32], xsum: Vec<f32> },
    I8(QuantRow),
}

impl Activations<'_> {
    /// `out[i]` = weight row `first + i` against this activation row.
    fn dot_rows(&self, kind: BlockKind, w: &[u8], row_bytes: usize, out: &mut [f32], first: usize, simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is true only when the CPU has AVX2, FMA and F16C (checked by
            // `has_avx2`), and qlinear checked that `w` holds whole rows of `x.len() / 32`
            // blocks for every row asked for.
            unsafe {
                match self {
                    Activations::F32 { x, xsum } => avx2::qdot_rows(kind, w, row_bytes, x, xsum, out, first),
                    Activations::I8(q) => avx2::qdot_rows_i8(kind, w, row_bytes, q, out, first),
                }
            }
            return;
        }
        let _ = simd;
        for (i, o) in out.iter_mut().enumerate() {
            let row = &w[(first + i) * row_bytes..(first + i + 1) * row_bytes];
            *o = match self {
                Activations::F32 { x, xsum } => qdot_row(kind, row, x, xsum),
                Activations::I8(q) => qdot_row_i8(kind, row, q),
            };
        }
    }
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ + bias` with `W` block-quantized (`kind`), read as stored, f32
/// activations.
#[allow(clippy::too_many_arguments)]
pub fn qlinear(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    kind: BlockKind,
    w: &[u8],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    qlinear_impl(m, n, k, x, kind, w, bias, y, false)
}

/// As [`qlinear`], with each activation row quantized to int8 per 32-value block first
/// (see the module docs for the error this adds).
#[allow(clippy::too_many_arguments)]
pub fn qlinear_i8(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    kind: BlockKind,
    w: &[u8],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    qlinear_impl(m, n, k, x, kind, w, bias, y, true)
}

#[allow(clippy::too_many_arguments)]
fn qlinear_impl(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    kind: BlockKind,
    w: &[u8],
    bias: Option<&[f32]>,
    y: &mut [f32],
    int8: bool,
) {
    let row_bytes = check_qlinear(m, n, k, x, kind, w, y);
    let simd = has_avx2();
    let acts: Vec<Activations> = x
        .chunks(k)
        .map(|xr| {
            if int8 {
                Activations::I8(quantize_row_i8(xr))
            } else {
                Activations::F32 { x: xr, xsum: xr.chunks(32).map(|b| b.iter().sum()).collect() }
            }
        })
        .collect();
    // Output channels in chunks, on the spinning pool (decode-sized work); each chunk's weight
    // rows stay in cache while every activation row passes over them.
    // About 8 chunks per thread: enough to balance, few enough that claiming one (an atomic on a
    // shared line) stays small next to its work. Multiples of 4 rows keep whole tiles.
    let chunk = n.div_ceil(8 * crate::pool::threads()).next_multiple_of(4).max(4);
    if m == 1 {
        crate::pool::for_each_chunk_mut(y, chunk, |c, out| acts[0].dot_rows(kind, w, row_bytes, out, c * chunk, simd));
    } else {
        let mut yt = vec![0f32; n * m]; // [n, m], transposed so chunks are contiguous
        crate::pool::for_each_chunk_mut(&mut yt, chunk * m, |c, out| {
            let mut tmp = vec![0f32; out.len() / m];
            for (i, a) in acts.iter().enumerate() {
                a.dot_rows(kind, w, row_bytes, &mut tmp, c * chunk, simd);
                for (r, v) in tmp.iter().enumerate() {
                    out[r * m + i] = *v;
                }
            }
        });
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = yt[j * m + i];
            }
        }
    }
    add_bias(y, n, bias);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::linear;
    use crate::cpu::tests::rand;

    /// Reference dequantization of one block, written out from the ggml formulas.
    fn deq(kind: BlockKind, blk: &[u8]) -> Vec<f32> {
        let d = half_f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
        match kind {
            BlockKind::Q8_0 => blk[2..34].iter().map(|&q| q as i8 as f32 * d).collect(),
            BlockKind::Q4_0 => {
                let qs = &blk[2..18];
                qs.iter()
                    .map(|&q| ((q & 15) as f32 - 8.0) * d)
                    .chain(qs.iter().map(|&q| ((q >> 4) as f32 - 8.0) * d))
                    .collect()
            }
            BlockKind::Q4_1 => {
                let m = half_f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
                let qs = &blk[4..20];
                qs.iter().map(|&q| (q & 15) as f32 * d + m).chain(qs.iter().map(|&q| (q >> 4) as f32 * d + m)).collect()
            }
        }
    }

    #[test]
    fn half_conversion_covers_normals_subnormals_and_specials() {
        for (bits, want) in
            [(0x3c00u16, 1.0f32), (0xc000, -2.0), (0x0001, 5.960_464_5e-8), (0x7bff, 65504.0), (0x0000, 0.0)]
        {
            assert_eq!(half_f16_to_f32(bits), want, "{bits:#x}");
        }
        assert!(half_f16_to_f32(0x7c00).is_infinite() && half_f16_to_f32(0x7e00).is_nan());
    }

    /// A random weight matrix of `n` rows of `k` values in `kind`'s layout, with sane f16 scales
    /// (0.01..0.05) and Q4_1 minimums, and its dequantized f32 values.
    fn random_weights(kind: BlockKind, n: usize, k: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        let raw = rand(n * k / 32 * kind.bytes(), seed);
        let mut w: Vec<u8> = raw.iter().enumerate().map(|(i, r)| ((r + 1.0) * 127.5) as u8 ^ (i as u8)).collect();
        for b in 0..n * k / 32 {
            let at = b * kind.bytes();
            w[at..at + 2].copy_from_slice(&(0x2000u16 + (b as u16 % 512)).to_le_bytes());
            if kind == BlockKind::Q4_1 {
                w[at + 2..at + 4].copy_from_slice(&(0xa000u16 + (b as u16 % 256)).to_le_bytes());
            }
        }
        let wf = w.chunks(kind.bytes()).flat_map(|b| deq(kind, b)).collect();
        (w, wf)
    }

    const KINDS: [BlockKind; 3] = [BlockKind::Q4_0, BlockKind::Q4_1, BlockKind::Q8_0];

    #[test]
    fn tiled_qlinear_matches_dequantized_linear() {
        for kind in KINDS {
            // Several tiles and a short last one (the tile is 64 rows at k = 512).
            let (m, n, k) = (9, 150, 512);
            let (w, wf) = random_weights(kind, n, k, 31);
            let x = rand(m * k, 32);
            let bias = rand(n, 33);
            let (mut y, mut r) = (vec![0f32; m * n], vec![0f32; m * n]);
            qlinear_tiled(m, n, k, &x, kind, &w, Some(&bias), &mut y);
            linear(m, n, k, &x, &wf, Some(&bias), &mut r);
            for (a, b) in y.iter().zip(&r) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{kind:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn dequantize_matches_the_ggml_formulas() {
        for kind in KINDS {
            let (w, wf) = random_weights(kind, 4100, 32, 5);
            let mut out = vec![0f32; wf.len()];
            dequantize_serial(kind, &w, &mut out);
            assert!(out.iter().zip(&wf).all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1.0)), "{kind:?}");
        }
    }

    #[test]
    fn qlinear_matches_dequantized_linear() {
        for kind in KINDS {
            for m in [1, 3] {
                let (n, k) = (70, 96);
                let (w, wf) = random_weights(kind, n, k, 9);
                let x = rand(m * k, 10);
                let bias = rand(n, 11);
                let (mut y, mut r) = (vec![0f32; m * n], vec![0f32; m * n]);
                qlinear(m, n, k, &x, kind, &w, Some(&bias), &mut y);
                linear(m, n, k, &x, &wf, Some(&bias), &mut r);
                for (a, b) in y.iter().zip(&r) {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{kind:?} m={m}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn quantize_row_rounds_each_block_to_its_own_scale() {
        let mut x = rand(64, 3);
        x[40] = 5.0; // a large value in the second block only
        let q = quantize_row_i8(&x);
        assert_eq!(q.d[1], 5.0 / 127.0);
        assert_eq!(q.q[40], 127);
        for (b, xb) in x.chunks(32).enumerate() {
            for (j, v) in xb.iter().enumerate() {
                let back = q.q[b * 32 + j] as f32 * q.d[b];
                assert!((back - v).abs() <= q.d[b] / 2.0 + 1e-7, "block {b} value {j}: {v} vs {back}");
            }
            let s: i32 = q.q[b * 32..b * 32 + 32].iter().map(|&v| v as i32).sum();
            assert!((q.sum[b] - q.d[b] * s as f32).abs() < 1e-6);
        }
        // The SIMD path gives the same integers and scales as the portable one.
        let p = quantize_row_portable(&x);
        assert_eq!((&q.q, &q.d, &q.sum), (&p.q, &p.d, &p.sum));
        let ties: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5 * 127.0 / 16.0).collect();
        assert_eq!(quantize_row_i8(&ties).q, quantize_row_portable(&ties).q, "ties round the same way");
        let zero = quantize_row_i8(&[0.0; 32]);
        assert_eq!((zero.d[0], zero.q.iter().all(|&v| v == 0)), (0.0, true));
    }

    /// The int8 kernel computes exactly dequantized W times the dequantized int8 row (up to f32
    /// summation order), on both the scalar and the SIMD path, and stays within the rounding
    /// bound of the f32-activation result.
    #[test]
    fn qlinear_i8_is_the_exact_product_of_the_quantized_operands() {
        for kind in KINDS {
            let (m, n, k) = (2, 70, 128);
            let (w, wf) = random_weights(kind, n, k, 21);
            let x = rand(m * k, 22);
            let mut y = vec![0f32; m * n];
            qlinear_i8(m, n, k, &x, kind, &w, None, &mut y);
            let mut yf = vec![0f32; m * n];
            qlinear(m, n, k, &x, kind, &w, None, &mut yf);
            for i in 0..m {
                let q = quantize_row_i8(&x[i * k..(i + 1) * k]);
                let xd: Vec<f32> = q.q.iter().enumerate().map(|(j, &v)| v as f32 * q.d[j / 32]).collect();
                let acts = Activations::I8(q);
                let row_bytes = k / 32 * kind.bytes();
                let mut scalar = vec![0f32; n];
                acts.dot_rows(kind, &w, row_bytes, &mut scalar, 0, false);
                let mut simd = vec![0f32; n];
                acts.dot_rows(kind, &w, row_bytes, &mut simd, 0, has_avx2());
                for j in 0..n {
                    let wr = &wf[j * k..(j + 1) * k];
                    let exact: f64 = wr.iter().zip(&xd).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let got = y[i * n + j];
                    let tol = 1e-4 * exact.abs().max(1.0);
                    assert!((got as f64 - exact).abs() <= tol, "{kind:?} ({i},{j}): {got} vs {exact}");
                    assert!((scalar[j] as f64 - exact).abs() <= tol && (simd[j] as f64 - exact).abs() <= tol);
                    // Rounding each activation by at most d/2 moves the result by at most
                    // Σ |w| · d / 2.
                    let bound: f32 = wr
                        .iter()
                        .enumerate()
                        .map(|(p, a)| a.abs() * quantize_row_i8(&x[i * k..(i + 1) * k]).d[p / 32] / 2.0)
                        .sum();
                    assert!(
                        (got - yf[i * n + j]).abs() <= bound * 1.001 + 1e-5,
                        "{kind:?}: outside the rounding bound"
                    );
                }
            }
        }
    }
}
