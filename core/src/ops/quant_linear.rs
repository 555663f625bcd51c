//! The quantized linears of ModelOpt checkpoints, named as AutoDeploy names them, each defined
//! once here and registered in the op table. The `quantize` stage's transforms make them from
//! `aten.linear`s whose weights the checkpoint stored quantized; their scales are graph values
//! (weights of the checkpoint), so later transforms can see and share them.
//!
//! - `torch_quant_fp8_linear(x, w, input_scale, weight_scale[, bias])`: `w` E4M3 `[out, in]`,
//!   `input_scale` one f32, `weight_scale` one f32 or one a row (`[out]`). The input goes through
//!   E4M3 at `input_scale` (saturating, ties to even), as an FP8 GEMM's input must; then
//!   `y = x_q · (w · weight_scale)ᵀ + bias` in f32, rounded once to x's dtype. With `dynamic=true`
//!   (`quantize = "fp8"` on a float checkpoint) there is no `input_scale` input: each row of x
//!   (a token) goes through E4M3 at its own scale, max |x_row| / 448 (1 for a row of zeros).
//!   With `out=<dtype>` (static scale only) x is E4M3 codes at `input_scale` already (the
//!   `fuse_fp8_input_quant` transform's RMSNorm made them, the codes this op would have made
//!   of the norm's plain output), read as they are; y is rounded to `out`. With `act=silu`
//!   (`gelu_tanh`, `gelu`; the `fuse_quant_gated_epilogue` transform) the weight is a gated MLP's
//!   fused gate/up (`[2·I, in]`, gate rows first) and the op outputs `torch_gated_act` of its
//!   rounded y, `[.., I]`: on CUDA the decode GEMV computes each gate row with its up row and
//!   writes the product (no `[.., 2·I]` tensor, no second launch); with `act` also `quant=fp8`
//!   (the `fuse_fp8_input_quant` transform, where FP8 linears alone read that product at one
//!   static input scale): one more input, that scale, last, and the output is the E4M3 codes of
//!   the rounded product / scale, the codes the down projection would have made itself (the
//!   decode GEMV writes them; no `silu_mul` launch). With `scale_runs=[r0, r1,
//!   ..]` (`fuse_gemms` over parts with one weight scale each) the per-row weight scale is one
//!   value over each run of rows: the CPU kernel checks it, CUDA's cuBLASLt path scales each
//!   run's GEMM with that value.
//! - `torch_quant_nvfp4_linear(x, w, weight_scale, weight_scale_2[, bias])`: `w` E2M1 `[out,
//!   in]` (two a byte), `weight_scale` E4M3 `[out, in / 16]` (one a block of 16 along a row),
//!   `weight_scale_2` one f32. Weight-only: the input as it is (Hopper has no FP4 tensor cores;
//!   Blackwell's W4A4 would also take the checkpoint's `input_scale`). `act=..` as the FP8
//!   linear's.
//!
//! On CUDA (kernels/src/cuda/quant.cu, exec/quant.rs) the same sums: products of the codes'
//! values (exact in f32 and bf16), f32 sums, the scales applied once at the end.

use std::sync::Arc;

pub use autodeploy_kernels::cuda::exec::MAX_SCALE_RUNS;
use autodeploy_kernels::cuda::exec::{LowBitLinear, LowBitScales, ScaleRuns};
use autodeploy_kernels::quant::lowbit::{fake_quant_e4m3, lowbit_linear, LowBit, NVFP4_BLOCK};

use crate::cpu::KernelOptions;
use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::linear::{gate_act_name, gate_act_named, GateAct};
use crate::ops::{cuda_dt, gpu_of, Op};
use crate::shape::Dim;
use crate::tensor::Tensor;

pub const FP8_LINEAR: &str = "torch_quant_fp8_linear";
pub const NVFP4_LINEAR: &str = "torch_quant_nvfp4_linear";

/// An FP8 linear's attributes: `dynamic=true`, or `out=<dtype>` (the input E4M3 codes); `act`
/// (a gated epilogue) and with it `quant=fp8` (its output as E4M3 codes); `scale_runs=[..]` (a
/// per-row weight scale that is one value over each run of rows: a fused linear's parts; at
/// most `MAX_SCALE_RUNS`, summing to the rows).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Fp8Attrs {
    dynamic: bool,
    codes_out: Option<DType>,
    gated: Option<GateAct>,
    /// `quant=fp8`: the gated output as E4M3 codes at the last input's scale.
    fp8_out: bool,
    runs: ScaleRuns,
}

