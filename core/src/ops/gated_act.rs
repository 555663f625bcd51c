//! `torch_gated_act`, defined once here and registered in the op table: a gated MLP's activation
//! between its gate/up and down linears, `act(gate) · up`, as the unfused `aten.silu` (or
//! `aten.gelu`) and `aten.mul` round it (the activation rounded to the dtype, then the
//! product). Inputs `(gate_up)`, the fused gate/up linear's output `[.., 2·I]` with the gate
//! first, or `(gate, up)`; `act` silu (the default), `gelu_tanh` or `gelu`. The
//! `fuse_gated_act` transform makes it from those ops where the MLP matchers left an MLP
//! unfused (the quantized ones), so the activation is one kernel; with `quant=fp8` (the
//! `fuse_fp8_input_quant` transform) it writes the E4M3 codes the FP8 down projection reads.

use std::sync::Arc;

use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::linear::{gate_act, gate_act_name, gate_act_named, GateAct};
use crate::ops::quant_linear::codes_out;
use crate::ops::{cuda_dt, gpu_of, Op};
use crate::shape::Dim;
use crate::tensor::Tensor;

pub const GATED_ACT: &str = "torch_gated_act";

/// `torch_gated_act`'s attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatedAct {
    pub act: GateAct,
    /// `quant=fp8`: E4M3 codes out at the last input's scale.
    pub fp8_out: bool,
}

impl GatedAct {
    fn parse(text: &str) -> Result<GatedAct, String> {
        read_attrs(GATED_ACT, text, |a| {
            let act = match a.take("act") {
                None => GateAct::Silu,
                Some(name) => gate_act_named(name).ok_or_else(|| a.bad("act", name, "silu, gelu_tanh or gelu"))?,
            };
            Ok(GatedAct { act, fp8_out: codes_out::read(a)? })
        })
    }

    fn text(&self) -> String {
        let mut parts = Vec::new();
        if self.act != GateAct::Silu {
            parts.push(format!("act={}", gate_act_name(self.act)));
        }
        if self.fp8_out {
            parts.push("quant=fp8".to_string());
        }
        parts.join(", ")
    }

    /// How many of the inputs are gate/up data (1: fused, 2: apart) out of `inputs`.
    fn data_inputs(&self, inputs: usize) -> Result<usize, String> {
        match inputs - self.fp8_out as usize {
            n @ (1 | 2) => Ok(n),
            n => Err(format!("takes (gate_up) or (gate, up), plus the scale with quant=fp8; got {n} data inputs")),
        }
    }
}

impl Op {
    pub fn gated_act(a: GatedAct) -> Op {
        Op { name: GATED_ACT, attrs: a.text() }
    }
    pub fn gated_act_of(&self) -> Option<GatedAct> {
        self.attrs_of(GATED_ACT).and_then(|a| GatedAct::parse(a).ok())
    }
}

fn rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let a = GatedAct::parse(attrs)?;
    let n = a.data_inputs(ins.len())?;
    let g = &ins[0];
    if !g.dtype.is_float() || g.shape.is_empty() {
        return Err(format!("needs a float tensor with a last dim, got {g}"));
    }
    let mut shape = g.shape.clone();
    if n == 2 {
        if ins[1] != *g {
            return Err(format!("gate {g} and up {} must have one dtype and shape", ins[1]));
        }
    } else {
        let last = shape.last_mut().expect("checked");
        match last.as_static() {
            Some(w) if w % 2 == 0 => *last = Dim::new(w / 2),
            _ => return Err(format!("gate_up {g}: its last dim must be an even number (gate, then up)")),
        }
    }
    let plain = TensorMeta { dtype: g.dtype, shape };
    Ok(vec![codes_out::meta(a.fp8_out, ins.get(n), plain)?])
}

fn cpu(
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
    _: &crate::cpu::KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let a = GatedAct::parse(attrs)?;
    let n = a.data_inputs(ins.len())?;
    let (dt, shape) = (ins[0].dtype(), &outs[0].1);
    let inter = *shape.last().ok_or("the output has rank 0")?;
    let g = ins[0].to_f32();
    let u = if n == 2 { Some(ins[1].to_f32()) } else { None };
    let total: usize = shape.iter().product();
    let values = gated_values(a.act, dt, &g, u.as_deref(), total, inter);
    let out = match a.fp8_out {
        true => codes_out::codes(values, dt, ins[n], shape)?,
        false => Tensor::from_f32_as(dt, shape.clone(), values).map_err(|e| e.to_string())?,
    };
    Ok(vec![out])
}

/// `act(gate) · up` for `total` outputs, rows of `inter`, the activation rounded to `dt` (the
/// product not yet): from `gate` and `up` alike shaped, or (`up` None) from `gate` holding each
/// row's gate then up halves. The values of gate and up are already `dt`'s. Also the FP8 linear's
/// gated epilogue (`torch_quant_fp8_linear(act=..)`), over its rounded output.
pub(crate) fn gated_values(
    act: GateAct,
    dt: DType,
    gate: &[f32],
    up: Option<&[f32]>,
    total: usize,
    inter: usize,
) -> Vec<f32> {
    let rnd = |x: f32| crate::cpu::round_as(dt, x);
    (0..total)
        .map(|i| {
            let (r, j) = (i / inter.max(1), i % inter.max(1));
            let (gv, uv) = match up {
                Some(u) => (gate[i], u[i]),
                None => (gate[r * 2 * inter + j], gate[r * 2 * inter + inter + j]),
            };
            rnd(gate_act(act, gv)) * uv
        })
        .collect()
}

fn cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let a = GatedAct::parse(attrs)?;
        let n = a.data_inputs(ins.len())?;
        let y = &outs[0];
        let inter = *y.shape.last().unwrap_or(&1);
        let rows = y.shape.iter().product::<usize>() / inter.max(1);
        let up = (n == 2).then(|| ins[1].ptr);
        let codes_scale = a.fp8_out.then(|| ins[n].ptr);
        gpu_of(l)?
            .silu_mul(ins[0].ptr, up, cuda_dt(ins[0].dtype)?, y.ptr, codes_scale, rows, inter, a.act)
            .map_err(|e| e.0)
    })
}

/// The op as an op-table entry.
pub fn ops() -> Vec<CustomOp> {
    vec![CustomOp {
        // (gate, up) and `quant=fp8`'s scale.
        extra_inputs: 2,
        cuda: Some(cuda()),
        ..CustomOp::built_in(
            GATED_ACT,
            1,
            Outputs::Rule(Arc::new(rule)),
            |t| GatedAct::parse(t).map(|_| ()),
            Arc::new(cpu),
        )
    }]
}
