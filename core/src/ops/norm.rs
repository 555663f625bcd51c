//! RMSNorm, defined once here and registered in the op table: the canonical `torch_rmsnorm(x,
//! weight)` the matcher makes (`weight * to(norm_dtype)(x·rsqrt(mean(x²) + eps))`, normalised
//! in f32; `eps=1e-5, norm_dtype=f32`) and `fused_add_rmsnorm(x, residual, weight) -> (normed,
//! sum)` that the `fuse_add_rmsnorm` transform makes from an add an RMSNorm reads (`sum = x +
//! residual`, one dtype and shape, then the norm of the sum; on CUDA one kernel). Either may
//! carry `quant=fp8` (the `fuse_fp8_input_quant` transform, where FP8 linears alone read the
//! norm, all at one static `input_scale`): one more input, that scale (one f32), and the
//! normalised output is the E4M3 codes (`f8e4m3`) of the rounded normalised value / scale, the
//! codes the linears would have made themselves. Graphs build them with [`Op::rmsnorm`] and
//! [`Op::add_rmsnorm`]; transforms read them with [`Op::norm_attrs`]. Beside them `aten.layer_norm(x, weight[, bias])` over the last dim
//! (`eps=1e-5`), torch's `nn.LayerNorm` as an export gives it: already one op, with its CPU and
//! CUDA kernels.

use std::sync::Arc;

use rayon::prelude::*;

use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::quant_linear::codes_out;
use crate::ops::{cuda_dt, Op};
use crate::tensor::Tensor;

pub const RMSNORM: &str = "torch_rmsnorm";
pub const ADD_RMSNORM: &str = "fused_add_rmsnorm";
pub const LAYER_NORM: &str = "aten.layer_norm";

/// The attributes of both ops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormAttrs {
    pub eps: f64,
    /// The dtype the normalised value is rounded to before the weight multiplies it.
    pub norm_dtype: DType,
    /// `quant=fp8`: the normalised output as E4M3 codes at the last input's scale.
    pub fp8_out: bool,
}

impl NormAttrs {
    fn parse(op: &str, text: &str) -> Result<NormAttrs, String> {
        read_attrs(op, text, |a| {
            let (eps, norm_dtype) = (a.f64("eps")?, a.dtype("norm_dtype")?);
            Ok(NormAttrs { eps, norm_dtype, fp8_out: codes_out::read(a)? })
        })
    }

    fn text(&self) -> String {
        format!("eps={:?}, norm_dtype={}{}", self.eps, self.norm_dtype, codes_out::text(self.fp8_out))
    }

    /// The plain norm's attributes (no quantized output).
    pub fn new(eps: f64, norm_dtype: DType) -> NormAttrs {
        NormAttrs { eps, norm_dtype, fp8_out: false }
    }
}

impl Op {
    pub fn rmsnorm(a: NormAttrs) -> Op {
        Op { name: RMSNORM, attrs: a.text() }
    }

    pub fn add_rmsnorm(a: NormAttrs) -> Op {
        Op { name: ADD_RMSNORM, attrs: a.text() }
    }

    /// The attributes of a `torch_rmsnorm` or `fused_add_rmsnorm` node named `name`.
    pub fn norm_attrs(&self, name: &str) -> Option<NormAttrs> {
        match self {
            Op { name: n, attrs, .. } if *n == name && (name == RMSNORM || name == ADD_RMSNORM) => {
                NormAttrs::parse(name, attrs).ok()
            }
            _ => None,
        }
    }
}

/// The dtype the normalised value is rounded to: the output's, or with `quant=fp8` the one the
/// plain norm would output (the codes are of that rounded value).
fn rounded_dtype(w: DType, a: &NormAttrs) -> DType {
    DType::promote(w, a.norm_dtype)
}

/// The normalised output's meta; `scale` the `quant=fp8` input (one f32).
fn rmsnorm_rule(
    x: &TensorMeta,
    w: &TensorMeta,
    scale: Option<&TensorMeta>,
    a: &NormAttrs,
) -> Result<TensorMeta, String> {
    if !x.dtype.is_float() {
        return Err(format!("needs a float tensor, got {x}"));
    }
    if w.shape.len() != 1 || x.shape.last() != Some(&w.shape[0]) {
        return Err(format!("weight {w} does not fit the last dim of {x}"));
    }
    codes_out::meta(a.fp8_out, scale, TensorMeta { dtype: rounded_dtype(w.dtype, a), shape: x.shape.clone() })
}

/// RMSNorm of each row of `x` on the CPU, in f32; the result as `out_dtype`: the same
/// arithmetic, in the same order, as the unfused RMSNorm the importers emit, so the matched op
/// gives identical results.
fn rmsnorm_cpu(x: &Tensor, w: &Tensor, a: &NormAttrs, out_dtype: DType) -> Result<Tensor, String> {
    let out = rmsnorm_values(x, w, a)?;
    Tensor::from_f32_as(out_dtype, x.shape().to_vec(), out).map_err(|e| e.to_string())
}