impl Fp8Attrs {
    fn text(&self) -> String {
        let mut parts = Vec::new();
        if self.dynamic {
            parts.push("dynamic=true".to_string());
        }
        if let Some(d) = self.codes_out {
            parts.push(format!("out={d}"));
        }
        if let Some(act) = self.gated {
            parts.push(format!("act={}", gate_act_name(act)));
        }
        if self.fp8_out {
            parts.push("quant=fp8".to_string());
        }
        if self.runs[0] > 0 {
            let runs: Vec<String> = run_rows(&self.runs).map(|r| r.to_string()).collect();
            parts.push(format!("scale_runs=[{}]", runs.join(", ")));
        }
        parts.join(", ")
    }
}

fn fp8_attrs(attrs: &str) -> Result<Fp8Attrs, String> {
    read_attrs(FP8_LINEAR, attrs, |a| {
        let dynamic = a.opt_bool("dynamic")?.unwrap_or(false);
        let codes_out = match a.take("out") {
            None => None,
            Some(v) => match DType::parse(v).filter(|d| d.is_float()) {
                Some(_) if dynamic => return Err(a.bad("out", v, "set with dynamic=true (codes need a static scale)")),
                Some(d) => Some(d),
                None => return Err(a.bad("out", v, "f32, bf16 or f16")),
            },
        };
        let gated = match a.take("act") {
            None => None,
            Some(v) => Some(gate_act_named(v).ok_or_else(|| a.bad("act", v, "silu, gelu_tanh or gelu"))?),
        };
        let fp8_out = codes_out::read(a)?;
        if fp8_out && gated.is_none() {
            return Err(a.bad("quant", "fp8", "set with act=.. (only a gated epilogue writes codes)"));
        }
        let mut runs = [0; MAX_SCALE_RUNS];
        if let Some(list) = a.opt_int_list("scale_runs")? {
            if list.is_empty() || list.len() > MAX_SCALE_RUNS || list.iter().any(|&r| r <= 0) {
                let text = format!("{list:?}");
                return Err(a.bad("scale_runs", &text, &format!("1 to {MAX_SCALE_RUNS} positive row counts")));
            }
            list.iter().zip(runs.iter_mut()).for_each(|(&r, slot)| *slot = r as usize);
        }
        Ok(Fp8Attrs { dynamic, codes_out, gated, fp8_out, runs })
    })
}

/// The row counts of `runs` (`scale_runs`), none when absent.
fn run_rows(runs: &ScaleRuns) -> impl Iterator<Item = usize> + '_ {
    runs.iter().copied().take_while(|&r| r > 0)
}

