//! The float formats of ModelOpt checkpoints: FP8 E4M3 (`float8_e4m3fn`: 1 sign, 4 exponent
//! bits of bias 7, 3 mantissa bits, no infinities, largest finite 448, NaN as S.1111.111) and
//! FP4 E2M1 (NVFP4's values: 1 sign, 2 exponent bits, 1 mantissa bit; ±{0, 0.5, 1, 1.5, 2, 3,
//! 4, 6}; two a byte, the lower nibble first), and the reference linears over them. Scales are
//! the caller's: a value is its code's float times its scales.

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// Values per NVFP4 block scale.
pub const NVFP4_BLOCK: usize = 16;

/// The float an E4M3 code stands for (NaN for the two NaN codes): its sign, exponent and
/// mantissa placed under f32's (bias 127 against 7), subnormal codes as f32 subnormals, then
/// times 2^120.
pub fn e4m3_to_f32(code: u8) -> f32 {
    if code & 0x7f == 0x7f {
        return f32::NAN;
    }
    let c = code as u32;
    f32::from_bits(((c & 0x80) << 24) | ((c & 0x7f) << 20)) * f32::from_bits((127 + 120) << 23)
}

/// The E4M3 code nearest `v` (ties to the even code), saturating at ±448; NaN gives NaN. This is
/// `torch`'s `clamp(-448, 448).to(float8_e4m3fn)`. Bit arithmetic on the f32: normal values keep
/// 3 mantissa bits, rounded on the 20 below.
pub fn f32_to_e4m3(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7f;
    }
    let sign = ((v.to_bits() >> 24) & 0x80) as u8;
    let a = v.abs().min(E4M3_MAX);
    if a < 0.015625 {
        // Subnormals: steps of 2^-9 (exact in f32); rounding up to 8 steps gives 2^-6, code 0x08.
        return sign | round_even(a * 512.0) as u8;
    }
    let bits = a.to_bits();
    let mut e = (bits >> 23) as i32 - 127;
    let (keep, rest) = ((bits >> 20) & 7, bits & 0xf_ffff);
    let mut m = keep + (rest > 0x8_0000 || (rest == 0x8_0000 && keep & 1 == 1)) as u32;
    if m == 8 {
        m = 0;
        e += 1;
    }
    sign | (((e + 7) as u8) << 3) | m as u8
}

fn round_even(x: f32) -> f32 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// `x` through E4M3 at scale `s`: `e4m3(x / s) · s` (saturating), the FP8 GEMM's input.
pub fn fake_quant_e4m3(x: f32, s: f32) -> f32 {
    e4m3_to_f32(f32_to_e4m3(x / s)) * s
}

/// E2M1 magnitudes by code (the sign is bit 3).
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The float an E2M1 code (its low 4 bits) stands for.
pub fn e2m1_to_f32(code: u8) -> f32 {
    let v = E2M1[(code & 7) as usize];
    if code & 8 != 0 {
        -v
    } else {
        v
    }
}

/// A weight `[n, k]` in a low-bit format with its scales.
#[derive(Clone, Copy)]
pub enum LowBit<'a> {
    /// E4M3 codes, row-major, times `scale` (one value, or one a row).
    Fp8 { codes: &'a [u8], scale: &'a [f32] },
    /// E2M1 codes two a byte (lower nibble first), each block of 16 along a row times its E4M3
    /// block scale (`[n, k / 16]`), all times `global`.
    Nvfp4 { packed: &'a [u8], block_scales: &'a [u8], global: f32 },
}

