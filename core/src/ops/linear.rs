//! The GEMM ops, each defined once here and registered in the op table: `aten.linear(x, weight[,
//! bias])` (weight `[out, in]`) and the canonical `torch_swiglu_mlp` the matchers make,
//! `down(act(gate(x)) · up(x))` (inputs `(x, w_gate, w_up, w_down)`, or with `fused=true`
//! `(x, w_gate_up, w_down)`, gate rows first; `act` silu (SwiGLU, the default), `gelu_tanh` or
//! `gelu` (GeGLU); `epilogue=true`: for one row, silu(gate)·up is the gate/up GEMV's epilogue on
//! CUDA, the `fuse_swiglu_epilogue` transform's doing). Their CPU
//! kernels multiply any weight storage (block-quantized included, `cpu::linear_f32`); their CUDA
//! kernels take one dtype for x, weights and output.

use std::sync::Arc;

use crate::cpu::{linear_f32, round_as, KernelOptions};
use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::{cuda_dt, gpu_of, no_attrs, Op};
use crate::shape::Dim;
use crate::tensor::Tensor;
pub use autodeploy_kernels::cuda::exec::GateAct;
use autodeploy_kernels::cuda::exec::{Dt, Gpu, Ptr, Strided, Unary};
use autodeploy_kernels::cuda::Unavailable;

pub const LINEAR: &str = "aten.linear";
pub const SWIGLU: &str = "torch_swiglu_mlp";
pub const MLP: &str = "torch_mlp";

/// `torch_swiglu_mlp`'s attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwiGlu {
    /// The inputs are `(x, w_gate_up, w_down)`, gate rows first.
    pub fused: bool,
    /// For one row, silu(gate)·up is the gate/up GEMV's epilogue on CUDA (the same math on the
    /// CPU); silu only.
    pub epilogue: bool,
    pub act: GateAct,
}

/// The gate's activation (`act=`; silu when absent).
pub fn gate_act_name(a: GateAct) -> &'static str {
    match a {
        GateAct::Silu => "silu",
        GateAct::GeluTanh => "gelu_tanh",
        GateAct::Gelu => "gelu",
    }
}

/// The activation [`gate_act_name`] names.
pub(crate) fn gate_act_named(name: &str) -> Option<GateAct> {
    [GateAct::Silu, GateAct::GeluTanh, GateAct::Gelu].into_iter().find(|&a| gate_act_name(a) == name)
}

/// The activation in f32, as the unfused `aten.silu` / `aten.gelu` compute it.
pub fn gate_act(a: GateAct, x: f32) -> f32 {
    match a {
        GateAct::Silu => x / (1.0 + (-x).exp()),
        GateAct::GeluTanh => crate::ops::unary::gelu(x, true),
        GateAct::Gelu => crate::ops::unary::gelu(x, false),
    }
}

impl SwiGlu {
    fn text(&self) -> String {
        let mut s = format!("fused={}", self.fused);
        if self.epilogue {
            s.push_str(", epilogue=true");
        }
        if self.act != GateAct::Silu {
            s.push_str(&format!(", act={}", gate_act_name(self.act)));
        }
        s
    }

    fn parse(text: &str) -> Result<SwiGlu, String> {
        read_attrs(SWIGLU, text, |a| {
            let act = match a.take("act") {
                None => GateAct::Silu,
                Some(name) => gate_act_named(name).ok_or_else(|| a.bad("act", name, "silu, gelu_tanh or gelu"))?,
            };
            let s = SwiGlu {
                fused: a.opt_bool("fused")?.unwrap_or(false),
                epilogue: a.opt_bool("epilogue")?.unwrap_or(false),
                act,
            };
            if s.epilogue && act != GateAct::Silu {
                return Err(a.bad("epilogue", "true", "allowed with act other than silu"));
            }
            Ok(s)
        })
    }
}

