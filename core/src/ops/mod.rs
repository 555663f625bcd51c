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
pub mod gather;
pub mod layout;
pub mod norm;
pub mod reduce;
pub mod rope;
pub mod unary;

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `aten.linear(x, weight[, bias])`, weight `[out, in]`
    Linear,

    // Canonical ops the pattern matchers produce (`<backend>_<category>_<op>` names).
    /// `torch_swiglu_mlp(x, w_gate, w_up, w_down)`: `down(silu(gate(x)) · up(x))`; with `fused`,
    /// the inputs are `(x, w_gate_up, w_down)`, gate rows first.
    SwiGluMlp {
        fused: bool,
        /// For one row (decode), silu(gate)·up is the gate/up GEMV's epilogue on CUDA (the
        /// `fuse_swiglu_epilogue` transform sets it); the same math on the CPU.
        epilogue: bool,
    },
    /// `<backend>_attention_with_kv_cache(q, k, v)` for layer `layer`: writes k/v of this step's
    /// tokens into the paged cache, then attends each token to its sequence's cached prefix.
    /// Tokens of all sequences are flattened into `seq` (batch 1); the step's batch metadata
    /// says which token belongs to which sequence.
    CachedAttention {
        backend: String,
        layer: usize,
        scale: f64,
        /// `(q, k, v, cos, sin)`: q and k arrive unrotated and the op applies RoPE
        /// (rotate-half, as `torch_rope_with_explicit_cos_sin`) before writing k and attending;
        /// the `fuse_rope_attention` transform makes it, so the CUDA executor rotates, writes
        /// the cache and attends in one kernel.
        rope: bool,
    },
    /// An op a plugin registered (`custom_op`): `inputs` tensors in, the outputs its shape rule
    /// gives; `attrs` is the plugin's own attribute text.
    Custom { name: &'static str, attrs: String },
}

