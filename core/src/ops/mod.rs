//! The op set and its shape/dtype rules.
//!
//! Ops are ATen-level, named as `torch.export` names them, so an imported graph reads like an
//! exported one. The same inference runs on symbolic shapes at build time and on concrete shapes
//! at run time (a concrete shape is a symbolic one without symbols).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ir::TensorMeta;
use crate::shape::{fmt_shape, Dim, Shape};

pub mod attention;
pub mod binary;
pub mod collective;
pub mod gated_act;
pub mod gather;
pub mod layout;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod quant_linear;
pub mod reduce;
pub mod rope;
pub mod unary;

/// A graph node's op: an entry of the op table (`registry::custom_op`: the built-in ops of this
/// module's files and the ones plugin libraries register) by name, with its attribute text as
/// the entry reads and prints it. Graphs build ops with the typed constructors (`Op::linear()`,
/// `Op::view(..)`, `Op::rmsnorm(..)`, ...) and transforms read them with `Op::is` and the typed
/// readers (`Op::view_sizes`, `Op::norm_attrs`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub name: &'static str,
    pub attrs: String,
}

impl Op {
    /// A one-input op of the op table without attributes: the unary ops (`aten.neg`,
    /// `aten.rsqrt`, `aten.silu`, `aten.cos`, `aten.sin`; `unary.rs`).
    pub fn unary(name: &'static str) -> Op {
        Op { name, attrs: String::new() }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Non-tensor arguments, as printed after the tensor arguments in a dump.
    pub fn attrs(&self) -> String {
        self.attrs.clone()
    }
}

/// The attribute check of an op that takes none.
pub(crate) fn no_attrs(attrs: &str) -> std::result::Result<(), String> {
    match attrs.trim() {
        "" => Ok(()),
        other => Err(format!("unexpected argument `{other}`")),
    }
}

/// The host's GPU, for a built-in op's CUDA lowering.
pub(crate) fn gpu_of(
    l: &dyn crate::custom_op::KernelLauncher,
) -> std::result::Result<&autodeploy_kernels::cuda::exec::Gpu, String> {
    l.gpu().ok_or_else(|| "needs the host's GPU".to_string())
}

/// The CUDA kernels' dtype code for `d`.
pub fn cuda_dt(d: DType) -> std::result::Result<autodeploy_kernels::cuda::exec::Dt, String> {
    use autodeploy_kernels::cuda::exec::Dt;
    Ok(match d {
        DType::F32 => Dt::F32,
        DType::BF16 => Dt::BF16,
        DType::F16 => Dt::F16,
        DType::I64 => Dt::I64,
        DType::Bool => Dt::Bool,
        DType::Block(t) => {
            return Err(format!(
            "{} block-quantized weights have no CUDA kernels yet; set dtype = \"bfloat16\" to dequantize them at load",
            t.dtype_name()
        ))
        }
        DType::F8E4M3 | DType::F4E2M1 => return Err(format!("{d} weights have no CUDA kernels yet")),
    })
}

fn err(op: &Op, msg: impl Into<String>) -> Error {
    Error::Shape { op: op.name().into(), node: String::new(), msg: msg.into() }
}

/// Resolves a possibly negative dim index against a rank.
pub fn norm_dim(op: &Op, d: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let i = if d < 0 { d + r } else { d };
    if i < 0 || i >= r {
        return Err(err(op, format!("dim {d} out of range for rank {rank}")));
    }
    Ok(i as usize)
}

/// Broadcasts two shapes numpy-style.
pub fn broadcast(op: &Op, a: &[Dim], b: &[Dim]) -> Result<Shape> {
    broadcast_shapes(a, b).map_err(|e| err(op, e))
}

/// [`broadcast`], the error as text.
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> std::result::Result<Shape, String> {
    let n = a.len().max(b.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.len() >= n { Some(&a[i + a.len() - n]) } else { None };
        let db = if i + b.len() >= n { Some(&b[i + b.len() - n]) } else { None };
        let d = match (da, db) {
            (Some(x), Some(y)) if x == y => x.clone(),
            (Some(x), Some(y)) if y.is_one() => x.clone(),
            (Some(x), Some(y)) if x.is_one() => y.clone(),
            (Some(x), None) => x.clone(),
            (None, Some(y)) => y.clone(),
            _ => return Err(format!("shapes {} and {} do not broadcast", fmt_shape(a), fmt_shape(b))),
        };
        out.push(d);
    }
    Ok(out)
}

/// Output metadata of `op` applied to inputs with metadata `ins`.
pub fn infer(op: &Op, ins: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
    crate::custom_op::infer(op.name, &op.attrs, ins).map_err(|e| err(op, e))
}

pub use layout::{slice_bounds, slice_len, view_shape};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::binary::{ADD, MUL};
    use crate::shape::{static_shape, SizeArg};

    fn m(dtype: DType, shape: Shape) -> TensorMeta {
        TensorMeta { dtype, shape }
    }

    #[test]
    fn linear_and_view_on_symbolic_shapes() {
        let b = Dim::sym("batch");
        let s = Dim::sym("seq");
        let x = m(DType::F32, vec![b.clone(), s.clone(), Dim::new(64)]);
        let w = m(DType::F32, static_shape(&[128, 64]));
        let y = infer(&Op::linear(), &[x.clone(), w]).unwrap().remove(0);
        assert_eq!(y.to_string(), "f32[batch, seq, 128]");
        let v = Op::view(vec![SizeArg::Dim(b), SizeArg::Dim(s), SizeArg::Infer, SizeArg::Dim(Dim::new(32))]);
        assert_eq!(infer(&v, &[y]).unwrap()[0].to_string(), "f32[batch, seq, 4, 32]");
        let bad = m(DType::F32, static_shape(&[100, 32]));
        let e = infer(&Op::linear(), &[x, bad]).unwrap_err().to_string();
        assert!(e.contains("aten.linear") && e.contains("[100, 32]"), "{e}");
    }

    #[test]
    fn broadcasting_and_promotion() {
        let a = m(DType::BF16, static_shape(&[2, 1, 4]));
        let b = m(DType::F32, static_shape(&[3, 1]));
        let y = infer(&Op::binary(MUL), &[a, b]).unwrap().remove(0);
        assert_eq!(y.to_string(), "f32[2, 3, 4]");
        let c = m(DType::F32, static_shape(&[5]));
        assert!(infer(&Op::binary(ADD), &[y, c]).is_err());
    }

    #[test]
    fn slices_clamp_like_python() {
        assert_eq!(slice_len(0, 8, 1, 16), Some(8));
        assert_eq!(slice_len(8, i64::MAX, 1, 16), Some(8));
        assert_eq!(slice_len(-4, i64::MAX, 1, 16), Some(4));
        assert_eq!(slice_len(0, 16, 3, 16), Some(6));
        assert_eq!(slice_len(0, 4, 0, 16), None);
    }
}
