//! RoPE, defined once here and registered in the op table: the canonical
//! `torch_rope_with_explicit_cos_sin(x, cos, sin)` the matchers make, `x·cos + rotate_half(x)·sin`
//! (`interleaved=true`: x's last dim holds (even, odd) pairs, de-interleaved first). Its CPU
//! kernel rounds where the unfused graph does; its CUDA kernel takes cos/sin as one `[tokens,
//! head_dim]` table and rotate-half only. Graphs build it with [`Op::rope`]; transforms read it
//! with [`Op::rope_interleaved`].

use std::sync::Arc;

use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::{broadcast_shapes, cuda_dt, Op};
use crate::shape::{Bindings, Dim};
use crate::tensor::Tensor;

pub const ROPE: &str = "torch_rope_with_explicit_cos_sin";

fn interleaved(text: &str) -> Result<bool, String> {
    read_attrs(ROPE, text, |a| Ok(a.opt_bool("interleaved")?.unwrap_or(false)))
}

impl Op {
    pub fn rope(interleaved: bool) -> Op {
        Op { name: ROPE, attrs: format!("interleaved={interleaved}") }
    }

    /// Whether a RoPE node de-interleaves x first; `None` if this is not RoPE.
    pub fn rope_interleaved(&self) -> Option<bool> {
        match self {
            Op { name: ROPE, attrs, .. } => interleaved(attrs).ok(),
            _ => None,
        }
    }
}

fn rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    interleaved(attrs)?;
    let (x, c, s) = (&ins[0], &ins[1], &ins[2]);
    if !x.dtype.is_float() {
        return Err(format!("needs a float tensor, got {x}"));
    }
    if c != s || x.shape.last() != c.shape.last() || x.shape.last().and_then(Dim::as_static).is_none_or(|d| d % 2 != 0)
    {
        return Err(format!("x {x}, cos {c}, sin {s}: cos and sin must match and share x's even last dim"));
    }
    let shape = broadcast_shapes(&x.shape, &c.shape)?;
    if shape != x.shape {
        return Err(format!("cos {c} must broadcast to x {x}"));
    }
    Ok(vec![TensorMeta { dtype: DType::promote(x.dtype, c.dtype), shape }])
}

fn cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], _: &str, l: &mut dyn KernelLauncher| {
        let gpu = crate::ops::gpu_of(l)?;
        let (x, c, s, y) = (&ins[0], &ins[1], &ins[2], &outs[0]);
        let xs = &x.shape;
        let d = *xs.last().unwrap_or(&1);
        let t = if xs.len() >= 2 { xs[xs.len() - 2] } else { 1 };
        let table =
            |s: &[usize]| s.len() >= 2 && s[s.len() - 2..] == [t, d] && s[..s.len() - 2].iter().all(|&n| n == 1);
        if !table(&c.shape) || !table(&s.shape) || c.dtype != y.dtype || s.dtype != y.dtype || d % 2 != 0 {
            return Err(format!(
                "cos/sin of shapes {:?}/{:?} are not one [tokens, head_dim] table for x {xs:?}",
                c.shape, s.shape
            ));
        }
        let n: usize = y.shape.iter().product();
        gpu.rope(x.ptr, cuda_dt(y.dtype)?, c.ptr, s.ptr, y.ptr, n / d, t, d).map_err(|e| e.0)
    })
}

/// RoPE as an op-table entry.
pub fn ops() -> Vec<CustomOp> {
    vec![CustomOp {
        name: ROPE,
        version: env!("CARGO_PKG_VERSION"),
        inputs: 3,
        outputs: Outputs::Rule(Arc::new(rule)),
        origin: "built-in",
        check_attrs: Some(|a| interleaved(a).map(|_| ())),
        cpu: Arc::new(|ins: &[&Tensor], attrs: &str, _: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
            // cos/sin and x have concrete shapes here: no symbol to bind.
            let y = crate::cpu::rope(ins[0], ins[1], ins[2], interleaved(attrs)?, &Bindings::default());
            Ok(vec![y.map_err(|e| e.to_string())?])
        }),
        cuda: Some(cuda()),
        extra_inputs: 0,
        sizes: None,
        view: None,
        linear_weights: false,
        cuda_scratch: None,
        cuda_attrs: Some(|a| match interleaved(a)? {
            false => Ok(()),
            true => Err("interleaved RoPE has no CUDA kernel yet".into()),
        }),
    }]
}