impl Op {
    pub fn fp8_linear() -> Op {
        Op { name: FP8_LINEAR, attrs: String::new() }
    }
    /// The FP8 linear (static input scale) whose per-row weight scale is one value over each
    /// of `runs` (row counts, in order: a fused linear's parts); `runs` past `MAX_SCALE_RUNS`
    /// or empty: the plain op.
    pub fn fp8_linear_scale_runs(runs: &[usize]) -> Op {
        let mut r = [0; MAX_SCALE_RUNS];
        if !runs.is_empty() && runs.len() <= MAX_SCALE_RUNS && runs.iter().all(|&x| x > 0) {
            r[..runs.len()].copy_from_slice(runs);
        }
        let a = Fp8Attrs { dynamic: false, codes_out: None, gated: None, fp8_out: false, runs: r };
        Op { name: FP8_LINEAR, attrs: a.text() }
    }
    /// The FP8 linear with per-token activation scales: inputs `(x, w, weight_scale[, bias])`.
    pub fn fp8_linear_dynamic() -> Op {
        Op { name: FP8_LINEAR, attrs: "dynamic=true".into() }
    }
    /// This FP8 linear over input codes (`x` E4M3 at `input_scale`), `y` rounded to `out`,
    /// otherwise as it is (a gated epilogue kept); None for another op.
    pub fn fp8_linear_over_codes(&self, out: DType) -> Option<Op> {
        let a = self.attrs_of(FP8_LINEAR).and_then(|a| fp8_attrs(a).ok())?;
        Some(Op { name: FP8_LINEAR, attrs: Fp8Attrs { codes_out: Some(out), ..a }.text() })
    }
    /// This FP8 linear with a gated epilogue writing values, writing E4M3 codes instead
    /// (`quant=fp8`, the scale then its last input); None for another op.
    pub fn fp8_linear_gated_codes(&self) -> Option<Op> {
        let a = self.attrs_of(FP8_LINEAR).and_then(|a| fp8_attrs(a).ok())?;
        (a.gated.is_some() && !a.fp8_out && !a.dynamic)
            .then(|| Op { name: FP8_LINEAR, attrs: Fp8Attrs { fp8_out: true, ..a }.text() })
    }
    /// This FP8 (over float inputs) or NVFP4 linear without an epilogue, with `act(gate) · up` of
    /// its output as its output (`act=..`); None for another op.
    pub fn quant_linear_gated(&self, act: GateAct) -> Option<Op> {
        if let Some(a) = self.attrs_of(FP8_LINEAR).and_then(|a| fp8_attrs(a).ok()) {
            return (a.codes_out.is_none() && a.gated.is_none())
                .then(|| Op { name: FP8_LINEAR, attrs: Fp8Attrs { gated: Some(act), ..a }.text() });
        }
        let none = self.attrs_of(NVFP4_LINEAR).and_then(|a| nvfp4_gated(a).ok())?.is_none();
        none.then(|| Op { name: NVFP4_LINEAR, attrs: format!("act={}", gate_act_name(act)) })
    }
    /// For a plain FP8 linear (float input, no epilogue, no `scale_runs`: what the `quantize`
    /// stage makes), where its weight scale and its bias (if it has one) are among its inputs:
    /// `(weight_scale, bias)`. None for any other op.
    pub fn fp8_linear_inputs(&self) -> Option<(usize, usize)> {
        let a = self.attrs_of(FP8_LINEAR).and_then(|a| fp8_attrs(a).ok())?;
        let plain = a.codes_out.is_none() && a.gated.is_none() && a.runs[0] == 0;
        let (_, s_w_at, bias_at) = fp8_inputs(a.dynamic);
        plain.then_some((s_w_at, bias_at))
    }
    /// Whether this is a plain NVFP4 linear (no epilogue: what the `quantize` stage makes),
    /// inputs `(x, w, weight_scale [out, in / 16], weight_scale_2[, bias])`.
    pub fn is_plain_nvfp4_linear(&self) -> bool {
        self.attrs_of(NVFP4_LINEAR).and_then(|a| nvfp4_gated(a).ok()).is_some_and(|g| g.is_none())
    }
    /// `Some(dynamic)` for an FP8 linear over float inputs (not one over codes).
    pub fn fp8_linear_of(&self) -> Option<bool> {
        self.attrs_of(FP8_LINEAR).and_then(|a| fp8_attrs(a).ok()).filter(|a| a.codes_out.is_none()).map(|a| a.dynamic)
    }
    pub fn nvfp4_linear() -> Op {
        Op { name: NVFP4_LINEAR, attrs: String::new() }
    }
}

/// Whether `m` holds one value (`[]` or `[1]`).
fn one_value(m: &TensorMeta) -> bool {
    m.shape.iter().all(|d| *d == Dim::new(1))
}