/// The norm's output; with `quant=fp8` (`scale` the last input) the E4M3 codes of the value the
/// plain norm outputs (rounded to its dtype) divided by the scale, saturating, ties to even:
/// the codes `torch_quant_fp8_linear` makes of its input.
fn rmsnorm_out(
    x: &Tensor,
    w: &Tensor,
    scale: Option<&Tensor>,
    a: &NormAttrs,
    out_dtype: DType,
) -> Result<Tensor, String> {
    match scale.filter(|_| a.fp8_out) {
        Some(s) => codes_out::codes(rmsnorm_values(x, w, a)?, rounded_dtype(w.dtype(), a), s, x.shape()),
        None => rmsnorm_cpu(x, w, a, out_dtype),
    }
}

/// The normalised rows in f32, before the output's rounding.
fn rmsnorm_values(x: &Tensor, w: &Tensor, a: &NormAttrs) -> Result<Vec<f32>, String> {
    use crate::cpu::{round_as, PAR_MIN};
    let n = *x.shape().last().ok_or("x has rank 0")?;
    let (eps, norm_dtype) = (a.eps as f32, a.norm_dtype);
    let (xv, wv) = (x.to_f32(), w.to_f32());
    let mut out = vec![0f32; xv.len()];
    let row = |(xr, o): (&[f32], &mut [f32])| {
        let var = xr.iter().map(|a| a * a).sum::<f32>() / n as f32;
        let r = 1.0 / (var + eps).sqrt();
        for ((oo, &a), &ww) in o.iter_mut().zip(xr).zip(wv.iter()) {
            *oo = ww * round_as(norm_dtype, a * r);
        }
    };
    if xv.len() >= PAR_MIN {
        xv.par_chunks(n).zip(out.par_chunks_mut(n)).for_each(row);
    } else {
        xv.chunks(n).zip(out.chunks_mut(n)).for_each(row);
    }
    Ok(out)
}

/// The CUDA side of both: one kernel (with a residual, it also writes x + residual to the
/// second output and normalises that sum; with `quant=fp8`, E4M3 codes out).
fn cuda(name: &'static str, fused: bool) -> CudaImpl {
    Arc::new(move |ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let a = NormAttrs::parse(name, attrs)?;
        let gpu = crate::ops::gpu_of(l)?;
        let (x, y) = (&ins[0], &outs[0]);
        let last = *x.shape.last().unwrap_or(&1);
        let rows = y.shape.iter().product::<usize>() / last.max(1);
        let (residual, w) = if fused { (Some((ins[1].ptr, outs[1].ptr)), &ins[2]) } else { (None, &ins[1]) };
        // With `quant=fp8`: the codes of the value rounded to the plain norm's output dtype.
        let (out, codes_scale) = match ins.get(2 + fused as usize).filter(|_| a.fp8_out) {
            Some(s) => ((y.ptr, cuda_dt(rounded_dtype(w.dtype, &a))?), Some(s.ptr)),
            None => ((y.ptr, cuda_dt(y.dtype)?), None),
        };
        gpu.rmsnorm(
            (x.ptr, cuda_dt(x.dtype)?),
            residual,
            (w.ptr, cuda_dt(w.dtype)?),
            out,
            codes_scale,
            cuda_dt(a.norm_dtype)?,
            rows,
            last,
            a.eps as f32,
        )
        .map_err(|e| e.0)
    })
}

fn rmsnorm_op() -> CustomOp {
    CustomOp {
        name: RMSNORM,
        version: env!("CARGO_PKG_VERSION"),
        inputs: 2,
        outputs: Outputs::Rule(Arc::new(|ins: &[TensorMeta], attrs: &str| {
            Ok(vec![rmsnorm_rule(&ins[0], &ins[1], ins.get(2), &NormAttrs::parse(RMSNORM, attrs)?)?])
        })),
        origin: "built-in",
        check_attrs: Some(|t| NormAttrs::parse(RMSNORM, t).map(|_| ())),
        cpu: Arc::new(|ins: &[&Tensor], attrs: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
            let a = NormAttrs::parse(RMSNORM, attrs)?;
            Ok(vec![rmsnorm_out(ins[0], ins[1], ins.get(2).copied(), &a, outs[0].0)?])
        }),
        cuda: Some(cuda(RMSNORM, false)),
        // `quant=fp8`'s input scale.
        extra_inputs: 1,
        sizes: None,
        view: None,
        linear_weights: false,
        cuda_scratch: None,
        cuda_attrs: None,
    }
}