impl Op {
    pub fn linear() -> Op {
        Op { name: LINEAR, attrs: String::new() }
    }
    pub fn swiglu(a: SwiGlu) -> Op {
        Op { name: SWIGLU, attrs: a.text() }
    }
    pub fn swiglu_of(&self) -> Option<SwiGlu> {
        self.attrs_of(SWIGLU).and_then(|a| SwiGlu::parse(a).ok())
    }
}

fn linear_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    no_attrs(attrs)?;
    let (x, w) = (&ins[0], &ins[1]);
    if !x.dtype.is_float() {
        return Err(format!("needs a float tensor, got {x}"));
    }
    if w.shape.len() != 2 || x.shape.is_empty() {
        return Err(format!("input {x} vs weight {w}: weight must be [out, in]"));
    }
    // A block-quantized weight serves any float input.
    if x.shape.last() != Some(&w.shape[1]) || (x.dtype != w.dtype && !w.dtype.is_block()) {
        return Err(format!("input {x} vs weight {w}"));
    }
    if let Some(b) = ins.get(2) {
        if b.shape.len() != 1 || b.shape[0] != w.shape[0] || (b.dtype != w.dtype && b.dtype != x.dtype) {
            return Err(format!("bias {b} vs weight {w}"));
        }
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("checked") = w.shape[0].clone();
    Ok(vec![TensorMeta { dtype: x.dtype, shape }])
}

fn swiglu_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let a = SwiGlu::parse(attrs)?;
    let x = &ins[0];
    let want = if a.fused { 3 } else { 4 };
    if ins.len() != want {
        return Err(format!("takes {want} tensor inputs with fused={}, got {}", a.fused, ins.len()));
    }
    let w_down = &ins[want - 1];
    let (inter, ok) = if a.fused {
        let w = &ins[1];
        let i = w.shape.first().and_then(Dim::as_static).map(|n| n / 2).unwrap_or(0);
        (Dim::new(i), w.shape.len() == 2 && w.shape[0] == Dim::new(2 * i) && x.shape.last() == Some(&w.shape[1]))
    } else {
        let (g, u) = (&ins[1], &ins[2]);
        (g.shape[0].clone(), g.shape.len() == 2 && g == u && x.shape.last() == Some(&g.shape[1]))
    };
    if !ok
        || x.shape.is_empty()
        || w_down.shape.len() != 2
        || w_down.shape[1] != inter
        || ins.iter().any(|m| m.dtype != x.dtype && !m.dtype.is_block())
    {
        let all: Vec<String> = ins.iter().map(|m| m.to_string()).collect();
        return Err(format!("inconsistent operands {}", all.join(", ")));
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("checked") = w_down.shape[0].clone();
    Ok(vec![TensorMeta { dtype: x.dtype, shape }])
}

fn linear_cpu(
    ins: &[&Tensor],
    _: &str,
    outs: &[(DType, Vec<usize>)],
    opts: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let (x, w) = (ins[0], ins[1]);
    let kk = w.shape()[1];
    let m = x.numel() / kk.max(1);
    let bias = ins.get(2).map(|b| b.to_f32());
    let y = linear_f32(&x.to_f32(), m, kk, w, bias.as_deref(), opts);
    Ok(vec![Tensor::from_f32_as(outs[0].0, outs[0].1.clone(), y).map_err(|e| e.to_string())?])
}

