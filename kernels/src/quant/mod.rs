//! Linear layers over block-quantized weights (ggml's Q4_0, Q4_1 and Q8_0 layouts), read as
//! stored so that a decode step moves the quantized bytes, not f32's.
//!
//! Two ways to take the dot product of an activation row with a weight row:
//! - f32 activations ([`qlinear_on`]): each block is expanded in registers and multiplied with f32
//!   FMAs. The only error against dequantize-then-GEMM is f32 summation order.
//! - int8 activations ([`qlinear_on`] with `int8`, [`qlinear_packed`]): each 32-value block of the activation row is quantized to
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
pub(crate) fn add_bias(y: &mut [f32], n: usize, bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in y.chunks_mut(n) {
            for (v, bj) in row.iter_mut().zip(b) {
                *v += bj;
            }
        }
    }
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ + bias` for many rows (prefill) with `W` block-quantized: a tile
/// of W's rows at a time is dequantized into a per-thread buffer (see [`crate::cpu::tiled_linear`]).
/// W is never expanded whole.
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
    crate::cpu::tiled_linear(
        m,
        n,
        k,
        x,
        &|j0, j1, tile| dequantize_serial(kind, &w[j0 * row_bytes..j1 * row_bytes], tile),
        y,
    );
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
    /// `Σq` of each block, in integers (the packed kernels' offsets).
    pub isum: Vec<i32>,
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
    let (mut d, mut sum, mut isum) = (Vec::with_capacity(nb), Vec::with_capacity(nb), Vec::with_capacity(nb));
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
        isum.push(s);
    }
    QuantRow { q, d, sum, isum }
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
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod lowbit;
mod packed;

pub use crate::isa::CpuKernels;
pub use packed::{PackedRows, GROUP};

/// Whether this CPU runs the AVX2/FMA/F16C kernels.
pub(crate) fn has_avx2() -> bool {
    CpuKernels::detected() >= CpuKernels::Avx2
}

/// How one activation row meets the weight rows.
enum Activations<'a> {
    F32 { x: &'a [f32], xsum: Vec<f32> },
    I8(QuantRow),
}

impl Activations<'_> {
    /// `out[i]` = weight row `first + i` against this activation row, on `path` (within what
    /// the CPU runs).
    fn dot_rows(&self, kind: BlockKind, w: &[u8], row_bytes: usize, out: &mut [f32], first: usize, path: CpuKernels) {
        #[cfg(target_arch = "x86_64")]
        if path >= CpuKernels::Avx2 {
            // SAFETY: `path` is within what the CPU runs (`at_most_detected`): AVX2, FMA and
            // F16C, and AVX-512 F/BW at the `Avx512Vnni` level; qlinear checked that `w` holds
            // whole rows of `x.len() / 32` blocks for every row asked for.
            unsafe {
                match self {
                    Activations::F32 { x, xsum } if path >= CpuKernels::Avx512Vnni => {
                        avx512::qdot_rows(kind, w, row_bytes, x, xsum, out, first)
                    }
                    Activations::F32 { x, xsum } => avx2::qdot_rows(kind, w, row_bytes, x, xsum, out, first),
                    Activations::I8(q) => avx2::qdot_rows_i8(kind, w, row_bytes, q, out, first),
                }
            }
            return;
        }
        let _ = path;
        for (i, o) in out.iter_mut().enumerate() {
            let row = &w[(first + i) * row_bytes..(first + i + 1) * row_bytes];
            *o = match self {
                Activations::F32 { x, xsum } => qdot_row(kind, row, x, xsum),
                Activations::I8(q) => qdot_row_i8(kind, row, q),
            };
        }
    }
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ + bias` with `W` block-quantized (`kind`), read as stored: f32
/// activations, or (`int8`) each activation row quantized to int8 per 32-value block first (see
/// the module docs for the error this adds). The SIMD path when `kernels` (within what the CPU
/// runs) is AVX2 or better, else the portable one.
#[allow(clippy::too_many_arguments)]
pub fn qlinear_on(
    kernels: CpuKernels,
    int8: bool,
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
    let path = kernels.at_most_detected();
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
    // About 8 chunks per thread: enough to balance, few enough that claiming one (an atomic on a
    // shared line) stays small next to its work. Multiples of 4 rows keep whole tiles.
    let chunk = n.div_ceil(8 * crate::pool::threads()).next_multiple_of(4).max(4);
    crate::pool::by_channel_chunks(m, n, chunk, y, |i, out, first| {
        acts[i].dot_rows(kind, w, row_bytes, out, first, path)
    });
    add_bias(y, n, bias);
}