/// The checks both ops share: x float, w `[out, in]` of `w_dtype` with `in` = x's last dim, an
/// optional bias `[out]`; the output `x[..., out]` in x's dtype.
fn linear_out(ins: &[TensorMeta], w_dtype: DType, bias_at: usize) -> Result<Vec<TensorMeta>, String> {
    let (x, w) = (&ins[0], &ins[1]);
    if !x.dtype.is_float() || x.shape.is_empty() {
        return Err(format!("needs a float input with a last dim, got {x}"));
    }
    if w.dtype != w_dtype || w.shape.len() != 2 || x.shape.last() != Some(&w.shape[1]) {
        return Err(format!("input {x} vs weight {w}: weight must be {w_dtype} [out, in]"));
    }
    if let Some(b) = ins.get(bias_at) {
        if b.shape.len() != 1 || b.shape[0] != w.shape[0] || !b.dtype.is_float() {
            return Err(format!("bias {b} vs weight {w}"));
        }
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("checked") = w.shape[0].clone();
    Ok(vec![TensorMeta { dtype: x.dtype, shape }])
}

/// An FP8 linear's inputs without `quant=fp8`'s codes scale, and that scale (its last input).
fn split_codes_scale<T>(ins: &[T], fp8_out: bool) -> Result<(&[T], Option<&T>), String> {
    match fp8_out {
        true => ins
            .split_last()
            .map(|(s, rest)| (rest, Some(s)))
            .ok_or_else(|| "quant=fp8 takes the codes' scale last".into()),
        false => Ok((ins, None)),
    }
}

/// Where an FP8 linear's inputs are: (input scale, weight scale, bias).
fn fp8_inputs(dynamic: bool) -> (Option<usize>, usize, usize) {
    if dynamic {
        (None, 2, 3)
    } else {
        (Some(2), 3, 4)
    }
}

fn fp8_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let Fp8Attrs { dynamic, codes_out, gated, fp8_out, runs } = fp8_attrs(attrs)?;
    let (s_in_at, s_w_at, bias_at) = fp8_inputs(dynamic);
    // With quant=fp8 the codes' scale comes last, after the optional bias.
    let (ins, codes_scale) = split_codes_scale(ins, fp8_out)?;
    if ins.len() < bias_at || ins.len() > bias_at + 1 {
        let (lo, hi) = (bias_at + fp8_out as usize, bias_at + 1 + fp8_out as usize);
        return Err(format!("takes {lo} or {hi} inputs with dynamic={dynamic}, got {}", ins.len() + fp8_out as usize));
    }
    let (s_w, w) = (&ins[s_w_at], &ins[1]);
    if let Some(s_in) = s_in_at.map(|i| &ins[i]) {
        if s_in.dtype != DType::F32 || !one_value(s_in) {
            return Err(format!("input_scale {s_in}: want one f32"));
        }
    }
    let per_row = s_w.shape.len() == 1 && w.shape.first() == s_w.shape.first();
    if s_w.dtype != DType::F32 || !(one_value(s_w) || per_row) {
        return Err(format!("weight_scale {s_w} vs weight {w}: want one f32 or one a row"));
    }
    if runs[0] > 0 {
        let rows = w.shape.first().and_then(Dim::as_static);
        if !per_row || rows != Some(run_rows(&runs).sum()) {
            return Err(format!(
                "scale_runs {:?}: want row counts summing to weight {w}'s rows, with one scale a row",
                run_rows(&runs).collect::<Vec<_>>()
            ));
        }
    }
    let y = match (codes_out, ins[0].dtype) {
        (Some(out), DType::F8E4M3) => {
            let as_float = TensorMeta { dtype: out, shape: ins[0].shape.clone() };
            let metas: Vec<TensorMeta> = std::iter::once(as_float).chain(ins[1..].iter().cloned()).collect();
            linear_out(&metas, DType::F8E4M3, bias_at)
        }
        (Some(out), _) => Err(format!("out={out}: x {} must be f8e4m3 codes", ins[0])),
        (None, _) => linear_out(ins, DType::F8E4M3, bias_at),
    }?;
    if gated.is_some() {
        let plain = gated_out(y, w)?.remove(0);
        return Ok(vec![codes_out::meta(fp8_out, codes_scale, plain)?]);
    }
    Ok(y)
}

/// An NVFP4 linear's attributes: `act` (a gated epilogue) or none.
fn nvfp4_gated(attrs: &str) -> Result<Option<GateAct>, String> {
    read_attrs(NVFP4_LINEAR, attrs, |a| match a.take("act") {
        None => Ok(None),
        Some(v) => Ok(Some(gate_act_named(v).ok_or_else(|| a.bad("act", v, "silu, gelu_tanh or gelu"))?)),
    })
}

/// A gated epilogue's output: half the rows' width (gate, then up) of the linear's.
fn gated_out(mut y: Vec<TensorMeta>, w: &TensorMeta) -> Result<Vec<TensorMeta>, String> {
    let last = y[0].shape.last_mut().expect("linear_out keeps x's rank");
    match last.as_static() {
        Some(n) if n % 2 == 0 => *last = Dim::new(n / 2),
        _ => return Err(format!("act: weight {w} must have an even number of rows (gate, then up)")),
    }
    Ok(y)
}

