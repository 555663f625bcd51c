//! CPU kernels in f32: GEMM through the `gemm` crate (blocked, SIMD, all cores through rayon)
//! and attention. Callers convert other dtypes to f32 and round the result, which is what torch's
//! CPU kernels do for bf16/f16 (f32 accumulation, one rounding at the end).

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

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

/// torch's `scaled_dot_product_attention` without a mask: softmax(q·kᵀ·scale)·v, query head h
/// reading kv head h / (q_heads / kv_heads). `causal` masks key j > query i (top-left aligned,
/// as torch's `is_causal`).
pub fn attention(d: AttnDims, q: &[f32], k: &[f32], v: &[f32], causal: bool, scale: f32, out: &mut [f32]) {
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
            let n = if causal { (i + 1).min(d.kv_len) } else { d.kv_len };
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores[..n].iter_mut().enumerate() {
                let krow = &kbase[j * d.head_dim..(j + 1) * d.head_dim];
                *s = dot(qrow, krow) * scale;
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
                let vrow = &vbase[j * d.v_dim..(j + 1) * d.v_dim];
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
    // Eight independent accumulators let the compiler vectorise the loop.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
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

    fn rand(n: usize, seed: u32) -> Vec<f32> {
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

    #[test]
    fn qlinear_matches_dequantized_linear() {
        for kind in [BlockKind::Q4_0, BlockKind::Q4_1, BlockKind::Q8_0] {
            let (m, n, k) = (3, 70, 96);
            let mut w = Vec::new();
            let raw = rand(n * k / 32 * kind.bytes(), 9);
            for (i, r) in raw.iter().enumerate() {
                w.push(((r + 1.0) * 127.5) as u8 ^ (i as u8));
            }
            // Sane f16 scales (0.01..0.05) at the start of every block, and min for Q4_1.
            for b in 0..n * k / 32 {
                let at = b * kind.bytes();
                w[at..at + 2].copy_from_slice(&(0x2000u16 + (b as u16 % 512)).to_le_bytes());
                if kind == BlockKind::Q4_1 {
                    w[at + 2..at + 4].copy_from_slice(&(0xa000u16 + (b as u16 % 256)).to_le_bytes());
                }
            }
            let wf: Vec<f32> = w.chunks(kind.bytes()).flat_map(|b| deq(kind, b)).collect();
            let x = rand(m * k, 10);
            let bias = rand(n, 11);
            let (mut y, mut r) = (vec![0f32; m * n], vec![0f32; m * n]);
            qlinear(m, n, k, &x, kind, &w, Some(&bias), &mut y);
            linear(m, n, k, &x, &wf, Some(&bias), &mut r);
            for (a, b) in y.iter().zip(&r) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{kind:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn attention_matches_naive_with_gqa_and_causal() {
        let d = AttnDims { batch: 2, q_heads: 4, kv_heads: 2, q_len: 5, kv_len: 5, head_dim: 8, v_dim: 8 };
        let q = rand(2 * 4 * 5 * 8, 4);
        let k = rand(2 * 2 * 5 * 8, 5);
        let v = rand(2 * 2 * 5 * 8, 6);
        let mut out = vec![0f32; q.len()];
        attention(d, &q, &k, &v, true, 0.3, &mut out);
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
}

/// Block-quantized weight formats the linear kernel reads as stored (ggml layouts).
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
}

#[inline(always)]
fn f16le(b: &[u8], i: usize) -> f32 {
    half_f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// IEEE half to f32 without a dependency (the kernels crate stays math-only).
#[inline(always)]
fn half_f16_to_f32(h: u16) -> f32 {
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

/// Dot product of one quantized row with `x`, block by block. `xsum[b]` is the sum of `x` over
/// block `b` (Q4_1's offset term).
#[inline(always)]
fn qdot_row(kind: BlockKind, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let nb = x.len() / 32;
    let bs = kind.bytes();
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &row[b * bs..(b + 1) * bs];
        let xb = &x[b * 32..b * 32 + 32];
        match kind {
            BlockKind::Q8_0 => {
                let d = f16le(blk, 0);
                let mut s = [0f32; 8];
                for (j, (q, xv)) in blk[2..34].iter().zip(xb).enumerate() {
                    s[j % 8] += (*q as i8) as f32 * xv;
                }
                acc += d * s.iter().sum::<f32>();
            }
            BlockKind::Q4_0 | BlockKind::Q4_1 => {
                let off = if kind == BlockKind::Q4_1 { 4 } else { 2 };
                let qs = &blk[off..off + 16];
                let mut s = [0f32; 16];
                for j in 0..16 {
                    s[j] = (qs[j] & 15) as f32 * xb[j] + (qs[j] >> 4) as f32 * xb[j + 16];
                }
                let dot: f32 = s.iter().sum();
                let d = f16le(blk, 0);
                if kind == BlockKind::Q4_1 {
                    acc += d * dot + f16le(blk, 2) * xsum[b];
                } else {
                    acc += d * (dot - 8.0 * xsum[b]);
                }
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BlockKind;
    use std::arch::x86_64::*;

    /// IEEE half at byte `i` through the F16C instruction.
    #[inline(always)]
    unsafe fn f16le(b: &[u8], i: usize) -> f32 {
        let h = u16::from_le_bytes([b[i], b[i + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// 8 unsigned bytes at `p` as 8 f32.
    #[inline(always)]
    unsafe fn u8x8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    /// One weight row against `x`: the same value as the scalar `qdot_row`, vectorised 8 wide.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)] // `b` indexes the blocks, x and xsum together
    pub unsafe fn qdot_row(kind: BlockKind, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let nb = x.len() / 32;
        let bs = kind.bytes();
        let mut acc = _mm256_setzero_ps();
        let mut tail = 0f32;
        let xp = x.as_ptr();
        for b in 0..nb {
            let blk = row.as_ptr().add(b * bs);
            let xb = xp.add(b * 32);
            let d = f16le(row, b * bs);
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
                    let off = if kind == BlockKind::Q4_1 { 4 } else { 2 };
                    let qs = _mm_loadu_si128(blk.add(off) as *const __m128i);
                    let mask = _mm_set1_epi8(15);
                    let lo = _mm_and_si128(qs, mask); // values 0..16 of the block
                    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask); // values 16..32
                    let mut s = _mm256_mul_ps(u8x8(lo), _mm256_loadu_ps(xb));
                    s = _mm256_fmadd_ps(u8x8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xb.add(8)), s);
                    s = _mm256_fmadd_ps(u8x8(hi), _mm256_loadu_ps(xb.add(16)), s);
                    s = _mm256_fmadd_ps(u8x8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xb.add(24)), s);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
                    // The offset term: Q4_1's m·Σx, Q4_0's −8·d·Σx.
                    tail += if kind == BlockKind::Q4_1 { f16le(row, b * bs + 2) * xsum[b] } else { -8.0 * d * xsum[b] };
                }
            }
        }
        hsum(acc) + tail
    }

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
            let r = first + i;
            *o = qdot_row(kind, &w[r * row_bytes..(r + 1) * row_bytes], x, xsum);
        }
    }
}

fn qdot_rows(kind: BlockKind, w: &[u8], row_bytes: usize, x: &[f32], xsum: &[f32], out: &mut [f32], first: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU has the features these functions were compiled for, and every row
        // slice holds x.len() / 32 whole blocks (checked by qlinear).
        unsafe { avx2::qdot_rows(kind, w, row_bytes, x, xsum, out, first) };
        return;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let r = first + i;
        *o = qdot_row(kind, &w[r * row_bytes..(r + 1) * row_bytes], x, xsum);
    }
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ + bias` with `W` block-quantized (`kind`), read as stored: the
/// weight traffic of a decode step is the quantized size, not f32's.
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
    assert!(k.is_multiple_of(32), "qlinear: k = {k} is not a multiple of 32");
    let row_bytes = k / 32 * kind.bytes();
    assert_eq!(w.len(), n * row_bytes, "qlinear weight bytes");
    assert_eq!(x.len(), m * k, "qlinear input");
    assert_eq!(y.len(), m * n, "qlinear output");
    // Rows of y are computed in chunks of output channels; each chunk's weight rows stay in cache
    // while every input row passes over them.
    let chunk = 64;
    let xsums: Vec<Vec<f32>> = x.chunks(k).map(|xr| xr.chunks(32).map(|b| b.iter().sum()).collect()).collect();
    let mut yt = vec![0f32; n * m]; // [n, m], transposed so chunks are contiguous
    yt.par_chunks_mut(chunk * m).enumerate().for_each(|(c, out)| {
        let first = c * chunk;
        let rows = out.len() / m;
        let mut tmp = vec![0f32; rows];
        for (i, xr) in x.chunks(k).enumerate() {
            qdot_rows(kind, w, row_bytes, xr, &xsums[i], &mut tmp, first);
            for (r, v) in tmp.iter().enumerate() {
                out[r * m + i] = *v;
            }
        }
    });
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = yt[j * m + i] + bias.map_or(0.0, |b| b[j]);
        }
    }
}
