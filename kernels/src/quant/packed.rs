//! Row-interleaved copies of block-quantized weights, for the VNNI decode kernels (AVX-512 VNNI,
//! and AVX-VNNI on CPUs without AVX-512: the same copy, each 64-byte chunk read as two 32-byte
//! halves of 8 rows).
//!
//! ggml's blocks keep each row's 32 values together, so a dot product ends in a horizontal sum
//! per row and converts each block's f16 scale on its own. Here 16 rows are interleaved per
//! 32-value block: one 64-byte load holds 4 values of each of 16 rows, `vpdpbusd` multiplies them
//! with 4 activation bytes broadcast to every lane, and the 16 lanes of the accumulator are the
//! 16 output rows; the rows' scales are one 32-byte load converted together. No horizontal sum.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the values are stored unsigned: Q4's
//! nibbles as they are, Q8_0's `q + 128`. The offsets come back out in integers (`Σ (q + c)·x -
//! c·Σx`, with the activation block's integer sum `QuantRow::isum`), never as a float term that would cancel:
//! within a block the integer sums are exact, so the result equals the other int8 kernels' up to
//! f32 summation order. Q4_1's minimum is its own term, `m · Σx`.
//! The copy holds the same bytes as the blocks (Q4: 16 + 2 (+ 2) bytes a block and row).

use super::{f16le, BlockKind, QuantRow};

/// Rows interleaved together (the lanes of a 512-bit register of i32).
pub const GROUP: usize = 16;

/// Weight rows `[n, k]` of one block format, 16 rows interleaved per block (see the module).
#[derive(Debug)]
pub struct PackedRows {
    kind: BlockKind,
    n: usize,
    k: usize,
    /// Per group of 16 rows, per block: the values. Q4: 4 chunks of 64 bytes; byte `4r + p` of
    /// chunk `c` holds row `r`'s value `4c + p` in its low nibble and `16 + 4c + p` in its high
    /// one. Q8_0: 8 chunks; byte `4r + p` of chunk `c` is row `r`'s value `4c + p`, plus 128.
    q: Vec<u8>,
    /// Per group and block: the 16 rows' scales (f16 bits).
    d: Vec<u16>,
    /// Q4_1 only: the 16 rows' minimums per group and block (f16 bits).
    m: Vec<u16>,
}

impl PackedRows {
    /// Interleaves `w` (`n` rows of `k` values in `kind`'s blocks); rows past `n` in the last
    /// group are zero.
    pub fn pack(kind: BlockKind, n: usize, k: usize, w: &[u8]) -> PackedRows {
        assert!(k.is_multiple_of(32), "pack: k = {k} is not a multiple of 32");
        let (nb, bs) = (k / 32, kind.bytes());
        assert_eq!(w.len(), n * nb * bs, "pack: weight bytes");
        let groups = n.div_ceil(GROUP);
        let qb = Self::q_bytes(kind);
        let mut q = vec![0u8; groups * nb * qb];
        let mut d = vec![0u16; groups * nb * GROUP];
        let mut m = if kind == BlockKind::Q4_1 { vec![0u16; groups * nb * GROUP] } else { Vec::new() };
        for row in 0..n {
            let (g, r) = (row / GROUP, row % GROUP);
            for b in 0..nb {
                let blk = &w[(row * nb + b) * bs..(row * nb + b + 1) * bs];
                let at = (g * nb + b) * GROUP + r;
                d[at] = u16::from_le_bytes([blk[0], blk[1]]);
                if kind == BlockKind::Q4_1 {
                    m[at] = u16::from_le_bytes([blk[2], blk[3]]);
                }
                let dst = &mut q[(g * nb + b) * qb..(g * nb + b + 1) * qb];
                let qs = &blk[kind.quants_at()..];
                match kind {
                    BlockKind::Q8_0 => {
                        for (v, &x) in qs[..32].iter().enumerate() {
                            dst[(v / 4) * 64 + 4 * r + v % 4] = (x as i8 as i16 + 128) as u8;
                        }
                    }
                    BlockKind::Q4_0 | BlockKind::Q4_1 => {
                        // ggml: byte j holds value j (low nibble) and value j + 16 (high).
                        for (j, &x) in qs[..16].iter().enumerate() {
                            dst[(j / 4) * 64 + 4 * r + j % 4] = x;
                        }
                    }
                }
            }
        }
        PackedRows { kind, n, k, q, d, m }
    }

    fn q_bytes(kind: BlockKind) -> usize {
        match kind {
            BlockKind::Q8_0 => 512,
            BlockKind::Q4_0 | BlockKind::Q4_1 => 256,
        }
    }

    pub fn kind(&self) -> BlockKind {
        self.kind
    }

    /// Rows and values per row.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes this copy holds.
    pub fn bytes(&self) -> usize {
        self.q.len() + 2 * (self.d.len() + self.m.len())
    }