/// silu(gate)·up, then down, rounded where the unfused graph rounds.
fn swiglu_cpu(
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
    opts: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let SwiGlu { fused, act: gact, .. } = SwiGlu::parse(attrs)?;
    let x = ins[0];
    let dtype = x.dtype();
    let wd = ins[ins.len() - 1];
    let inter = wd.shape()[1];
    let kk = *x.shape().last().unwrap_or(&1);
    let m = x.numel() / kk.max(1);
    let xv = x.to_f32();
    let lin = |w: &Tensor| {
        let mut y = linear_f32(&xv, m, kk, w, None, opts);
        y.iter_mut().for_each(|v| *v = round_as(dtype, *v));
        y
    };
    // On the pool: 1.5k exps a token are several µs serially.
    let (gu, up) = if fused { (lin(ins[1]), None) } else { (lin(ins[1]), Some(lin(ins[2]))) };
    let mut act = vec![0f32; m * inter];
    let chunk = (m * inter).div_ceil(4 * autodeploy_kernels::pool::threads()).max(256);
    autodeploy_kernels::pool::for_each_chunk_mut(&mut act, chunk, |c, out| {
        for (i, o) in out.iter_mut().enumerate() {
            let j = c * chunk + i;
            let (a, b) = match &up {
                Some(u) => (gu[j], u[j]),
                None => {
                    let (r, col) = (j / inter, j % inter);
                    (gu[r * 2 * inter + col], gu[r * 2 * inter + inter + col])
                }
            };
            *o = round_as(dtype, round_as(dtype, gate_act(gact, a)) * b);
        }
    });
    let y = linear_f32(&act, m, inter, wd, None, opts);
    Ok(vec![Tensor::from_f32_as(dtype, outs[0].1.clone(), y).map_err(|e| e.to_string())?])
}

/// `y[m, n] (+)= x[m, k] · w[n, k]ᵀ` on the GPU: the decode GEMV for one row (measured on an
/// H200 with kernels/examples/exec_bench: faster than cuBLAS there, except for a very wide,
/// shallow matrix such as a small model's LM head), else cuBLAS.
#[allow(clippy::too_many_arguments)]
pub fn cuda_linear(
    gpu: &Gpu,
    d: Dt,
    m: usize,
    n: usize,
    k: usize,
    x: Ptr,
    w: Ptr,
    y: Ptr,
    acc: bool,
) -> Result<(), Unavailable> {
    if m == 1 && (k >= 2048 || n <= 32768) && gpu.gemv(d, m, n, k, x, w, y, acc)? {
        return Ok(());
    }
    gpu.linear(d, m, n, k, x, w, y, acc)
}

fn one_dtype(ins: &[DeviceTensor], y: &DeviceTensor) -> Result<Dt, String> {
    if let Some(t) = ins.iter().find(|t| t.dtype != y.dtype) {
        return Err(format!("x, the weights and the output must share one dtype ({} vs {})", t.dtype, y.dtype));
    }
    cuda_dt(y.dtype)
}

fn linear_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], _: &str, l: &mut dyn KernelLauncher| {
        let (x, w, y) = (&ins[0], &ins[1], &outs[0]);
        let d = one_dtype(&ins[..2], y)?;
        let (n, k) = (w.shape[0], w.shape[1]);
        let m = y.shape.iter().product::<usize>() / n.max(1);
        cuda_linear_bias(gpu_of(l)?, d, (m, n, k), x.ptr, w.ptr, ins.get(2), y.ptr)
    })
}

fn swiglu_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let a = SwiGlu::parse(attrs)?;
        let (x, y) = (&ins[0], &outs[0]);
        let d = one_dtype(ins, y)?;
        let k = *x.shape.last().unwrap_or(&1);
        let wd = &ins[ins.len() - 1];
        let (hidden, inter) = (wd.shape[0], wd.shape[1]);
        let m = y.shape.iter().product::<usize>() / hidden.max(1);
        let s = |i: usize| l.scratch(i).ok_or_else(|| format!("scratch region {i} was not planned"));
        let (s0, s1) = (s(0)?, s(1)?);
        let gpu = gpu_of(l)?;
        let e = |r: Result<(), Unavailable>| r.map_err(|e| e.0);
        if a.fused {
            // A single row's activation as the gate/up GEMV's epilogue, where the graph asks.
            let fused_act = a.epilogue
                && a.act == GateAct::Silu
                && gpu.gemv_swiglu(d, m, inter, k, x.ptr, ins[1].ptr, s1).map_err(|e| e.0)?;
            if !fused_act {
                e(cuda_linear(gpu, d, m, 2 * inter, k, x.ptr, ins[1].ptr, s0, false))?;
                e(gpu.silu_mul(s0, None, d, s1, None, m, inter, a.act))?;
            }
            e(cuda_linear(gpu, d, m, hidden, inter, s1, wd.ptr, y.ptr, false))
        } else {
            let s2 = s(2)?;
            e(cuda_linear(gpu, d, m, inter, k, x.ptr, ins[1].ptr, s0, false))?;
            e(cuda_linear(gpu, d, m, inter, k, x.ptr, ins[2].ptr, s1, false))?;
            e(gpu.silu_mul(s0, Some(s1), d, s2, None, m, inter, a.act))?;
            e(cuda_linear(gpu, d, m, hidden, inter, s2, wd.ptr, y.ptr, false))
        }
    })
}