fn add_rmsnorm_op() -> CustomOp {
    CustomOp {
        name: ADD_RMSNORM,
        version: env!("CARGO_PKG_VERSION"),
        inputs: 3,
        outputs: Outputs::Rule(Arc::new(|ins: &[TensorMeta], attrs: &str| {
            let a = NormAttrs::parse(ADD_RMSNORM, attrs)?;
            let (x, r) = (&ins[0], &ins[1]);
            if r != x {
                return Err(format!("x {x} and residual {r} must have one dtype and shape"));
            }
            Ok(vec![rmsnorm_rule(x, &ins[2], ins.get(3), &a)?, x.clone()])
        })),
        origin: "built-in",
        check_attrs: Some(|t| NormAttrs::parse(ADD_RMSNORM, t).map(|_| ())),
        // The unfused graph's numbers: the sum rounded to its dtype, then normalised.
        cpu: Arc::new(|ins: &[&Tensor], attrs: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
            let a = NormAttrs::parse(ADD_RMSNORM, attrs)?;
            let sum = crate::ops::binary::add(ins[0], ins[1]).map_err(|e| e.to_string())?;
            let normed = rmsnorm_out(&sum, ins[2], ins.get(3).copied(), &a, outs[0].0)?;
            Ok(vec![normed, sum])
        }),
        cuda: Some(cuda(ADD_RMSNORM, true)),
        // `quant=fp8`'s input scale.
        extra_inputs: 1,
        sizes: None,
        view: None,
        linear_weights: false,
        cuda_scratch: None,
        cuda_attrs: None,
    }
}

/// `aten.layer_norm`'s `eps=…`.
fn layer_norm_eps(text: &str) -> Result<f64, String> {
    read_attrs(LAYER_NORM, text, |a| {
        let eps = a.f64("eps")?;
        if eps > 0.0 && eps < 1.0 {
            Ok(eps)
        } else {
            Err(a.bad("eps", &eps.to_string(), "in (0, 1)"))
        }
    })
}

impl Op {
    /// LayerNorm over the last dim (`x, weight[, bias]`).
    pub fn layer_norm(eps: f64) -> Op {
        Op { name: LAYER_NORM, attrs: format!("eps={eps:?}") }
    }
}

/// LayerNorm of each row in f32 (mean, biased variance), the affine part included, rounded once
/// to `out_dtype`, as torch's kernel.
fn layer_norm_cpu(ins: &[&Tensor], eps: f32, out_dtype: DType) -> Result<Tensor, String> {
    let x = ins[0];
    let n = *x.shape().last().ok_or("x has rank 0")?;
    let (xv, wv) = (x.to_f32(), ins[1].to_f32());
    let bv = ins.get(2).map(|b| b.to_f32());
    let mut out = vec![0f32; xv.len()];
    let row = |(xr, o): (&[f32], &mut [f32])| {
        let mean = xr.iter().sum::<f32>() / n as f32;
        let var = xr.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / n as f32;
        let r = 1.0 / (var + eps).sqrt();
        for (j, (oo, &a)) in o.iter_mut().zip(xr).enumerate() {
            *oo = (a - mean) * r * wv[j] + bv.as_ref().map_or(0.0, |b| b[j]);
        }
    };
    if xv.len() >= crate::cpu::PAR_MIN {
        xv.par_chunks(n).zip(out.par_chunks_mut(n)).for_each(row);
    } else {
        xv.chunks(n).zip(out.chunks_mut(n)).for_each(row);
    }
    Tensor::from_f32_as(out_dtype, x.shape().to_vec(), out).map_err(|e| e.to_string())
}

fn layer_norm_op() -> CustomOp {
    let rule = |ins: &[TensorMeta], attrs: &str| {
        layer_norm_eps(attrs)?;
        let (x, w) = (&ins[0], &ins[1]);
        let fits = |p: &TensorMeta| p.shape.len() == 1 && x.shape.last() == Some(&p.shape[0]) && p.dtype.is_float();
        if !x.dtype.is_float() || !fits(w) || ins.get(2).is_some_and(|b| !fits(b)) {
            let all: Vec<String> = ins.iter().map(|m| m.to_string()).collect();
            return Err(format!(
                "x, weight[, bias] {} do not fit: want one float per channel of x's last dim",
                all.join(", ")
            ));
        }
        Ok(vec![x.clone()])
    };
    let cuda: CudaImpl =
        Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
            let eps = layer_norm_eps(attrs)? as f32;
            let gpu = crate::ops::gpu_of(l)?;
            let (x, w, y) = (&ins[0], &ins[1], &outs[0]);
            let n = *x.shape.last().unwrap_or(&1);
            let rows = y.shape.iter().product::<usize>() / n.max(1);
            let b = match ins.get(2) {
                Some(b) => Some((b.ptr, cuda_dt(b.dtype)?)),
                None => None,
            };
            gpu.layer_norm(
                (x.ptr, cuda_dt(x.dtype)?),
                (w.ptr, cuda_dt(w.dtype)?),
                b,
                (y.ptr, cuda_dt(y.dtype)?),
                rows,
                n,
                eps,
            )
            .map_err(|e| e.0)
        });
    CustomOp {
        extra_inputs: 1,
        cuda: Some(cuda),
        ..CustomOp::built_in(
            LAYER_NORM,
            2,
            Outputs::Rule(Arc::new(rule)),
            |t| layer_norm_eps(t).map(|_| ()),
            Arc::new(|ins: &[&Tensor], attrs: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
                Ok(vec![layer_norm_cpu(ins, layer_norm_eps(attrs)? as f32, outs[0].0)?])
            }),
        )
    }
}

/// The norms as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    vec![rmsnorm_op(), add_rmsnorm_op(), layer_norm_op()]
}