impl Op {
    /// A one-input op of the op table (`registry::custom_op`) without attributes: the unary
    /// ops (`aten.neg`, `aten.rsqrt`, `aten.silu`, `aten.cos`, `aten.sin`; `unary.rs`).
    pub fn unary(name: &'static str) -> Op {
        Op::Custom { name, attrs: String::new() }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Linear => "aten.linear",
            Op::SwiGluMlp { .. } => "torch_swiglu_mlp",
            Op::CachedAttention { .. } => "attention_with_kv_cache",
            Op::Custom { name, .. } => name,
        }
    }

    /// Non-tensor arguments, as printed after the tensor arguments in a dump.
    pub fn attrs(&self) -> String {
        match self {
            Op::SwiGluMlp { fused, epilogue } => {
                format!("fused={fused}{}", if *epilogue { ", epilogue=true" } else { "" })
            }
            Op::CachedAttention { backend, layer, scale, rope } => {
                let r = if *rope { ", rope=true" } else { "" };
                format!("backend={backend}, layer={layer}, scale={scale:?}{r}")
            }
            Op::Custom { attrs, .. } => attrs.clone(),
            _ => String::new(),
        }
    }

    /// How many tensor inputs the op takes: (min, max).
    fn arity(&self) -> (usize, usize) {
        match self {
            Op::Linear => (2, 3),
            Op::CachedAttention { rope: false, .. } => (3, 3),
            Op::CachedAttention { rope: true, .. } => (5, 5),
            // The op table checks its ops' arity.
            Op::Custom { .. } => (0, usize::MAX),
            Op::SwiGluMlp { fused: true, .. } => (3, 3),
            Op::SwiGluMlp { fused: false, .. } => (4, 4),
        }
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

fn float_only(op: &Op, m: &TensorMeta) -> Result<()> {
    if !m.dtype.is_float() {
        return Err(err(op, format!("needs a float tensor, got {m}")));
    }
    Ok(())
}

/// Output metadata of `op` applied to inputs with metadata `ins`.
pub fn infer(op: &Op, ins: &[TensorMeta]) -> Result<Vec<TensorMeta>> {
    let (lo, hi) = op.arity();
    if ins.len() < lo || ins.len() > hi {
        return Err(err(op, format!("takes {lo}..={hi} tensor inputs, got {}", ins.len())));
    }
    let x = &ins[0];
    let same = |shape: Shape| Ok(vec![TensorMeta { dtype: x.dtype, shape }]);
    match op {
        Op::Custom { name, attrs, .. } => crate::custom_op::infer(name, attrs, ins).map_err(|e| err(op, e)),
        Op::Linear => {
            let w = &ins[1];
            float_only(op, x)?;
            if w.shape.len() != 2 || x.shape.is_empty() {
                return Err(err(op, format!("input {x} vs weight {w}: weight must be [out, in]")));
            }
            // A block-quantized weight serves any float input.
            if x.shape.last() != Some(&w.shape[1]) || (x.dtype != w.dtype && !w.dtype.is_block()) {
                return Err(err(op, format!("input {x} vs weight {w}")));
            }
            if let Some(b) = ins.get(2) {
                if b.shape.len() != 1 || b.shape[0] != w.shape[0] || (b.dtype != w.dtype && b.dtype != x.dtype) {
                    return Err(err(op, format!("bias {b} vs weight {w}")));
                }
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().unwrap() = w.shape[0].clone();
            same(shape)
        }
        Op::CachedAttention { rope, .. } => {
            if *rope {
                // cos/sin must rotate q and k as the unfused RoPE nodes would.
                for (j, what) in [(0, "q"), (1, "k")] {
                    let r = infer(&Op::rope(false), &[ins[j].clone(), ins[3].clone(), ins[4].clone()])
                        .map_err(|e| err(op, format!("RoPE of {what}: {e}")))?;
                    if r[0] != ins[j] {
                        return Err(err(op, format!("RoPE of {what} would give {} from {}", r[0], ins[j])));
                    }
                }
            }
            let out = attention::attention_rule(&ins[..3], true).map_err(|e| err(op, e))?;
            if !x.shape[0].is_one() {
                return Err(err(op, format!("expects the flattened batch [1, heads, tokens, dim], got {x}")));
            }
            Ok(out)
        }
        Op::SwiGluMlp { fused, .. } => {
            let w_down = ins.last().expect("arity checked");
            let (inter, ok) = if *fused {
                let w = &ins[1];
                let i = w.shape.first().and_then(Dim::as_static).map(|n| n / 2).unwrap_or(0);
                (
                    Dim::new(i),
                    w.shape.len() == 2 && w.shape[0] == Dim::new(2 * i) && x.shape.last() == Some(&w.shape[1]),
                )
            } else {
                let (g, u) = (&ins[1], &ins[2]);
                (g.shape[0].clone(), g.shape.len() == 2 && g == u && x.shape.last() == Some(&g.shape[1]))
            };
            if !ok
                || w_down.shape.len() != 2
                || w_down.shape[1] != inter
                || ins.iter().any(|m| m.dtype != x.dtype && !m.dtype.is_block())
            {
                let all: Vec<String> = ins.iter().map(|m| m.to_string()).collect();
                return Err(err(op, format!("inconsistent operands {}", all.join(", "))));
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("checked") = w_down.shape[0].clone();
            same(shape)
        }
    }
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
        let y = infer(&Op::Linear, &[x.clone(), w]).unwrap().remove(0);
        assert_eq!(y.to_string(), "f32[batch, seq, 128]");
        let v = Op::view(vec![SizeArg::Dim(b), SizeArg::Dim(s), SizeArg::Infer, SizeArg::Dim(Dim::new(32))]);
        assert_eq!(infer(&v, &[y]).unwrap()[0].to_string(), "f32[batch, seq, 4, 32]");
        let bad = m(DType::F32, static_shape(&[100, 32]));
        let e = infer(&Op::Linear, &[x, bad]).unwrap_err().to_string();
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