/// The gate/up activations: `[m, 2·inter]` and `[m, inter]` fused, three `[m, inter]` not.
fn swiglu_scratch(ins: &[(DType, Vec<usize>)], attrs: &str) -> Vec<usize> {
    let (dt, xs) = &ins[0];
    let m: usize = xs[..xs.len().saturating_sub(1)].iter().product();
    let inter = ins.last().and_then(|(_, s)| s.get(1)).copied().unwrap_or(0);
    let e = dt.size_in_bytes();
    if SwiGlu::parse(attrs).is_ok_and(|a| a.fused) {
        vec![m * 2 * inter * e, m * inter * e]
    } else {
        vec![m * inter * e; 3]
    }
}

/// `torch_mlp`'s activation (`act=…`; silu, gelu_tanh or gelu, as the gated MLP's).
fn mlp_act(text: &str) -> Result<GateAct, String> {
    read_attrs(MLP, text, |a| {
        let name = a.take("act").ok_or_else(|| a.missing("act"))?;
        gate_act_named(name).ok_or_else(|| a.bad("act", name, "silu, gelu_tanh or gelu"))
    })
}

impl Op {
    /// The ungated MLP `proj(act(fc(x)))`: inputs `(x, w_fc, w_proj[, b_fc, b_proj])`.
    pub fn mlp(act: GateAct) -> Op {
        Op { name: MLP, attrs: format!("act={}", gate_act_name(act)) }
    }
}

fn mlp_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    mlp_act(attrs)?;
    if ins.len() != 3 && ins.len() != 5 {
        return Err(format!("takes (x, w_fc, w_proj) or (x, w_fc, w_proj, b_fc, b_proj), got {} inputs", ins.len()));
    }
    let mut fc = vec![ins[0].clone(), ins[1].clone()];
    let mut proj_ins = Vec::new();
    if ins.len() == 5 {
        fc.push(ins[3].clone());
    }
    let h = linear_rule(&fc, "")?.remove(0);
    proj_ins.push(h);
    proj_ins.push(ins[2].clone());
    if ins.len() == 5 {
        proj_ins.push(ins[4].clone());
    }
    linear_rule(&proj_ins, "")
}

/// fc (+ bias), rounded; the activation, rounded; proj (+ bias): the unfused ops' roundings.
fn mlp_cpu(
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
    opts: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let act = mlp_act(attrs)?;
    let (x, w_fc, w_proj) = (ins[0], ins[1], ins[2]);
    let dtype = x.dtype();
    let (k, inter) = (w_fc.shape()[1], w_fc.shape()[0]);
    let m = x.numel() / k.max(1);
    let (b_fc, b_proj) = (ins.get(3).map(|b| b.to_f32()), ins.get(4).map(|b| b.to_f32()));
    let mut h = linear_f32(&x.to_f32(), m, k, w_fc, b_fc.as_deref(), opts);
    h.iter_mut().for_each(|v| *v = round_as(dtype, gate_act(act, round_as(dtype, *v))));
    let y = linear_f32(&h, m, inter, w_proj, b_proj.as_deref(), opts);
    Ok(vec![Tensor::from_f32_as(outs[0].0, outs[0].1.clone(), y).map_err(|e| e.to_string())?])
}