fn nvfp4_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let gated = nvfp4_gated(attrs)?;
    let (w, s_b, s_2) = (&ins[1], &ins[2], &ins[3]);
    let blocks_ok = match (w.shape.get(1).and_then(Dim::as_static), s_b.shape.get(1).and_then(Dim::as_static)) {
        (Some(k), Some(b)) => k % NVFP4_BLOCK == 0 && b == k / NVFP4_BLOCK,
        _ => false,
    };
    if s_b.dtype != DType::F8E4M3 || s_b.shape.len() != 2 || s_b.shape[0] != w.shape[0] || !blocks_ok {
        return Err(format!("weight_scale {s_b} vs weight {w}: want f8e4m3 [out, in / 16]"));
    }
    if s_2.dtype != DType::F32 || !one_value(s_2) {
        return Err(format!("weight_scale_2 {s_2}: want one f32"));
    }
    let y = linear_out(ins, DType::F4E2M1, 4)?;
    if gated.is_some() {
        return gated_out(y, w);
    }
    Ok(y)
}

fn low_bit<'a>(t: &'a Tensor, what: &str) -> Result<&'a [u8], String> {
    t.as_low_bit().ok_or_else(|| format!("{what} must be stored low-bit, got {}", t.dtype()))
}

/// `y = x · Wᵀ + bias` over a low-bit W, `x` already as the format takes it, the bias input
/// `bias_at` if there; with `gated`, `act(gate) · up` of y rounded to the output's dtype.
fn run(
    x: &[f32],
    w: LowBit<'_>,
    ins: &[&Tensor],
    bias_at: usize,
    out: &(DType, Vec<usize>),
    gated: Option<GateAct>,
) -> Result<Vec<Tensor>, String> {
    let (n, k) = (ins[1].shape()[0], ins[1].shape()[1]);
    let m = x.len() / k.max(1);
    let bias = ins.get(bias_at).map(|b| b.to_f32());
    let mut y = vec![0f32; m * n];
    lowbit_linear(m, n, k, x, w, bias.as_deref(), &mut y)?;
    if let Some(act) = gated {
        y.iter_mut().for_each(|v| *v = crate::cpu::round_as(out.0, *v));
        y = super::gated_act::gated_values(act, out.0, &y, None, m * n / 2, n / 2);
    }
    Ok(vec![Tensor::from_f32_as(out.0, out.1.clone(), y).map_err(|e| e.to_string())?])
}

fn fp8_cpu(
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
    _: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let a = fp8_attrs(attrs)?;
    let (ins, Some(scale)) = split_codes_scale(ins, a.fp8_out)? else {
        return fp8_values(ins, &a, &outs[0]);
    };
    // The gated values in the dtype the op writes without quant=fp8, then their codes.
    let plain = a.codes_out.unwrap_or(ins[0].dtype());
    let values = fp8_values(ins, &a, &(plain, outs[0].1.clone()))?;
    Ok(vec![codes_out::codes(values[0].to_f32().into_owned(), plain, scale, &outs[0].1)?])
}

/// The FP8 linear's output values (its gated epilogue's, with `act`) in `out`'s dtype; `ins`
/// without `quant=fp8`'s scale.
fn fp8_values(ins: &[&Tensor], a: &Fp8Attrs, out: &(DType, Vec<usize>)) -> Result<Vec<Tensor>, String> {
    let (s_in_at, s_w_at, bias_at) = fp8_inputs(a.dynamic);
    let k = ins[1].shape()[1];
    let mut x = ins[0].to_f32().into_owned();
    let scale = ins[s_w_at].to_f32();
    let mut start = 0;
    for rows in run_rows(&a.runs) {
        // (The CUDA GEMMs take each run's first value for all of it.)
        let run = scale.get(start..start + rows).ok_or("scale_runs past the weight scale's rows")?;
        if run.iter().any(|v| v.to_bits() != run[0].to_bits()) {
            return Err(format!("scale_runs: weight_scale rows {start}..{} are not one value", start + rows));
        }
        start += rows;
    }
    let w = LowBit::Fp8 { codes: low_bit(ins[1], "weight")?, scale: &scale };
    if ins[0].dtype() == DType::F8E4M3 {
        // Codes at the input scale: their values times it, what quantizing the float gave.
        let s = ins[s_in_at.ok_or("input codes need a static input_scale")?].to_f32()[0];
        x.iter_mut().for_each(|v| *v *= s);
        return run(&x, w, ins, bias_at, out, a.gated);
    }
    for row in x.chunks_mut(k.max(1)) {
        let s = match s_in_at {
            Some(i) => ins[i].to_f32()[0],
            None => dynamic_scale(row),
        };
        if !crate::mutation::is(crate::mutation::Mutation::Fp8RawInput) {
            row.iter_mut().for_each(|v| *v = fake_quant_e4m3(*v, s));
        }
    }
    run(&x, w, ins, bias_at, out, a.gated)
}

