//! The elementwise ops of two operands, each defined once here and registered in the op table
//! (`registry::custom_op`) like a plugin's op: `aten.add.Tensor`, `aten.sub.Tensor`,
//! `aten.mul.Tensor` and `aten.div.Tensor` (two tensors, broadcast, the dtype promoted), and
//! `aten.add.Scalar`, `aten.mul.Scalar`, `aten.div.Scalar` and `aten.pow.Tensor_Scalar` (a tensor and a number,
//! the number as the attribute text: `aten.add.Scalar(%x, 1e-5)`). Each has its shape rule, its
//! CPU kernel and its CUDA lowering; graphs build them with [`Op::binary`] and
//! [`Op::scalar`], and matchers read them with [`Op::is`] and [`Op::scalar_of`].

use std::sync::Arc;

use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::ops::{broadcast_shapes, cuda_dt, no_attrs, Op};
use crate::tensor::Tensor;
use autodeploy_kernels::cuda::exec::{Binary, Strided, Unary};

pub const ADD: &str = "aten.add.Tensor";
pub const SUB: &str = "aten.sub.Tensor";
pub const MUL: &str = "aten.mul.Tensor";
pub const DIV: &str = "aten.div.Tensor";
pub const ADD_SCALAR: &str = "aten.add.Scalar";
pub const MUL_SCALAR: &str = "aten.mul.Scalar";
pub const DIV_SCALAR: &str = "aten.div.Scalar";
pub const POW_SCALAR: &str = "aten.pow.Tensor_Scalar";

/// One op of two tensors.
struct TensorDef {
    name: &'static str,
    f: fn(f32, f32) -> f32,
    cuda: Binary,
}

const TENSOR_OPS: [TensorDef; 4] = [
    TensorDef { name: ADD, f: |a, b| a + b, cuda: Binary::Add },
    TensorDef { name: SUB, f: |a, b| a - b, cuda: Binary::Sub },
    TensorDef { name: MUL, f: |a, b| a * b, cuda: Binary::Mul },
    TensorDef { name: DIV, f: |a, b| a / b, cuda: Binary::Div },
];

/// One op of a tensor and a number.
struct ScalarDef {
    name: &'static str,
    f: fn(f32, f32) -> f32,
    /// Exact on i64 tensors (positions and masks); `None`: computed in f32.
    int: Option<fn(i64, i64) -> i64>,
    cuda: Unary,
}

const SCALAR_OPS: [ScalarDef; 4] = [
    ScalarDef { name: ADD_SCALAR, f: |a, s| a + s, int: Some(|a, s| a + s), cuda: Unary::AddScalar },
    ScalarDef { name: MUL_SCALAR, f: |a, s| a * s, int: Some(|a, s| a * s), cuda: Unary::MulScalar },
    // Division rounds differently from a multiplication by the reciprocal: kept as its own op.
    ScalarDef { name: DIV_SCALAR, f: |a, s| a / s, int: None, cuda: Unary::DivScalar },
    ScalarDef {
        name: POW_SCALAR,
        f: |a, p| if p == 2.0 { a * a } else { a.powf(p) },
        int: None,
        cuda: Unary::PowScalar,
    },
];

impl Op {
    /// `a <op> b`, one of [`ADD`], [`SUB`], [`MUL`], [`DIV`].
    pub fn binary(name: &'static str) -> Op {
        debug_assert!(TENSOR_OPS.iter().any(|d| d.name == name), "{name} is not a binary op");
        Op { name, attrs: String::new() }
    }

    /// `x <op> s`, one of [`ADD_SCALAR`], [`MUL_SCALAR`], [`DIV_SCALAR`], [`POW_SCALAR`].
    pub fn scalar(name: &'static str, s: f64) -> Op {
        debug_assert!(SCALAR_OPS.iter().any(|d| d.name == name), "{name} is not a scalar op");
        Op { name, attrs: format!("{s:?}") }
    }

    /// Whether this is the op-table op `name`.
    pub fn is(&self, name: &str) -> bool {
        matches!(self, Op { name: n, .. } if *n == name)
    }

    /// The number of scalar op `name` (`aten.add.Scalar` and the like), if this is one.
    pub fn scalar_of(&self, name: &str) -> Option<f64> {
        match self {
            Op { name: n, attrs, .. } if *n == name => parse_scalar(attrs).ok(),
            _ => None,
        }
    }
}

fn parse_scalar(attrs: &str) -> Result<f64, String> {
    let t = attrs.trim();
    t.parse::<f64>().map_err(|_| format!("`{t}`: expected one number"))
}