/// y = bias (broadcast to every row) + x·wᵀ on the GPU, or x·wᵀ alone: y starts as the bias on
/// every row, and the GEMM adds x·wᵀ in f32 and rounds once.
#[allow(clippy::too_many_arguments)]
fn cuda_linear_bias(
    gpu: &Gpu,
    d: Dt,
    (m, n, k): (usize, usize, usize),
    x: Ptr,
    w: Ptr,
    bias: Option<&DeviceTensor>,
    y: Ptr,
) -> Result<(), String> {
    if let Some(b) = bias {
        let s = Strided::new(&[m, n], &[0, 1], &[0, 0]).map_err(|e| e.0)?;
        gpu.copy_strided(b.ptr, cuda_dt(b.dtype)?, y, d, m * n, s, false).map_err(|e| e.0)?;
    }
    cuda_linear(gpu, d, m, n, k, x, w, y, bias.is_some()).map_err(|e| e.0)
}

fn mlp_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let act = mlp_act(attrs)?;
        let (x, y) = (&ins[0], &outs[0]);
        let d = one_dtype(&ins[..3], y)?;
        let (inter, k) = (ins[1].shape[0], ins[1].shape[1]);
        let hidden = ins[2].shape[0];
        let m = y.shape.iter().product::<usize>() / hidden.max(1);
        let h = l.scratch(0).ok_or("scratch region 0 was not planned")?;
        let gpu = gpu_of(l)?;
        cuda_linear_bias(gpu, d, (m, inter, k), x.ptr, ins[1].ptr, ins.get(3), h)?;
        let u = match act {
            GateAct::Silu => Unary::Silu,
            GateAct::GeluTanh => Unary::GeluTanh,
            GateAct::Gelu => Unary::Gelu,
        };
        gpu.unary(u, h, h, d, m * inter, 0.0).map_err(|e| e.0)?;
        cuda_linear_bias(gpu, d, (m, hidden, inter), h, ins[2].ptr, ins.get(4), y.ptr)
    })
}

/// The activation `[m, inter]`.
fn mlp_scratch(ins: &[(DType, Vec<usize>)], _: &str) -> Vec<usize> {
    let (dt, xs) = &ins[0];
    let m: usize = xs[..xs.len().saturating_sub(1)].iter().product();
    let inter = ins[1].1.first().copied().unwrap_or(0);
    vec![m * inter * dt.size_in_bytes()]
}

/// The GEMM ops as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    vec![
        CustomOp {
            extra_inputs: 1,
            cuda: Some(linear_cuda()),
            linear_weights: true,
            ..CustomOp::built_in(LINEAR, 2, Outputs::Rule(Arc::new(linear_rule)), no_attrs, Arc::new(linear_cpu))
        },
        CustomOp {
            extra_inputs: 1,
            cuda: Some(swiglu_cuda()),
            linear_weights: true,
            cuda_scratch: Some(swiglu_scratch),
            ..CustomOp::built_in(
                SWIGLU,
                3,
                Outputs::Rule(Arc::new(swiglu_rule)),
                |a| SwiGlu::parse(a).map(|_| ()),
                Arc::new(swiglu_cpu),
            )
        },
        CustomOp {
            extra_inputs: 2,
            cuda: Some(mlp_cuda()),
            linear_weights: true,
            cuda_scratch: Some(mlp_scratch),
            ..CustomOp::built_in(
                MLP,
                3,
                Outputs::Rule(Arc::new(mlp_rule)),
                |a| mlp_act(a).map(|_| ()),
                Arc::new(mlp_cpu),
            )
        },
    ]
}