    /// `out[i]` = row `first + i` against `x`; `first` is a multiple of [`GROUP`]. The AVX-512
    /// VNNI kernel on that path, the AVX-VNNI one (the same layout, 8 rows a 256-bit register)
    /// on `avxvnni`, else the portable one; `path` is within what the CPU runs (`at_most_detected`).
    pub fn dot_rows(&self, x: &QuantRow, out: &mut [f32], first: usize, path: crate::isa::CpuKernels) {
        use crate::isa::CpuKernels;
        assert!(first.is_multiple_of(GROUP) && first + out.len() <= self.n, "packed rows out of range");
        assert_eq!(x.d.len(), self.k / 32, "activation blocks");
        let mut tile = [0f32; GROUP];
        for (i, chunk) in out.chunks_mut(GROUP).enumerate() {
            let g = first / GROUP + i;
            #[cfg(target_arch = "x86_64")]
            if path >= CpuKernels::AvxVnni {
                // SAFETY: `path` is within what the CPU runs: AVX-512 F/BW/VNNI with F16C at
                // `Avx512Vnni`, AVX-VNNI with AVX2/F16C at `AvxVnni`; group `g` and the
                // activation row have the blocks `pack` made (checked above).
                unsafe {
                    if path >= CpuKernels::Avx512Vnni {
                        avx512::dot_group(self, x, g, &mut tile)
                    } else {
                        avxvnni::dot_group(self, x, g, &mut tile)
                    }
                };
                chunk.copy_from_slice(&tile[..chunk.len()]);
                continue;
            }
            let _ = path;
            self.dot_group_portable(x, g, &mut tile);
            chunk.copy_from_slice(&tile[..chunk.len()]);
        }
    }

    /// One group's 16 rows against `x`, in plain Rust, by the same formula as the SIMD kernel.
    #[allow(clippy::needless_range_loop)] // `b` indexes the packed blocks and x's blocks
    fn dot_group_portable(&self, x: &QuantRow, g: usize, out: &mut [f32; GROUP]) {
        let nb = self.k / 32;
        let qb = Self::q_bytes(self.kind);
        *out = [0.0; GROUP];
        for b in 0..nb {
            let q = &self.q[(g * nb + b) * qb..(g * nb + b + 1) * qb];
            let xq = &x.q[b * 32..b * 32 + 32];
            for (r, o) in out.iter_mut().enumerate() {
                let mut s = 0i32;
                for c in 0..qb / 64 {
                    for p in 0..4 {
                        let byte = q[c * 64 + 4 * r + p];
                        s += match self.kind {
                            BlockKind::Q8_0 => byte as i32 * xq[4 * c + p] as i32,
                            _ => {
                                (byte & 15) as i32 * xq[4 * c + p] as i32
                                    + (byte >> 4) as i32 * xq[16 + 4 * c + p] as i32
                            }
                        };
                    }
                }
                let at = (g * nb + b) * GROUP + r;
                let d = f16le(&self.d[at].to_le_bytes(), 0);
                *o += match self.kind {
                    BlockKind::Q4_1 => s as f32 * (d * x.d[b]) + f16le(&self.m[at].to_le_bytes(), 0) * x.sum[b],
                    BlockKind::Q4_0 => (s - 8 * x.isum[b]) as f32 * (d * x.d[b]),
                    BlockKind::Q8_0 => (s - 128 * x.isum[b]) as f32 * (d * x.d[b]),
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BlockKind, PackedRows, QuantRow, GROUP};
    use std::arch::x86_64::*;

    /// One group's 16 rows against `x`: per block, 4 (Q4) or 8 (Q8_0) `vpdpbusd` into two
    /// independent accumulators, then one convert and two FMAs for the 16 rows' scales.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // `b` indexes the packed blocks and x's blocks
    pub(super) unsafe fn dot_group(p: &PackedRows, x: &QuantRow, g: usize, out: &mut [f32; GROUP]) {
        let nb = p.k / 32;
        let qb = PackedRows::q_bytes(p.kind);
        let xw = x.q.as_ptr() as *const i32;
        let nib = _mm512_set1_epi8(15);
        let mut acc = _mm512_setzero_ps();
        for b in 0..nb {
            let q = p.q.as_ptr().add((g * nb + b) * qb);
            let word = |i: usize| _mm512_set1_epi32(std::ptr::read_unaligned(xw.add(b * 8 + i)));
            let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            if p.kind == BlockKind::Q8_0 {
                for c in (0..8).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(q.add(c * 64) as *const _), word(c));
                    s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512(q.add(c * 64 + 64) as *const _), word(c + 1));
                }
            } else {
                for c in 0..4 {
                    let w = _mm512_loadu_si512(q.add(c * 64) as *const _);
                    let lo = _mm512_and_si512(w, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), nib);
                    s0 = _mm512_dpbusd_epi32(s0, lo, word(c));
                    s1 = _mm512_dpbusd_epi32(s1, hi, word(c + 4));
                }
            }
            // The stored offset out in integers: Q4_0's 8, Q8_0's 128, times Σx.
            let offset = match p.kind {
                BlockKind::Q4_1 => 0,
                BlockKind::Q4_0 => 8 * x.isum[b],
                BlockKind::Q8_0 => 128 * x.isum[b],
            };
            let s = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(offset)));
            let at = (g * nb + b) * GROUP;
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(p.d.as_ptr().add(at) as *const __m256i));
            acc = _mm512_fmadd_ps(s, _mm512_mul_ps(d, _mm512_set1_ps(x.d[b])), acc);
            if p.kind == BlockKind::Q4_1 {
                let m = _mm512_cvtph_ps(_mm256_loadu_si256(p.m.as_ptr().add(at) as *const __m256i));
                acc = _mm512_fmadd_ps(m, _mm512_set1_ps(x.sum[b]), acc);
            }
        }
        _mm512_storeu_ps(out.as_mut_ptr(), acc);
    }
}

