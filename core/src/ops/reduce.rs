//! The reductions over dims, each defined once here and registered in the op table: `aten.mean.dim`
//! (`dim=[-1], keepdim=true`), `aten._softmax` and `aten.log_softmax.int` (`dim=-1`; computed in
//! f32, the result in the input dtype). Each has its attribute reader, shape rule, CPU kernel and,
//! where it has one, its CUDA lowering (the mean over the last dim). Graphs build them with
//! [`Op::mean`], [`Op::softmax`] and [`Op::log_softmax`]; matchers read them with
//! [`Op::mean_attrs`] and [`Op::softmax_dim`].

use std::sync::Arc;

use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::{cuda_dt, Op};
use crate::shape::Dim;
use crate::tensor::Tensor;

pub const MEAN: &str = "aten.mean.dim";
pub const SOFTMAX: &str = "aten._softmax";
pub const LOG_SOFTMAX: &str = "aten.log_softmax.int";

/// `aten.mean.dim`'s attributes.
#[derive(Clone, Debug, PartialEq)]
pub struct MeanAttrs {
    pub dims: Vec<i64>,
    pub keepdim: bool,
}

impl MeanAttrs {
    fn parse(text: &str) -> Result<MeanAttrs, String> {
        read_attrs(MEAN, text, |a| {
            Ok(MeanAttrs { dims: a.int_list("dim")?, keepdim: a.opt_bool("keepdim")?.unwrap_or(false) })
        })
    }
}

fn parse_dim(op: &str, text: &str) -> Result<i64, String> {
    read_attrs(op, text, |a| a.int("dim"))
}

impl Op {
    /// The mean over `dims`.
    pub fn mean(dims: Vec<i64>, keepdim: bool) -> Op {
        Op { name: MEAN, attrs: format!("dim={dims:?}, keepdim={keepdim}") }
    }

    pub fn softmax(dim: i64) -> Op {
        Op { name: SOFTMAX, attrs: format!("dim={dim}") }
    }

    pub fn log_softmax(dim: i64) -> Op {
        Op { name: LOG_SOFTMAX, attrs: format!("dim={dim}") }
    }

    /// The attributes of an `aten.mean.dim` node.
    pub fn mean_attrs(&self) -> Option<MeanAttrs> {
        match self {
            Op { name: MEAN, attrs, .. } => MeanAttrs::parse(attrs).ok(),
            _ => None,
        }
    }

    /// The dim of an `aten._softmax` node.
    pub fn softmax_dim(&self) -> Option<i64> {
        match self {
            Op { name: SOFTMAX, attrs, .. } => parse_dim(SOFTMAX, attrs).ok(),
            _ => None,
        }
    }
}

fn dim_index(d: i64, rank: usize) -> Result<usize, String> {
    let i = if d < 0 { d + rank as i64 } else { d };
    if i < 0 || i >= rank as i64 {
        return Err(format!("dim {d} out of range for rank {rank}"));
    }
    Ok(i as usize)
}

fn float_only(x: &TensorMeta) -> Result<(), String> {
    if !x.dtype.is_float() {
        return Err(format!("needs a float tensor, got {x}"));
    }
    Ok(())
}

fn mean_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let MeanAttrs { dims, keepdim } = MeanAttrs::parse(attrs)?;
    let x = &ins[0];
    float_only(x)?;
    let mut red = vec![false; x.shape.len()];
    for &d in &dims {
        red[dim_index(d, x.shape.len())?] = true;
    }
    let shape = x
        .shape
        .iter()
        .zip(&red)
        .filter_map(|(d, &r)| match (r, keepdim) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::new(1)),
            (true, false) => None,
        })
        .collect();
    Ok(vec![TensorMeta { dtype: x.dtype, shape }])
}