/// A row's dynamic E4M3 scale: max |x| / 448, or 1 for a row of zeros.
pub fn dynamic_scale(row: &[f32]) -> f32 {
    let a = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if a > 0.0 {
        a / autodeploy_kernels::quant::lowbit::E4M3_MAX
    } else {
        1.0
    }
}

fn nvfp4_cpu(
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
    _: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let gated = nvfp4_gated(attrs)?;
    let w = LowBit::Nvfp4 {
        packed: low_bit(ins[1], "weight")?,
        block_scales: low_bit(ins[2], "weight_scale")?,
        global: ins[3].to_f32()[0],
    };
    run(&ins[0].to_f32(), w, ins, 4, &outs[0], gated)
}

/// The call's sizes, x, y and bias (input `bias_at`) as the GPU launchers take them; `gated`,
/// the epilogue (y then `[m, n / 2]`); `dt`, the dtype of the values (y's, or with codes out the
/// one the values are rounded to).
fn cuda_call(
    ins: &[DeviceTensor],
    y: &DeviceTensor,
    dt: DType,
    bias_at: usize,
    gated: Option<GateAct>,
) -> Result<LowBitLinear, String> {
    let (n, k) = (ins[1].shape[0], ins[1].shape[1]);
    let m = y.shape.iter().product::<usize>() / (if gated.is_some() { n / 2 } else { n }).max(1);
    let bias = ins.get(bias_at);
    if let Some(b) = bias.filter(|b| b.dtype != dt) {
        return Err(format!("bias of {} with {dt} activations", b.dtype));
    }
    Ok(LowBitLinear {
        dt: cuda_dt(dt)?,
        m,
        n,
        k,
        x: ins[0].ptr,
        y: y.ptr,
        bias: bias.map_or(0, |b| b.ptr),
        x_codes: ins[0].dtype == DType::F8E4M3,
        gated,
        y_codes_scale: 0,
    })
}

/// The scratch regions of [`LowBitLinear::scratch`] (a gated call's fifth, its full output,
/// 0 when not planned).
fn scratch5(l: &dyn KernelLauncher) -> Result<[u64; 5], String> {
    let s = |i: usize| l.scratch(i).ok_or_else(|| format!("scratch region {i} was not planned"));
    Ok([s(0)?, s(1)?, s(2)?, s(3)?, l.scratch(4).unwrap_or(0)])
}

fn fp8_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let Fp8Attrs { dynamic, codes_out, gated, fp8_out, runs } = fp8_attrs(attrs)?;
        let (s_in_at, s_w_at, bias_at) = fp8_inputs(dynamic);
        let (ins, codes_scale) = split_codes_scale(ins, fp8_out)?;
        let dt = if fp8_out { codes_out.unwrap_or(ins[0].dtype) } else { outs[0].dtype };
        let y_codes_scale = codes_scale.map_or(0, |s| s.ptr);
        let c = LowBitLinear { y_codes_scale, ..cuda_call(ins, &outs[0], dt, bias_at, gated)? };
        let s = LowBitScales {
            input: s_in_at.map_or(0, |i| ins[i].ptr),
            dynamic,
            weight: ins[s_w_at].ptr,
            per_row: ins[s_w_at].shape.iter().product::<usize>() > 1,
            runs,
        };
        gpu_of(l)?.fp8_linear(&c, ins[1].ptr, s, scratch5(l)?).map_err(|e| e.0)
    })
}

fn nvfp4_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let c = cuda_call(ins, &outs[0], outs[0].dtype, 4, nvfp4_gated(attrs)?)?;
        let s =
            LowBitScales { input: 0, dynamic: false, weight: ins[3].ptr, per_row: false, runs: [0; MAX_SCALE_RUNS] };
        gpu_of(l)?.nvfp4_linear(&c, ins[1].ptr, ins[2].ptr, s, scratch5(l)?).map_err(|e| e.0)
    })
}

