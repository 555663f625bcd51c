//! The quantized linears' launches (`quant.cu`): FP8 (E4M3 weights and activations) and NVFP4
//! (E2M1 weights, weight-only). Decode-sized calls (1, 2, 4 or 8 rows) run the GEMVs, which
//! read the weights as stored (FP8 one byte a weight, NVFP4 half a byte plus a block scale per
//! 16; FP8 on sm_89+ on tensor cores, the activations quantized inside, `Gpu::fp8_tc`; NVFP4
//! with bf16 activations on tensor cores where `Gpu::nvfp4_tc`); the rest
//! dequantize the weight's codes into scratch (exact in the activations' dtype) and run cuBLAS
//! with f32 output, then one epilogue applies the scales and bias; or, with bf16 activations and
//! `[kernels] fp8_gemm_cublaslt`, the activations quantized to E4M3 bytes and cuBLASLt's FP8
//! tensor-core GEMM (`lt.rs`), which applies the scales itself where it can. An FP8 call whose
//! activations arrive as E4M3 codes already (`LowBitLinear::x_codes`: an RMSNorm with
//! `quant=fp8` made them at the static input scale) skips the quantizing: the tensor-core GEMV
//! reads the codes where they lie, cuBLASLt reads them, and the other paths take their values.

use super::lt::{LtOperands, LtOut};
use super::{grid, launched, Dt, GateAct, Gpu, Ptr};
use crate::cuda::Unavailable;

/// Warps a block of the NVFP4 tensor-core GEMV (`NVFP4_TC_WARPS` in quant.cu, which must agree),
/// splitting k. On an H100 (session 36, `benches/gpu/fp8-gemv/nvfp4.py`, 32 layers of the 8B
/// shapes) 8 warps with one 128-byte step in flight each took a layer's four GEMVs in 64.2 us,
/// the 4 warps with two steps of before 74.9 us (a streaming read of the bytes: 55.3 us).
const NVFP4_TC_WARPS: u32 = 8;
/// Warps a block of the FP8 tensor-core GEMV (`FP8_TC_WARPS` in quant.cu, which must agree):
/// 8 measured fastest on an H200 (BENCHMARKS.md, session 25; 16 slower).
const FP8_TC_WARPS: u32 = 8;

/// Index of a dtype's build in the `[f32, bf16]` kernel pairs.
fn dt_index(dt: Dt) -> Result<usize, Unavailable> {
    match dt {
        Dt::F32 => Ok(0),
        Dt::BF16 => Ok(1),
        _ => Err(Unavailable(format!("quantized linears take f32 or bf16 activations, not {dt:?}"))),
    }
}

/// The scales of a quantized weight.
#[derive(Clone, Copy, Debug)]
pub struct LowBitScales {
    /// One f32 the activations' codes are scaled by (FP8's `input_scale`), or 0 (none; for
    /// FP8 with `dynamic`: each activation row's own, computed into scratch).
    pub input: Ptr,
    /// FP8: the activations are quantized per row at their own scale (max |x| / 448).
    pub dynamic: bool,
    /// One f32, or one a row when `per_row`.
    pub weight: Ptr,
    pub per_row: bool,
    /// With `per_row`: where the weight's scale is one value over runs of rows (a fused
    /// linear's parts, each with one scale: q/k/v, gate/up), the runs' row counts, 0 past the
    /// last; all 0 where not known. cuBLASLt has no per-channel scaled FP8 algorithm on every
    /// device (none on an H200): then each run is one scaled GEMM with its scalar scale, not
    /// f32 sums and an epilogue kernel.
    pub runs: ScaleRuns,
}

/// Row counts of a per-row scale's runs of equal values (`LowBitScales::runs`).
pub type ScaleRuns = [usize; 4];

/// The most runs `LowBitScales::runs` records.
pub const MAX_SCALE_RUNS: usize = std::mem::size_of::<ScaleRuns>() / std::mem::size_of::<usize>();