impl LowBit<'_> {
    /// Checks the storage against `[n, k]`; the message says what does not fit.
    pub fn check(&self, n: usize, k: usize) -> Result<(), String> {
        match *self {
            LowBit::Fp8 { codes, scale } => {
                if codes.len() != n * k {
                    return Err(format!("{} fp8 codes for a [{n}, {k}] weight", codes.len()));
                }
                if scale.len() != 1 && scale.len() != n {
                    return Err(format!("{} weight scales for {n} rows (want 1 or {n})", scale.len()));
                }
            }
            LowBit::Nvfp4 { packed, block_scales, .. } => {
                if !k.is_multiple_of(NVFP4_BLOCK) || packed.len() * 2 != n * k {
                    return Err(format!(
                        "{} packed bytes for a [{n}, {k}] nvfp4 weight (k a multiple of 16)",
                        packed.len()
                    ));
                }
                if block_scales.len() != n * k / NVFP4_BLOCK {
                    return Err(format!(
                        "{} block scales for a [{n}, {k}] weight (want {})",
                        block_scales.len(),
                        n * k / 16
                    ));
                }
            }
        }
        Ok(())
    }

    /// Rows `j0..j1` as f32 into `out` (`(j1 - j0) · k` values).
    pub fn rows_f32(&self, k: usize, j0: usize, j1: usize, out: &mut [f32]) {
        match *self {
            LowBit::Fp8 { codes, scale } => {
                for (r, row) in out.chunks_mut(k).enumerate() {
                    let j = j0 + r;
                    let s = if scale.len() == 1 { scale[0] } else { scale[j] };
                    for (o, &c) in row.iter_mut().zip(&codes[j * k..(j + 1) * k]) {
                        *o = e4m3_to_f32(c) * s;
                    }
                }
            }
            LowBit::Nvfp4 { packed, block_scales, global } => {
                let blocks = k / NVFP4_BLOCK;
                for (r, row) in out.chunks_mut(k).enumerate() {
                    let j = j0 + r;
                    let bytes = &packed[j * k / 2..(j + 1) * k / 2];
                    for (b, vals) in row.chunks_mut(NVFP4_BLOCK).enumerate() {
                        let s = e4m3_to_f32(block_scales[j * blocks + b]) * global;
                        for (i, v) in vals.iter_mut().enumerate() {
                            let byte = bytes[(b * NVFP4_BLOCK + i) / 2];
                            let code = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                            *v = e2m1_to_f32(code) * s;
                        }
                    }
                }
            }
        }
        debug_assert_eq!(out.len(), (j1 - j0) * k);
    }
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ + bias` with W dequantized tile by tile (never whole), in f32.
/// The caller has already put `x` through whatever input quantization the format asks for.
#[allow(clippy::too_many_arguments)]
pub fn lowbit_linear(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    w: LowBit<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<(), String> {
    w.check(n, k)?;
    if x.len() != m * k || y.len() != m * n || bias.is_some_and(|b| b.len() != n) {
        return Err(format!("lowbit linear: x {} y {} for m {m} n {n} k {k}", x.len(), y.len()));
    }
    crate::cpu::tiled_linear(m, n, k, x, &|j0, j1, tile| w.rows_f32(k, j0, j1, tile), y);
    super::add_bias(y, n, bias);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_codes_round_trip_and_match_the_format() {
        // Every finite code decodes to a value that encodes back to it (0x80, -0, to 0x80).
        for c in 0..=255u8 {
            let v = e4m3_to_f32(c);
            if c & 0x7f == 0x7f {
                assert!(v.is_nan(), "{c:#x}");
                continue;
            }
            assert_eq!(f32_to_e4m3(v), c, "code {c:#x} = {v}");
        }
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), (2f32).powi(-9));
        assert_eq!(e4m3_to_f32(0x08), (2f32).powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xb9), -1.125);
        // Saturation, and ties to even: 1.0625 lies halfway between 1.0 (m 0) and 1.125 (m 1).
        assert_eq!(f32_to_e4m3(1e6), 0x7e);
        assert_eq!(f32_to_e4m3(-500.0), 0xfe);
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3a); // between 1.125 (m 1) and 1.25 (m 2): even m 2
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        // Halfway between the largest subnormal (7·2^-9) and 2^-6: to the even code 2^-6.
        assert_eq!(f32_to_e4m3(7.5 * (2f32).powi(-9)), 0x08);
        // Rounding up into the next binade: 1.96875 rounds to 2.0.
        assert_eq!(f32_to_e4m3(1.97), 0x40);
    }

    /// The bit arithmetic against a search over every code: the nearest value, ties to the
    /// code with an even last bit, for values across every binade (and past 448), with exact
    /// midpoints among them.
    #[test]
    fn e4m3_rounding_is_the_nearest_code() {
        let finite: Vec<(u8, f32)> = (0..=0x7eu8).map(|c| (c, e4m3_to_f32(c))).collect();
        let nearest = |a: f32| -> u8 {
            let a = a.min(E4M3_MAX);
            let mut best = (0u8, f32::INFINITY);
            for &(c, v) in &finite {
                let d = (v - a).abs();
                if d < best.1 || (d == best.1 && c & 1 == 0) {
                    best = (c, d);
                }
            }
            best.0
        };
        let mut x = 0x1234_5678u32;
        let mut values: Vec<f32> = (0..20_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let exp = (x % 24) as i32 - 12; // 2^-12 .. 2^11
                (x as f32 / u32::MAX as f32 + 0.5) * (2f32).powi(exp)
            })
            .collect();
        // Every midpoint between neighbouring codes.
        values.extend(finite.windows(2).map(|w| (w[0].1 + w[1].1) / 2.0));
        for v in values {
            assert_eq!(f32_to_e4m3(v), nearest(v), "{v}");
            assert_eq!(f32_to_e4m3(-v), nearest(v) | 0x80, "{}", -v);
        }
    }

    #[test]
    fn low_bit_rows_apply_their_scales() {
        // FP8 per-row scales.
        let codes = [0x38u8, 0xb8, 0x40, 0x00];
        let w = LowBit::Fp8 { codes: &codes, scale: &[0.5, 2.0] };
        let mut out = [0f32; 4];
        w.rows_f32(2, 0, 2, &mut out);
        assert_eq!(out, [0.5, -0.5, 4.0, 0.0]);
        // NVFP4: one row of 16, codes 0..15 (byte i holds codes 2i, 2i+1), block scale 2.0
        // (E4M3 0x40), global 0.25.
        let packed: Vec<u8> = (0..8u8).map(|i| (2 * i) | ((2 * i + 1) << 4)).collect();
        let w = LowBit::Nvfp4 { packed: &packed, block_scales: &[0x40], global: 0.25 };
        let mut out = [0f32; 16];
        w.rows_f32(16, 0, 1, &mut out);
        let want: Vec<f32> = (0..16u8).map(|c| e2m1_to_f32(c) * 0.5).collect();
        assert_eq!(out.to_vec(), want);
        assert_eq!(out[7], 3.0);
        assert_eq!(out[15], -3.0);
        assert!(w.check(2, 16).is_err());
    }
}
