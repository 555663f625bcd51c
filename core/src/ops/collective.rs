//! The collectives a sharded graph holds (the `detect_sharding` transform inserts them), each
//! defined once here and registered in the op table: `all_reduce(x)`, every rank's `x` summed
//! (in f32, in rank order, so every rank gets the same values; the result rounded once to x's
//! dtype), and `all_gather(x, dim=d, world=n)`, the ranks' `x` concatenated along `d` in rank
//! order. Their CPU kernels call the rank's communicator (`comm::current`); a CUDA engine with
//! them is refused at build until the NCCL lowering exists.

use std::sync::Arc;

use crate::cpu::KernelOptions;
use crate::custom_op::{CustomOp, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::layout::dim_index;
use crate::ops::{no_attrs, Op};
use crate::shape::Dim;
use crate::tensor::Tensor;

pub const ALL_REDUCE: &str = "all_reduce";
pub const ALL_GATHER: &str = "all_gather";

/// `all_gather`'s attributes: the dim and the number of ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gather {
    pub dim: i64,
    pub world: usize,
}

fn parse_gather(text: &str) -> Result<Gather, String> {
    read_attrs(ALL_GATHER, text, |a| {
        let dim = a.int("dim")?;
        let w = a.int("world")?;
        if !(1..=4096).contains(&w) {
            return Err(a.bad("world", &w.to_string(), "a rank count from 1 to 4096"));
        }
        Ok(Gather { dim, world: w as usize })
    })
}

impl Op {
    pub fn all_reduce() -> Op {
        Op { name: ALL_REDUCE, attrs: String::new() }
    }
    pub fn all_gather(g: Gather) -> Op {
        Op { name: ALL_GATHER, attrs: format!("dim={}, world={}", g.dim, g.world) }
    }
    pub fn all_gather_of(&self) -> Option<Gather> {
        self.attrs_of(ALL_GATHER).and_then(|a| parse_gather(a).ok())
    }
}

fn float_input(x: &TensorMeta) -> Result<(), String> {
    if matches!(x.dtype, DType::F32 | DType::BF16 | DType::F16) {
        Ok(())
    } else {
        Err(format!("needs an f32, bf16 or f16 tensor, got {x}"))
    }
}

fn all_reduce_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    no_attrs(attrs)?;
    float_input(&ins[0])?;
    Ok(vec![ins[0].clone()])
}

fn all_gather_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let a = parse_gather(attrs)?;
    let x = &ins[0];
    float_input(x)?;
    let d = dim_index(a.dim, x.shape.len())?;
    let Some(n) = x.shape[d].as_static() else {
        return Err(format!("dim {} of {x} must be a fixed size", a.dim));
    };
    let mut shape = x.shape.clone();
    shape[d] = Dim::new(n * a.world);
    Ok(vec![TensorMeta { dtype: x.dtype, shape }])
}

fn all_reduce_cpu(
    ins: &[&Tensor],
    _: &str,
    _: &[(DType, Vec<usize>)],
    _: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let x = ins[0];
    let c = crate::comm::current()?;
    let f = x.cast(DType::F32).map_err(|e| e.to_string())?;
    let mut v = f.as_f32().ok_or("all_reduce: f32 values expected")?.to_vec();
    if !crate::mutation::is(crate::mutation::Mutation::ReduceOneRank) {
        c.all_reduce_sum(&mut v)?;
    }
    Tensor::from_f32_as(x.dtype(), x.shape().to_vec(), v).map_err(|e| e.to_string()).map(|t| vec![t])
}

fn all_gather_cpu(
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
    _: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let x = ins[0];
    let a = parse_gather(attrs)?;
    let c = crate::comm::current()?;
    if c.world() != a.world {
        return Err(format!("gathers over {} ranks, but this rank's group has {}", a.world, c.world()));
    }
    let d = dim_index(a.dim, x.shape().len())?;
    let bytes = x.to_le_bytes().map_err(|e| e.to_string())?;
    let all = c.all_gather(&bytes)?;
    // Rank r's part of outer row o is bytes o·inner .. (o + 1)·inner of its tensor.
    let outer: usize = x.shape()[..d].iter().product();
    let inner = bytes.len() / outer.max(1);
    let mut out = Vec::with_capacity(all.len());
    for o in 0..outer {
        for r in 0..a.world {
            let part = &all[r * bytes.len()..(r + 1) * bytes.len()];
            out.extend_from_slice(&part[o * inner..(o + 1) * inner]);
        }
    }
    let (dtype, shape) = outs[0].clone();
    Tensor::from_le_bytes(dtype, shape, &out).map_err(|e| e.to_string()).map(|t| vec![t])
}

/// The collectives as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    vec![
        CustomOp::built_in(ALL_REDUCE, 1, Outputs::Rule(Arc::new(all_reduce_rule)), no_attrs, Arc::new(all_reduce_cpu)),
        CustomOp::built_in(
            ALL_GATHER,
            1,
            Outputs::Rule(Arc::new(all_gather_rule)),
            |a| parse_gather(a).map(|_| ()),
            Arc::new(all_gather_cpu),
        ),
    ]
}