/// A quantized linear's call: `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias)`.
#[derive(Clone, Copy, Debug)]
pub struct LowBitLinear {
    pub dt: Dt,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub x: Ptr,
    pub y: Ptr,
    /// `[n]` in `dt`, or 0.
    pub bias: Ptr,
    /// FP8 with a static input scale: `x` holds `[m, k]` E4M3 codes at that scale (one byte
    /// each), not values of `dt`.
    pub x_codes: bool,
    /// W is a gated MLP's fused gate/up (`n` rows, gate first) and `y` `[m, n / 2]` gets
    /// `act(gate) · up` of the rounded output (as `silu_mul` computes it).
    pub gated: Option<GateAct>,
    /// With `gated`: one f32 (the next FP8 linear's input scale), `y` then `[m, n / 2]` E4M3
    /// codes of those values at it (as `silu_mul` with its codes scale writes them); 0: values.
    pub y_codes_scale: Ptr,
}

impl LowBitLinear {
    /// Scratch bytes of an FP8 or NVFP4 call, in the order the launchers take them: the
    /// activations' codes (FP8 only, `m·k` of `dt`), the dequantized weight (`n·k` of `dt`),
    /// the f32 sums (`m·n`) and the activation rows' scales (dynamic FP8, `m` f32), each rounded
    /// up to 256 bytes; a `gated` call also the whole output (`m·n` of `dt`) for the paths
    /// without the gated GEMV.
    pub fn scratch(dt_bytes: usize, m: usize, n: usize, k: usize, gated: bool) -> Vec<usize> {
        let up = |b: usize| b.div_ceil(256) * 256;
        let mut s = vec![up(m * k * dt_bytes), up(n * k * dt_bytes), up(m * n * 4), up(m * 4)];
        if gated {
            s.push(up(m * n * dt_bytes));
        }
        s
    }

    fn sizes(&self) -> Result<(i64, i32, i32), Unavailable> {
        let big = |v: usize| i32::try_from(v).is_err();
        if big(self.n) || big(self.k) || big(self.m) {
            return Err(Unavailable(format!("quantized linear {self:?}: sizes past 32-bit counts")));
        }
        Ok((self.m as i64, self.n as i32, self.k as i32))
    }
}

/// `(first row, rows)` of each run of a per-row weight scale that `s.runs` says is one value
/// there, when they cover the `n` rows and each run's output columns start 16-byte aligned
/// (bf16 y); None otherwise (or for one scale, or per-row activation scales).
fn scalar_runs(c: &LowBitLinear, s: &LowBitScales) -> Option<Vec<(usize, usize)>> {
    if !s.per_row || s.dynamic {
        return None;
    }
    let mut out = Vec::new();
    let mut n0 = 0usize;
    for &rows in s.runs.iter().take_while(|&&r| r > 0) {
        if !n0.is_multiple_of(8) {
            return None;
        }
        out.push((n0, rows));
        n0 += rows;
    }
    (n0 == c.n && !out.is_empty()).then_some(out)
}

/// The GEMV build for `m` activation rows (1, 2, 4 or 8), if any.
fn gemv_rows(m: usize) -> Option<usize> {
    match m {
        1 => Some(0),
        2 => Some(1),
        4 => Some(2),
        8 => Some(3),
        _ => None,
    }
}