/// The mean of `x` over `dims` in f32, the result in x's dtype.
fn mean_cpu(x: &Tensor, dims: &[i64], out_shape: Vec<usize>) -> Result<Tensor, String> {
    let rank = x.rank();
    let mut red = vec![false; rank];
    for &d in dims {
        red[dim_index(d, rank)?] = true;
    }
    let v = x.to_f32();
    let count: usize = x.shape().iter().zip(&red).filter(|(_, &r)| r).map(|(s, _)| s).product();
    let out: Vec<f32> = if red.iter().enumerate().all(|(i, &r)| r == (i == rank - 1)) {
        // Reducing the last dim only: row by row.
        let inner = x.shape()[rank - 1];
        v.chunks(inner.max(1)).map(|row| row.iter().sum::<f32>() / inner as f32).collect()
    } else {
        let kept: Vec<usize> = x.shape().iter().zip(&red).map(|(&s, &r)| if r { 1 } else { s }).collect();
        let ks = crate::cpu::contiguous_strides(&kept);
        let xs = crate::cpu::contiguous_strides(x.shape());
        let mut acc = vec![0f32; kept.iter().product()];
        for (i, &val) in v.iter().enumerate() {
            let o: usize = (0..rank).filter(|&d| !red[d]).map(|d| (i / xs[d] % x.shape()[d]) * ks[d]).sum();
            acc[o] += val;
        }
        acc.iter().map(|a| a / count as f32).collect()
    };
    Tensor::from_f32_as(x.dtype(), out_shape, out).map_err(|e| e.to_string())
}

fn mean_op() -> CustomOp {
    let cuda: CudaImpl =
        Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], _: &str, l: &mut dyn KernelLauncher| {
            let (x, y) = (&ins[0], &outs[0]);
            let gpu = crate::ops::gpu_of(l)?;
            let last = *x.shape.last().unwrap_or(&1);
            gpu.mean_last(x.ptr, cuda_dt(x.dtype)?, y.ptr, cuda_dt(y.dtype)?, y.shape.iter().product(), last)
                .map_err(|e| e.0)
        });
    CustomOp {
        name: MEAN,
        version: env!("CARGO_PKG_VERSION"),
        inputs: 1,
        outputs: Outputs::Rule(Arc::new(mean_rule)),
        origin: "built-in",
        check_attrs: Some(|a| MeanAttrs::parse(a).map(|_| ())),
        cpu: Arc::new(|ins: &[&Tensor], attrs: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
            Ok(vec![mean_cpu(ins[0], &MeanAttrs::parse(attrs)?.dims, outs[0].1.clone())?])
        }),
        cuda: Some(cuda),
        extra_inputs: 0,
        sizes: None,
        view: None,
        linear_weights: false,
        cuda_scratch: None,
        cuda_attrs: Some(|a| match MeanAttrs::parse(a)?.dims.as_slice() {
            [-1] => Ok(()),
            _ => Err("mean has a CUDA kernel over the last dim (dim=[-1]) only".into()),
        }),
    }
}

fn softmax_op(name: &'static str, log: bool) -> CustomOp {
    CustomOp {
        name,
        version: env!("CARGO_PKG_VERSION"),
        inputs: 1,
        outputs: Outputs::Rule(Arc::new(move |ins: &[TensorMeta], attrs: &str| {
            let d = parse_dim(name, attrs)?;
            float_only(&ins[0])?;
            dim_index(d, ins[0].shape.len())?;
            Ok(vec![ins[0].clone()])
        })),
        origin: "built-in",
        check_attrs: Some(if log {
            |a| parse_dim(LOG_SOFTMAX, a).map(|_| ())
        } else {
            |a| parse_dim(SOFTMAX, a).map(|_| ())
        }),
        cpu: Arc::new(move |ins: &[&Tensor], attrs: &str, _: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
            let x = ins[0];
            let d = dim_index(parse_dim(name, attrs)?, x.rank())?;
            Ok(vec![crate::cpu::softmax(x, d, log).map_err(|e| e.to_string())?])
        }),
        cuda: None,
        extra_inputs: 0,
        sizes: None,
        view: None,
        linear_weights: false,
        cuda_scratch: None,
        cuda_attrs: None,
    }
}

/// The reductions as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    vec![mean_op(), softmax_op(SOFTMAX, false), softmax_op(LOG_SOFTMAX, true)]
}
