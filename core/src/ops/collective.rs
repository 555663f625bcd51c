//! The collectives a sharded graph holds (the `detect_sharding` transform inserts them), each
//! defined once here and registered in the op table: `all_reduce(x)`, every rank's `x` summed
//! (in f32, in rank order, so every rank gets the same values; the result rounded once to x's
//! dtype), and `all_gather(x, dim=d, world=n)`, the ranks' `x` concatenated along `d` in rank
//! order. Their CPU kernels call the rank's communicator (`comm::current`); their CUDA
//! lowerings call NCCL on the step's stream, or, where the ranks' GPUs cannot use NCCL (ranks
//! sharing a GPU), stage the values through the host and run the CPU kernel (`comm::gpu`
//! decides, once, when the model is compiled).

use std::sync::Arc;

use autodeploy_kernels::cuda::exec::{count_launch, Gpu, Strided};
use autodeploy_kernels::cuda::nccl::Collectives;

use crate::cpu::KernelOptions;
use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::layout::dim_index;
use crate::ops::{cuda_dt, gpu_of, no_attrs, Op};
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

/// The host path: waits for the stream, runs the CPU kernel `cpu` on the input's values and
/// copies its output back to the device.
fn staged(gpu: &Gpu, x: &DeviceTensor, y: &DeviceTensor, attrs: &str, cpu: CpuFn) -> Result<(), String> {
    let mut bytes = vec![0u8; x.shape.iter().product::<usize>() * x.dtype.size_in_bytes()];
    gpu.download(x.ptr, &mut bytes).map_err(|e| e.0)?;
    let t = Tensor::from_le_bytes(x.dtype, x.shape.clone(), &bytes).map_err(|e| e.to_string())?;
    let out = cpu(&[&t], attrs, &[(y.dtype, y.shape.clone())], &KernelOptions::default())?;
    let b = out[0].to_le_bytes().map_err(|e| e.to_string())?;
    gpu.upload(y.ptr, &b).map_err(|e| e.0)?;
    // The host buffer goes when this returns.
    gpu.sync().map_err(|e| e.0)
}

type CpuFn = fn(&[&Tensor], &str, &[(DType, Vec<usize>)], &KernelOptions) -> Result<Vec<Tensor>, String>;

fn collectives(gpu: &Gpu) -> Result<&Collectives, String> {
    gpu.collectives().ok_or_else(|| "this GPU joined no group of ranks (the model was compiled unsharded)".to_string())
}

fn all_reduce_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let gpu = gpu_of(l)?;
        let (x, y) = (&ins[0], &outs[0]);
        match collectives(gpu)? {
            Collectives::Nccl(n) if !crate::mutation::is(crate::mutation::Mutation::ReduceOneRank) => {
                let count = x.shape.iter().product();
                n.all_reduce_sum(gpu, x.ptr, y.ptr, count, cuda_dt(x.dtype)?).map_err(|e| e.0)?;
                count_launch("nccl_all_reduce");
                Ok(())
            }
            Collectives::Nccl(_) => {
                let bytes = x.shape.iter().product::<usize>() * x.dtype.size_in_bytes();
                gpu.copy(y.ptr, x.ptr, bytes).map_err(|e| e.0)
            }
            Collectives::Host => staged(gpu, x, y, attrs, all_reduce_cpu),
        }
    })
}

fn all_gather_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let gpu = gpu_of(l)?;
        let (x, y) = (&ins[0], &outs[0]);
        let n = match collectives(gpu)? {
            Collectives::Nccl(n) => n,
            Collectives::Host => return staged(gpu, x, y, attrs, all_gather_cpu),
        };
        let a = parse_gather(attrs)?;
        let d = dim_index(a.dim, x.shape.len())?;
        let outer: usize = x.shape[..d].iter().product();
        let inner: usize = x.shape[d..].iter().product();
        let bytes = outer * inner * x.dtype.size_in_bytes();
        count_launch("nccl_all_gather");
        if outer == 1 {
            return n.all_gather_bytes(gpu, x.ptr, y.ptr, bytes).map_err(|e| e.0);
        }
        // NCCL lays the parts rank-major, [world, outer, inner]; the op wants [outer, world, inner].
        let parts = l.scratch(0).ok_or("all_gather needs its scratch region")?;
        n.all_gather_bytes(gpu, x.ptr, parts, bytes).map_err(|e| e.0)?;
        let dt = cuda_dt(x.dtype)?;
        let (o, i) = (outer as i64, inner as i64);
        let s = Strided::new(&[outer, a.world, inner], &[i, o * i, 1], &[0, 0, 0]).map_err(|e| e.0)?;
        gpu.copy_strided(parts, dt, y.ptr, dt, outer * a.world * inner, s, false).map_err(|e| e.0)
    })
}

/// `all_gather` over NCCL lays the parts out rank-major first: one output's bytes.
fn all_gather_scratch(ins: &[(DType, Vec<usize>)], attrs: &str) -> Vec<usize> {
    let world = parse_gather(attrs).map_or(1, |a| a.world);
    vec![ins[0].1.iter().product::<usize>() * ins[0].0.size_in_bytes() * world]
}

/// The collectives as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    vec![
        CustomOp {
            cuda: Some(all_reduce_cuda()),
            ..CustomOp::built_in(
                ALL_REDUCE,
                1,
                Outputs::Rule(Arc::new(all_reduce_rule)),
                no_attrs,
                Arc::new(all_reduce_cpu),
            )
        },
        CustomOp {
            cuda: Some(all_gather_cuda()),
            cuda_scratch: Some(all_gather_scratch),
            ..CustomOp::built_in(
                ALL_GATHER,
                1,
                Outputs::Rule(Arc::new(all_gather_rule)),
                |a| parse_gather(a).map(|_| ()),
                Arc::new(all_gather_cpu),
            )
        },
    ]
}