impl Gpu {
    /// `torch_quant_fp8_linear`: `w` E4M3 `[n, k]`; scratch as [`LowBitLinear::scratch`] (the
    /// fifth region only for a gated call).
    pub fn fp8_linear(&self, c: &LowBitLinear, w: Ptr, s: LowBitScales, scratch: [Ptr; 5]) -> Result<(), Unavailable> {
        let di = dt_index(c.dt)?;
        let (m64, n32, k32) = c.sizes()?;
        let [xq, wd, acc, rows, full] = scratch;
        if c.x_codes && (s.dynamic || s.input == 0) {
            return Err(Unavailable("FP8 activations as codes need a static input scale".into()));
        }
        if c.gated.is_some() && !c.n.is_multiple_of(2) {
            return Err(Unavailable(format!("a gated FP8 linear needs gate and up rows: {} rows", c.n)));
        }
        if c.y_codes_scale != 0 && c.gated.is_none() {
            return Err(Unavailable("an FP8 linear writes codes only from its gated epilogue".into()));
        }
        if let Some(i) =
            gemv_rows(c.m).filter(|_| self.fp8_tc && c.k.is_multiple_of(16) && (w | c.x).is_multiple_of(16))
        {
            let (pf, dynamic, per_row) = (self.prefetch_row.min(c.k) as i32, s.dynamic as i32, s.per_row as i32);
            let (x, xc) = if c.x_codes { (0, c.x) } else { (c.x, 0) };
            let (f, out_rows, rows_a_block) = match c.gated {
                Some(_) => (self.f.fp8_tc_gemv_gated[di][i], c.n / 2, 8),
                None => (self.f.fp8_tc_gemv[di][i], c.n, 16),
            };
            let out_rows32 = out_rows as i32;
            let mut l = self.launcher(f);
            l.arg(&x).arg(&xc).arg(&w).arg(&s.input).arg(&dynamic).arg(&s.weight).arg(&per_row);
            l.arg(&c.bias).arg(&c.y).arg(&out_rows32).arg(&k32).arg(&pf);
            let act = c.gated.map_or(0, |a| a as i32);
            if c.gated.is_some() {
                l.arg(&act).arg(&c.y_codes_scale);
            }
            let cfg = super::LaunchConfig {
                grid_dim: (out_rows.div_ceil(rows_a_block) as u32, 1, 1),
                block_dim: (32 * FP8_TC_WARPS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: x [m, k] of dt or xc [m, k] codes (rows 16-byte aligned: k % 16 == 0 and
            // c.x aligned), w [n, k] bytes likewise, y [m, n] ([m, n / 2] gated, bytes with
            // y_codes_scale, one f32 or null); s.input one f32 (unread when dynamic), s.weight
            // one or n; 16 weight rows a block of FP8_TC_WARPS warps (quant.cu's gemv_fp8_tc;
            // gated: 8 gate rows and their up rows).
            let name = match (c.gated.is_some(), c.x_codes) {
                (true, _) => "gemv_fp8_tc_gated",
                (false, true) => "gemv_fp8_tc_codes",
                (false, false) => "gemv_fp8_tc",
            };
            return launched(name, unsafe { l.launch(cfg) }.map(|_| ()));
        }
        if let Some(act) = c.gated {
            // The whole gate/up output into scratch by the paths below, then the activation.
            if full == 0 {
                return Err(Unavailable("a gated FP8 linear's output scratch was not planned".into()));
            }
            let plain = LowBitLinear { y: full, gated: None, y_codes_scale: 0, ..*c };
            self.fp8_linear(&plain, w, s, [xq, wd, acc, rows, 0])?;
            let codes = (c.y_codes_scale != 0).then_some(c.y_codes_scale);
            return self.silu_mul(full, None, c.dt, c.y, codes, c.m, c.n / 2, act);
        }
        let lt_ok = c.dt == Dt::BF16 && c.k.is_multiple_of(16) && (w | c.x | xq).is_multiple_of(16);
        if let Some(lt) = self.fp8_lt.as_ref().filter(|_| lt_ok && gemv_rows(c.m).is_none()) {
            let xq = if c.x_codes {
                c.x
            } else {
                let (dynamic, rows_ptr) = (s.dynamic as i32, if s.dynamic { rows } else { 0 });
                let mut l = self.launcher(self.f.quant_bytes);
                l.arg(&c.x).arg(&s.input).arg(&dynamic).arg(&rows_ptr).arg(&xq).arg(&k32);
                let cfg =
                    super::LaunchConfig { grid_dim: (c.m as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: x m·k bf16 and xq m·k bytes (the scratch holds m·k bf16), both 16-byte
                // aligned with k % 16 == 0; s.input one f32 (unread when dynamic), rows m f32; one
                // block a row.
                launched("e4m3_bytes_rows", unsafe { l.launch(cfg) }.map(|_| ()))?;
                xq
            };
            let s = if s.dynamic { LowBitScales { input: rows, ..s } } else { s };
            let (ws, ws_bytes) = self.blas_ws;
            let (shape, stream) = ((c.m, c.n, c.k), self.stream.cu_stream());
            // Without a bias cuBLASLt applies the scales and writes y itself, where it can.
            let scaled = LtOut::Bf16Scaled { weight_rows: s.per_row, input_rows: s.dynamic };
            let o = LtOperands { xq, w, out: c.y, w_scale: s.weight, x_scale: s.input };
            if self.fp8_lt_scaled && c.bias == 0 && s.input != 0 && s.weight != 0 {
                if lt.gemm(stream, shape, c.n, scaled, o, ws, ws_bytes)? {
                    return Ok(());
                }
                if let Some(runs) = scalar_runs(c, &s) {
                    // One GEMM a run of rows, its scale the run's first value, writing its
                    // columns of y (leading dimension n).
                    let one = LtOut::Bf16Scaled { weight_rows: false, input_rows: false };
                    let mut done = true;
                    for (n0, rows) in runs {
                        let part = LtOperands {
                            w: w + (n0 * c.k) as u64,
                            out: c.y + (n0 * 2) as u64,
                            w_scale: s.weight + (n0 * 4) as u64,
                            ..o
                        };
                        done &= lt.gemm(stream, (c.m, rows, c.k), c.n, one, part, ws, ws_bytes)?;
                    }
                    if done {
                        return Ok(());
                    }
                }
            }
            lt.gemm(stream, shape, c.n, LtOut::F32Sums, LtOperands { out: acc, ..o }, ws, ws_bytes)?;
            return self.lowbit_epilogue(di, c, s, acc, m64, n32);
        }
        let s = if c.x_codes {
            // The codes' values (unscaled, as e4m3_codes writes them) for the paths below.
            let total = (c.m * c.k) as i64;
            let mut l = self.launcher(self.f.quant[2 + di]);
            l.arg(&c.x).arg(&xq).arg(&total);
            // SAFETY: x m·k bytes, xq m·k values of dt.
            launched("fp8_values", unsafe { l.launch(grid(c.m * c.k, 256)) }.map(|_| ()))?;
            s
        } else if s.dynamic {
            let mut l = self.launcher(self.f.quant_rows[di]);
            l.arg(&c.x).arg(&rows).arg(&xq).arg(&k32);
            let cfg = super::LaunchConfig { grid_dim: (c.m as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: x and xq hold m·k values of dt, rows m f32; one block a row.
            launched("e4m3_codes_rows", unsafe { l.launch(cfg) }.map(|_| ()))?;
            LowBitScales { input: rows, ..s }
        } else {
            let total = (c.m * c.k) as i64;
            let mut l = self.launcher(self.f.quant[di]);
            l.arg(&c.x).arg(&s.input).arg(&xq).arg(&total);
            // SAFETY: x and xq hold m·k values of dt; s.input one f32.
            launched("e4m3_codes", unsafe { l.launch(grid(c.m * c.k, 256)) }.map(|_| ()))?;
            s
        };
        let (per_row, in_rows) = (s.per_row as i32, s.dynamic as i32);
        if let Some(i) = gemv_rows(c.m).filter(|_| c.k.is_multiple_of(16) && (w | xq).is_multiple_of(16)) {
            let pf = self.prefetch_row.min(c.k) as i32;
            let mut l = self.launcher(self.f.quant_gemv[di][i]);
            l.arg(&xq).arg(&w).arg(&s.input).arg(&in_rows).arg(&s.weight).arg(&per_row).arg(&c.bias).arg(&c.y);
            l.arg(&n32).arg(&k32).arg(&pf);
            // SAFETY: xq [m, k], w [n, k] bytes (rows 16-byte aligned: k % 16 == 0 and w
            // aligned), y [m, n]; one warp a row, 8 a block.
            return launched("gemv_fp8", unsafe { l.launch(grid(c.n * 32, 256)) }.map(|_| ()));
        }
        let total_w = (c.n * c.k) as i64;
        let mut l = self.launcher(self.f.quant[2 + di]);
        l.arg(&w).arg(&wd).arg(&total_w);
        // SAFETY: w n·k bytes, wd n·k values of dt.
        launched("fp8_values", unsafe { l.launch(grid(c.n * c.k, 256)) }.map(|_| ()))?;
        self.gemm(c.dt, Dt::F32, c.m, c.n, c.k, xq, wd, acc, false)?;
        self.lowbit_epilogue(di, c, s, acc, m64, n32)
    }

    /// `torch_quant_nvfp4_linear`, weight-only: `w` E2M1 `[n, k]` two a byte, `block_scales`
    /// E4M3 `[n, k / 16]`, `s.weight` the global scale; scratch as [`LowBitLinear::scratch`]
    /// (the first region unused; the fifth only for a gated call).
    pub fn nvfp4_linear(
        &self,
        c: &LowBitLinear,
        w: Ptr,
        block_scales: Ptr,
        s: LowBitScales,
        scratch: [Ptr; 5],
    ) -> Result<(), Unavailable> {
        let di = dt_index(c.dt)?;
        let (m64, n32, k32) = c.sizes()?;
        let [xq, wd, acc, rows, full] = scratch;
        if c.gated.is_some() && !c.n.is_multiple_of(2) {
            return Err(Unavailable(format!("a gated NVFP4 linear needs gate and up rows: {} rows", c.n)));
        }
        if c.y_codes_scale != 0 {
            return Err(Unavailable("an NVFP4 linear writes values, not codes".into()));
        }
        let tc = self.nvfp4_tc
            && c.dt == Dt::BF16
            && c.k.is_multiple_of(64)
            && (w | c.x).is_multiple_of(16)
            && block_scales.is_multiple_of(4);
        if let Some(i) = gemv_rows(c.m).filter(|_| tc) {
            let (f, out_rows, rows_a_block) = match c.gated {
                Some(_) => (self.f.nvfp4_tc_gemv_gated[i], c.n / 2, 8),
                None => (self.f.nvfp4_tc_gemv[i], c.n, 16),
            };
            let (out_rows32, act) = (out_rows as i32, c.gated.map_or(0, |a| a as i32));
            let mut l = self.launcher(f);
            l.arg(&c.x).arg(&w).arg(&block_scales).arg(&s.weight).arg(&c.bias).arg(&c.y).arg(&out_rows32).arg(&k32);
            if c.gated.is_some() {
                l.arg(&act);
            }
            let cfg = super::LaunchConfig {
                grid_dim: (out_rows.div_ceil(rows_a_block) as u32, 1, 1),
                block_dim: (32 * NVFP4_TC_WARPS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: x [m, k] bf16 and w [n, k/2] bytes with 16-byte-aligned rows (k % 64 == 0
            // and both pointers aligned), block_scales [n, k/16] with 4-byte-aligned rows, y [m,
            // n] ([m, n / 2] gated); 16 weight rows a block of NVFP4_TC_WARPS warps (quant.cu's
            // gemv_nvfp4_tc, built with that many; gated: 8 gate rows and their up rows).
            let name = if c.gated.is_some() { "gemv_nvfp4_tc_gated" } else { "gemv_nvfp4_tc" };
            return launched(name, unsafe { l.launch(cfg) }.map(|_| ()));
        }
        if let Some(act) = c.gated {
            // The whole gate/up output into scratch by the paths below, then the activation.
            if full == 0 {
                return Err(Unavailable("a gated NVFP4 linear's output scratch was not planned".into()));
            }
            let plain = LowBitLinear { y: full, gated: None, y_codes_scale: 0, ..*c };
            self.nvfp4_linear(&plain, w, block_scales, s, [xq, wd, acc, rows, 0])?;
            return self.silu_mul(full, None, c.dt, c.y, None, c.m, c.n / 2, act);
        }
        if let Some(i) = gemv_rows(c.m).filter(|_| c.k.is_multiple_of(32) && (w | c.x).is_multiple_of(16)) {
            let pf = self.prefetch_row.min(c.k / 2) as i32;
            let mut l = self.launcher(self.f.nvfp4_gemv[di][i]);
            l.arg(&c.x).arg(&w).arg(&block_scales).arg(&s.weight).arg(&c.bias).arg(&c.y);
            l.arg(&n32).arg(&k32).arg(&pf);
            // SAFETY: x [m, k] of dt, w [n, k/2] bytes (rows 16-byte aligned: k % 32 == 0),
            // block_scales [n, k/16], y [m, n]; one warp a row, 8 a block.
            return launched("gemv_nvfp4", unsafe { l.launch(grid(c.n * 32, 256)) }.map(|_| ()));
        }
        let total_w = (c.n * c.k) as i64;
        let mut l = self.launcher(self.f.quant[4 + di]);
        l.arg(&w).arg(&block_scales).arg(&wd).arg(&total_w).arg(&k32);
        // SAFETY: w n·k/2 bytes, block_scales n·k/16, wd n·k values of dt; k % 16 == 0 (the op
        // rule's check).
        launched("nvfp4_values", unsafe { l.launch(grid(c.n * c.k, 256)) }.map(|_| ()))?;
        self.gemm(c.dt, Dt::F32, c.m, c.n, c.k, c.x, wd, acc, false)?;
        self.lowbit_epilogue(di, c, LowBitScales { input: 0, dynamic: false, ..s }, acc, m64, n32)
    }

    fn lowbit_epilogue(
        &self,
        di: usize,
        c: &LowBitLinear,
        s: LowBitScales,
        acc: Ptr,
        m64: i64,
        n32: i32,
    ) -> Result<(), Unavailable> {
        let (per_row, in_rows) = (s.per_row as i32, s.dynamic as i32);
        let mut l = self.launcher(self.f.quant[6 + di]);
        l.arg(&acc).arg(&s.input).arg(&in_rows).arg(&s.weight).arg(&per_row).arg(&c.bias).arg(&c.y);
        l.arg(&m64).arg(&n32);
        // SAFETY: acc m·n f32, y m·n of dt, bias n of dt or null, the scales one f32 (n if
        // per_row) or null.
        launched("lowbit_epilogue", unsafe { l.launch(grid(c.m * c.n, 256)) }.map(|_| ()))
    }

    /// An attention output's rows (`rows` says where head h of token t lies in `x`, `d` values
    /// of `dt` each) as E4M3 codes at the static scale `s_in` (one f32), written token-major
    /// `[tokens, heads, d]` to `out` (one byte each): `quant=fp8` on a cached attention, the
    /// codes its FP8 o_proj reads.
    #[allow(clippy::too_many_arguments)]
    pub fn e4m3_heads(
        &self,
        x: Ptr,
        dt: Dt,
        rows: super::HeadRows,
        heads: usize,
        tokens: usize,
        d: usize,
        s_in: Ptr,
        out: Ptr,
    ) -> Result<(), Unavailable> {
        let di = dt_index(dt)?;
        let n = heads * tokens;
        let (Ok(grid_x), Ok(h32), Ok(d32)) = (u32::try_from(n), i32::try_from(heads), i32::try_from(d)) else {
            return Err(Unavailable(format!("attention output codes: {tokens} tokens x {heads} heads x {d}")));
        };
        if n == 0 || d == 0 {
            return Ok(());
        }
        let mut l = self.launcher(self.f.quant_heads[di]);
        l.arg(&x).arg(&rows.head).arg(&rows.token).arg(&h32).arg(&d32).arg(&s_in).arg(&out);
        let block = (d.div_ceil(32) * 32).min(128) as u32;
        let cfg = super::LaunchConfig { grid_dim: (grid_x, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: x holds every (token, head) row at rows' strides, d values of dt each; out
        // tokens·heads·d bytes; s_in one f32; one block a row.
        launched("e4m3_heads", unsafe { l.launch(cfg) }.map(|_| ()))
    }
}

#[cfg(test)]
mod tests {
    /// The value of `#define NAME value` in a kernel source.
    fn defined(src: &str, name: &str) -> Option<u32> {
        let key = format!("#define {name} ");
        src.lines().find_map(|l| l.trim().strip_prefix(key.as_str())).and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn the_launches_take_the_warps_the_kernels_were_built_with() {
        let quant = include_str!("../quant.cu");
        assert_eq!(defined(quant, "NVFP4_TC_WARPS"), Some(super::NVFP4_TC_WARPS));
        assert_eq!(defined(quant, "FP8_TC_WARPS"), Some(super::FP8_TC_WARPS));
    }
}