/// The CPU kernel of the tensor ops: `f` over `a` and `b` broadcast to `shape`, in f32, the
/// result as `dtype`.
pub(crate) fn eval_tensor(
    a: &Tensor,
    b: &Tensor,
    dtype: DType,
    shape: &[usize],
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Result<Tensor, String> {
    use crate::cpu::{broadcast_strides, PAR_MIN};
    use rayon::prelude::*;
    if dtype == DType::I64 {
        return Err("integer arithmetic is not supported on the CPU backend".into());
    }
    let (av, bv) = (a.to_f32(), b.to_f32());
    let n: usize = shape.iter().product();
    let out: Vec<f32> = if a.shape() == b.shape() {
        av.iter().zip(bv.iter()).map(|(&x, &y)| f(x, y)).collect()
    } else {
        let (sa, sb) = (broadcast_strides(a.shape(), shape), broadcast_strides(b.shape(), shape));
        let rank = shape.len();
        let inner = *shape.last().unwrap_or(&1);
        let mut out = vec![0f32; n];
        let row = |r: usize, o: &mut [f32]| {
            let (mut oa, mut ob, mut rem) = (0, 0, r);
            for d in (0..rank.saturating_sub(1)).rev() {
                let i = rem % shape[d];
                rem /= shape[d];
                oa += i * sa[d];
                ob += i * sb[d];
            }
            let (ia, ib) = (sa.last().copied().unwrap_or(0), sb.last().copied().unwrap_or(0));
            for (j, oo) in o.iter_mut().enumerate() {
                *oo = f(av[oa + j * ia], bv[ob + j * ib]);
            }
        };
        if inner > 0 {
            if n >= PAR_MIN {
                out.par_chunks_mut(inner).enumerate().for_each(|(r, o)| row(r, o));
            } else {
                out.chunks_mut(inner).enumerate().for_each(|(r, o)| row(r, o));
            }
        }
        out
    };
    Tensor::from_f32_as(dtype, shape.to_vec(), out).map_err(|e| e.to_string())
}

/// `a + b` on the CPU (same shape or broadcast), as the graph's `aten.add.Tensor` computes it.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> crate::Result<Tensor> {
    let metas = [a, b].map(|t| TensorMeta { dtype: t.dtype(), shape: crate::shape::static_shape(t.shape()) });
    let out = tensor_rule(ADD, &metas).map_err(|e| crate::Error::op(ADD, e))?.remove(0);
    let shape: Vec<usize> = out.shape.iter().map(|d| d.as_static().unwrap_or(0)).collect();
    eval_tensor(a, b, out.dtype, &shape, |x, y| x + y).map_err(|e| crate::Error::op(ADD, e))
}

fn tensor_rule(name: &str, ins: &[TensorMeta]) -> Result<Vec<TensorMeta>, String> {
    let (a, b) = (&ins[0], &ins[1]);
    let shape = broadcast_shapes(&a.shape, &b.shape)?;
    let mut dtype = DType::promote(a.dtype, b.dtype);
    if name == DIV && !dtype.is_float() {
        dtype = DType::F32;
    }
    Ok(vec![TensorMeta { dtype, shape }])
}

fn check_scalar(attrs: &str) -> Result<(), String> {
    parse_scalar(attrs).map(|_| ())
}

fn tensor_op(d: &TensorDef) -> CustomOp {
    let (name, f, op) = (d.name, d.f, d.cuda);
    let cuda: CudaImpl =
        Arc::new(move |ins: &[DeviceTensor], outs: &[DeviceTensor], _: &str, l: &mut dyn KernelLauncher| {
            let (a, b, y) = (&ins[0], &ins[1], &outs[0]);
            let s = Strided::broadcast(&y.shape, &a.shape, &b.shape).map_err(|e| e.0)?;
            let n = y.shape.iter().product();
            let dts = (cuda_dt(a.dtype)?, cuda_dt(b.dtype)?, cuda_dt(y.dtype)?);
            crate::ops::gpu_of(l)?.binary(op, (a.ptr, dts.0), (b.ptr, dts.1), (y.ptr, dts.2), n, s).map_err(|e| e.0)
        });
    CustomOp {
        name,
        version: env!("CARGO_PKG_VERSION"),
        inputs: 2,
        outputs: Outputs::Rule(Arc::new(move |ins: &[TensorMeta], attrs: &str| {
            no_attrs(attrs)?;
            tensor_rule(name, ins)
        })),
        origin: "built-in",
        check_attrs: Some(no_attrs),
        cpu: Arc::new(move |ins: &[&Tensor], _: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
            Ok(vec![eval_tensor(ins[0], ins[1], outs[0].0, &outs[0].1, f)?])
        }),
        cuda: Some(cuda),
        extra_inputs: 0,
        sizes: None,
        view: None,
        linear_weights: false,
        cuda_scratch: None,
        cuda_attrs: None,
    }
}

fn scalar_op(d: &ScalarDef) -> CustomOp {
    let (name, f, int, op) = (d.name, d.f, d.int, d.cuda);
    let cuda: CudaImpl =
        Arc::new(move |ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
            let (x, y) = (&ins[0], &outs[0]);
            let s = parse_scalar(attrs)?;
            crate::ops::gpu_of(l)?
                .unary(op, x.ptr, y.ptr, cuda_dt(y.dtype)?, y.shape.iter().product(), s)
                .map_err(|e| e.0)
        });
    CustomOp {
        name,
        version: env!("CARGO_PKG_VERSION"),
        inputs: 1,
        outputs: Outputs::Rule(Arc::new(|ins: &[TensorMeta], attrs: &str| {
            check_scalar(attrs)?;
            Ok(vec![ins[0].clone()])
        })),
        origin: "built-in",
        check_attrs: Some(check_scalar),
        cpu: Arc::new(move |ins: &[&Tensor], attrs: &str, _: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
            let (x, s) = (ins[0], parse_scalar(attrs)?);
            let y = match (x.as_i64(), int) {
                (Some(v), Some(g)) => Tensor::from_i64(x.shape().to_vec(), v.iter().map(|&a| g(a, s as i64)).collect()),
                _ => crate::cpu::map_f32(x, move |a| f(a, s as f32)),
            };
            Ok(vec![y.map_err(|e| e.to_string())?])
        }),
        cuda: Some(cuda),
        extra_inputs: 0,
        sizes: None,
        view: None,
        linear_weights: false,
        cuda_scratch: None,
        cuda_attrs: None,
    }
}

/// The binary and scalar ops as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    TENSOR_OPS.iter().map(tensor_op).chain(SCALAR_OPS.iter().map(scalar_op)).collect()
}
