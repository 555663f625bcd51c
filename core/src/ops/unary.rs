//! The elementwise unary ops, each defined once here and registered in the op table
//! (`registry::custom_op`) like a plugin's op: its name (the ATen name a dump prints), the
//! `torch.export` target it comes from, its attributes, its shape rule (one output like the
//! input), its CPU kernel and, where it has one, its CUDA lowering.

use std::sync::Arc;

use crate::custom_op::{CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::ops::no_attrs;
use crate::tensor::Tensor;
use autodeploy_kernels::cuda::exec::Unary;

/// One unary op.
struct Def {
    name: &'static str,
    /// Its `torch.ops.aten.*` target in an exported graph.
    aten: &'static str,
    /// f32 in, f32 out; `attrs` already checked by `check`.
    f: fn(f32, &str) -> f32,
    /// Exact on i64 tensors (`aten.neg` of positions in a mask subgraph).
    int: Option<fn(i64) -> i64>,
    check: fn(&str) -> Result<(), String>,
    /// The CUDA kernel for (checked) attributes.
    cuda: Option<fn(&str) -> Unary>,
}

/// `approximate=none|tanh` (none when absent).
fn gelu_tanh(attrs: &str) -> Result<bool, String> {
    match attrs.trim() {
        "" | "approximate=none" => Ok(false),
        "approximate=tanh" => Ok(true),
        other => Err(format!("`{other}`: approximate must be `none` or `tanh`")),
    }
}

fn gelu_attrs(a: f32, attrs: &str) -> f32 {
    gelu(a, gelu_tanh(attrs).unwrap_or(false))
}

/// GELU in f32: exact (erf) or torch's tanh approximation.
pub fn gelu(a: f32, tanh: bool) -> f32 {
    if tanh {
        let k = (2.0 / std::f32::consts::PI).sqrt();
        0.5 * a * (1.0 + (k * (a + 0.044715 * a * a * a)).tanh())
    } else {
        0.5 * a * (1.0 + crate::cpu::erf(a / std::f32::consts::SQRT_2))
    }
}

const DEFS: [Def; 9] = [
    Def {
        name: "aten.neg",
        aten: "neg.default",
        f: |a, _| -a,
        int: Some(|a| -a),
        check: no_attrs,
        cuda: Some(|_| Unary::Neg),
    },
    Def {
        name: "aten.rsqrt",
        aten: "rsqrt.default",
        f: |a, _| 1.0 / a.sqrt(),
        int: None,
        check: no_attrs,
        cuda: Some(|_| Unary::Rsqrt),
    },
    Def {
        name: "aten.silu",
        aten: "silu.default",
        f: |a, _| a / (1.0 + (-a).exp()),
        int: None,
        check: no_attrs,
        cuda: Some(|_| Unary::Silu),
    },
    Def {
        name: "aten.cos",
        aten: "cos.default",
        f: |a, _| a.cos(),
        int: None,
        check: no_attrs,
        cuda: Some(|_| Unary::Cos),
    },
    Def {
        name: "aten.sin",
        aten: "sin.default",
        f: |a, _| a.sin(),
        int: None,
        check: no_attrs,
        cuda: Some(|_| Unary::Sin),
    },
    Def {
        name: "aten.gelu",
        aten: "gelu.default",
        f: gelu_attrs,
        int: None,
        check: |a| gelu_tanh(a).map(|_| ()),
        cuda: Some(|a| if gelu_tanh(a).unwrap_or(false) { Unary::GeluTanh } else { Unary::Gelu }),
    },
    Def {
        name: "aten.tanh",
        aten: "tanh.default",
        f: |a, _| a.tanh(),
        int: None,
        check: no_attrs,
        cuda: Some(|_| Unary::Tanh),
    },
    Def {
        name: "aten.floor",
        aten: "floor.default",
        f: |a, _| a.floor(),
        int: Some(|a| a),
        check: no_attrs,
        cuda: Some(|_| Unary::Floor),
    },
    Def {
        name: "aten.log1p",
        aten: "log1p.default",
        f: |a, _| a.ln_1p(),
        int: None,
        check: no_attrs,
        cuda: Some(|_| Unary::Log1p),
    },
];

/// The op name for an exported graph's `torch.ops.aten.<target>`, if it is one of these.
pub fn from_aten(target: &str) -> Option<&'static str> {
    DEFS.iter().find(|d| d.aten == target).map(|d| d.name)
}

/// The unary ops as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    DEFS.iter()
        .map(|d| {
            let (f, int, check) = (d.f, d.int, d.check);
            let cuda = d.cuda.map(|unary| {
                Arc::new(move |ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
                    let u = unary(attrs);
                    let gpu = crate::ops::gpu_of(l)?;
                    let (x, y) = (&ins[0], &outs[0]);
                    gpu.unary(u, x.ptr, y.ptr, crate::ops::cuda_dt(y.dtype)?, y.shape.iter().product(), 0.0)
                        .map_err(|e| e.0)
                }) as crate::custom_op::CudaImpl
            });
            CustomOp {
                name: d.name,
                version: env!("CARGO_PKG_VERSION"),
                inputs: 1,
                outputs: Outputs::Rule(Arc::new(move |ins: &[TensorMeta], attrs: &str| {
                    check(attrs)?;
                    let x = &ins[0];
                    if !(x.dtype.is_float() || int.is_some() && x.dtype == DType::I64) {
                        return Err(format!("needs a float tensor, got {x}"));
                    }
                    Ok(vec![x.clone()])
                })),
                origin: "built-in",
                check_attrs: Some(check),
                cpu: Arc::new(
                    move |ins: &[&Tensor], attrs: &str, _: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
                        let x = ins[0];
                        let y = match (x.as_i64(), int) {
                            (Some(v), Some(g)) => {
                                Tensor::from_i64(x.shape().to_vec(), v.iter().map(|&a| g(a)).collect())
                            }
                            _ => crate::cpu::map_f32(x, |a| f(a, attrs)),
                        };
                        Ok(vec![y.map_err(|e| e.to_string())?])
                    },
                ),
                cuda,
                extra_inputs: 0,
                sizes: None,
                view: None,
                linear_weights: false,
                cuda_scratch: None,
                cuda_attrs: None,
            }
        })
        .collect()
}