/// [`LowBitLinear::scratch`] for the largest shapes, in the output's dtype (over input codes,
/// `out`'s).
fn lowbit_scratch(ins: &[(DType, Vec<usize>)], attrs: &str) -> Vec<usize> {
    let (x_dt, xs) = &ins[0];
    let a = fp8_attrs(attrs).ok();
    let codes_out = if *x_dt == DType::F8E4M3 { a.and_then(|a| a.codes_out) } else { None };
    let dt = codes_out.unwrap_or(*x_dt);
    let (n, k) = (ins[1].1[0], ins[1].1[1]);
    let m: usize = xs[..xs.len().saturating_sub(1)].iter().product();
    // (Either op's `act`: FP8's attributes, or NVFP4's only one.)
    let gated = a.is_some_and(|a| a.gated.is_some()) || nvfp4_gated(attrs).is_ok_and(|g| g.is_some());
    LowBitLinear::scratch(dt.size_in_bytes(), m, n, k, gated)
}

/// The quantized linears as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    vec![
        CustomOp {
            // (dynamic=true has no input scale; bias; quant=fp8's codes scale.)
            extra_inputs: 3,
            cuda: Some(fp8_cuda()),
            cuda_scratch: Some(lowbit_scratch),
            origin: "built-in (fp8 plugin)",
            ..CustomOp::built_in(
                FP8_LINEAR,
                3,
                Outputs::Rule(Arc::new(fp8_rule)),
                |a| fp8_attrs(a).map(|_| ()),
                Arc::new(fp8_cpu),
            )
        },
        CustomOp {
            extra_inputs: 1,
            cuda: Some(nvfp4_cuda()),
            cuda_scratch: Some(lowbit_scratch),
            origin: "built-in (nvfp4 plugin)",
            ..CustomOp::built_in(
                NVFP4_LINEAR,
                4,
                Outputs::Rule(Arc::new(nvfp4_rule)),
                |a| nvfp4_gated(a).map(|_| ()),
                Arc::new(nvfp4_cpu),
            )
        },
    ]
}

/// Ops that can hand an FP8 linear its input as E4M3 codes (`quant=fp8`, the input scale their
/// last input: `fused_add_rmsnorm`, `torch_rmsnorm`, `torch_gated_act`) share these: the
/// attribute, the output's meta, and the codes of their plain output's values.
pub(crate) mod codes_out {
    use crate::dtype::DType;
    use crate::ir::TensorMeta;
    use crate::shape::Dim;
    use crate::tensor::Tensor;

    /// The `quant` attribute: absent, or `fp8`.
    pub(crate) fn read(a: &mut crate::op_text::Attrs) -> crate::error::Result<bool> {
        match a.take("quant") {
            None => Ok(false),
            Some("fp8") => Ok(true),
            Some(v) => Err(a.bad("quant", v, "fp8")),
        }
    }

    /// `, quant=fp8` or nothing, for an op's attribute text.
    pub(crate) fn text(fp8: bool) -> &'static str {
        if fp8 {
            ", quant=fp8"
        } else {
            ""
        }
    }

    /// The output's meta: `plain` (the op's output without `quant`), or with it f8e4m3 codes of
    /// the same shape, `scale` then being one f32.
    pub(crate) fn meta(fp8: bool, scale: Option<&TensorMeta>, plain: TensorMeta) -> Result<TensorMeta, String> {
        match (fp8, scale) {
            (false, None) => Ok(plain),
            (true, Some(s)) if s.dtype == DType::F32 && s.shape.iter().all(|d| *d == Dim::new(1)) => {
                Ok(TensorMeta { dtype: DType::F8E4M3, shape: plain.shape })
            }
            (true, Some(s)) => Err(format!("quant=fp8 input scale {s}: want one f32")),
            (true, None) => Err("quant=fp8 takes the input scale as its last input".into()),
            (false, Some(s)) => Err(format!("an input scale {s} without quant=fp8")),
        }
    }

    /// The codes of `values` rounded to `plain` (the dtype the op outputs without `quant`)
    /// divided by `scale`: saturating, ties to even, what `torch_quant_fp8_linear` makes of
    /// that output at that input scale.
    pub(crate) fn codes(mut values: Vec<f32>, plain: DType, scale: &Tensor, shape: &[usize]) -> Result<Tensor, String> {
        let s = scale.to_f32()[0];
        values.iter_mut().for_each(|e| *e = crate::cpu::round_as(plain, *e) / s);
        Tensor::from_f32_as(DType::F8E4M3, shape.to_vec(), values).map_err(|e| e.to_string())
    }
}