/// As [`qlinear_on`] with int8 activations, over weights [`PackedRows::pack`]ed 16 rows to a group: the AVX-512 VNNI
/// or AVX-VNNI kernel where `kernels` allows it and the CPU has it, else the portable one on the same copy.
pub fn qlinear_packed(kernels: CpuKernels, m: usize, x: &[f32], w: &PackedRows, bias: Option<&[f32]>, y: &mut [f32]) {
    let (n, k) = w.dims();
    assert_eq!(x.len(), m * k, "qlinear_packed input");
    assert_eq!(y.len(), m * n, "qlinear_packed output");
    let path = kernels.at_most_detected();
    let acts: Vec<QuantRow> = x.chunks(k).map(quantize_row_i8).collect();
    let chunk = n.div_ceil(8 * crate::pool::threads()).next_multiple_of(packed::GROUP).max(packed::GROUP);
    crate::pool::by_channel_chunks(m, n, chunk, y, |i, out, first| w.dot_rows(&acts[i], out, first, path));
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
                let mut r = vec![0f32; m * n];
                linear(m, n, k, &x, &wf, Some(&bias), &mut r);
                // Every path this CPU runs: portable, AVX2, AVX-512.
                for path in CpuKernels::ALL.into_iter().filter(|p| p.supported()) {
                    let mut y = vec![0f32; m * n];
                    qlinear_on(path, false, m, n, k, &x, kind, &w, Some(&bias), &mut y);
                    for (a, b) in y.iter().zip(&r) {
                        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{kind:?} {path:?} m={m}: {a} vs {b}");
                    }
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
        assert_eq!((&q.q, &q.d, &q.sum, &q.isum), (&p.q, &p.d, &p.sum, &p.isum));
        let ties: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5 * 127.0 / 16.0).collect();
        assert_eq!(quantize_row_i8(&ties).q, quantize_row_portable(&ties).q, "ties round the same way");
        let zero = quantize_row_i8(&[0.0; 32]);
        assert_eq!((zero.d[0], zero.q.iter().all(|&v| v == 0)), (0.0, true));
    }

    /// The row-interleaved copy gives the int8 kernels' result (the exact product of the
    /// quantized operands, up to f32 summation order) on every path this CPU runs, for every
    /// format, a row count that is not a multiple of 16, and several activation rows.
    #[test]
    fn packed_rows_give_the_int8_product_on_every_path() {
        for kind in KINDS {
            let (n, k) = (70, 160);
            let (w, _) = random_weights(kind, n, k, 41);
            let p = PackedRows::pack(kind, n, k, &w);
            assert_eq!(p.dims(), (n, k));
            for m in [1, 3] {
                let x = rand(m * k, 42);
                let bias = rand(n, 43);
                let mut want = vec![0f32; m * n];
                qlinear_on(CpuKernels::Portable, true, m, n, k, &x, kind, &w, Some(&bias), &mut want);
                for path in CpuKernels::ALL.into_iter().filter(|p| p.supported()) {
                    let mut got = vec![0f32; m * n];
                    qlinear_packed(path, m, &x, &p, Some(&bias), &mut got);
                    for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{kind:?} {path:?} m={m} [{j}]: {a} vs {b}");
                    }
                }
            }
        }
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
            qlinear_on(CpuKernels::detected(), true, m, n, k, &x, kind, &w, None, &mut y);
            let mut yf = vec![0f32; m * n];
            qlinear_on(CpuKernels::detected(), false, m, n, k, &x, kind, &w, None, &mut yf);
            for i in 0..m {
                let q = quantize_row_i8(&x[i * k..(i + 1) * k]);
                let xd: Vec<f32> = q.q.iter().enumerate().map(|(j, &v)| v as f32 * q.d[j / 32]).collect();
                let acts = Activations::I8(q);
                let row_bytes = k / 32 * kind.bytes();
                let mut scalar = vec![0f32; n];
                acts.dot_rows(kind, &w, row_bytes, &mut scalar, 0, CpuKernels::Portable);
                let mut simd = vec![0f32; n];
                acts.dot_rows(kind, &w, row_bytes, &mut simd, 0, CpuKernels::detected());
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