#[cfg(target_arch = "x86_64")]
mod avxvnni {
    use super::{BlockKind, PackedRows, QuantRow, GROUP};
    use std::arch::x86_64::*;

    /// One group's 16 rows against `x` with 256-bit `vpdpbusd` (AVX-VNNI): each 64-byte chunk
    /// of the copy holds rows 0-7 in its first 32 bytes and rows 8-15 in its second, so the
    /// rows split into two accumulators of 8; the same arithmetic as the AVX-512 kernel.
    #[target_feature(enable = "avxvnni,avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // `b` indexes the packed blocks and x's blocks
    pub(super) unsafe fn dot_group(p: &PackedRows, x: &QuantRow, g: usize, out: &mut [f32; GROUP]) {
        let nb = p.k / 32;
        let qb = PackedRows::q_bytes(p.kind);
        let xw = x.q.as_ptr() as *const i32;
        let nib = _mm256_set1_epi8(15);
        let (mut acc_lo, mut acc_hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for b in 0..nb {
            let q = p.q.as_ptr().add((g * nb + b) * qb);
            let word = |i: usize| _mm256_set1_epi32(std::ptr::read_unaligned(xw.add(b * 8 + i)));
            let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            let half = |c: usize, h: usize| _mm256_loadu_si256(q.add(c * 64 + h * 32) as *const __m256i);
            if p.kind == BlockKind::Q8_0 {
                for c in 0..8 {
                    lo = _mm256_dpbusd_avx_epi32(lo, half(c, 0), word(c));
                    hi = _mm256_dpbusd_avx_epi32(hi, half(c, 1), word(c));
                }
            } else {
                for c in 0..4 {
                    let (w0, w1) = (half(c, 0), half(c, 1));
                    let (x_lo, x_hi) = (word(c), word(c + 4));
                    lo = _mm256_dpbusd_avx_epi32(lo, _mm256_and_si256(w0, nib), x_lo);
                    lo = _mm256_dpbusd_avx_epi32(lo, _mm256_and_si256(_mm256_srli_epi16::<4>(w0), nib), x_hi);
                    hi = _mm256_dpbusd_avx_epi32(hi, _mm256_and_si256(w1, nib), x_lo);
                    hi = _mm256_dpbusd_avx_epi32(hi, _mm256_and_si256(_mm256_srli_epi16::<4>(w1), nib), x_hi);
                }
            }
            // The stored offset out in integers: Q4_0's 8, Q8_0's 128, times Σx.
            let offset = _mm256_set1_epi32(match p.kind {
                BlockKind::Q4_1 => 0,
                BlockKind::Q4_0 => 8 * x.isum[b],
                BlockKind::Q8_0 => 128 * x.isum[b],
            });
            let at = (g * nb + b) * GROUP;
            let xd = _mm256_set1_ps(x.d[b]);
            let d_lo = _mm256_cvtph_ps(_mm_loadu_si128(p.d.as_ptr().add(at) as *const __m128i));
            let d_hi = _mm256_cvtph_ps(_mm_loadu_si128(p.d.as_ptr().add(at + 8) as *const __m128i));
            let s_lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(lo, offset));
            let s_hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(hi, offset));
            acc_lo = _mm256_fmadd_ps(s_lo, _mm256_mul_ps(d_lo, xd), acc_lo);
            acc_hi = _mm256_fmadd_ps(s_hi, _mm256_mul_ps(d_hi, xd), acc_hi);
            if p.kind == BlockKind::Q4_1 {
                let xs = _mm256_set1_ps(x.sum[b]);
                let m_lo = _mm256_cvtph_ps(_mm_loadu_si128(p.m.as_ptr().add(at) as *const __m128i));
                let m_hi = _mm256_cvtph_ps(_mm_loadu_si128(p.m.as_ptr().add(at + 8) as *const __m128i));
                acc_lo = _mm256_fmadd_ps(m_lo, xs, acc_lo);
                acc_hi = _mm256_fmadd_ps(m_hi, xs, acc_hi);
            }
        }
        _mm256_storeu_ps(out.as_mut_ptr(), acc_lo);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), acc_hi);
    }
}
