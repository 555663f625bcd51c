//! The canonical mixture-of-experts op, defined once here and registered in the op table:
//! `torch_moe(x[.., H], router_logits[.., E], w_gate_up[E, 2I, H], w_down[E, H, I])` with
//! attributes `top_k=K, norm=true|false, act=silu|gelu_tanh|gelu[, weights_f32=true][,
//! router=sigmoid]`.
//!
//! Each token's routing is softmax over its router logits in f32, the `K` largest
//! probabilities (ties to the lower expert index), divided by their sum when `norm`, then
//! rounded to the model's dtype unless `weights_f32` (Mixtral keeps them in f32 until they
//! scale an expert's output; Qwen3-MoE rounds them first). Each chosen expert `e` computes
//! `down_e(act(gate_e(x)) · up_e(x))` (the gate rows of `w_gate_up[e]` first), scaled by the
//! token's weight for it; the outputs are summed in expert order, each sum rounded to the
//! dtype, as transformers' `index_add_` does.
//!
//! `router=sigmoid` is Llama 4's routing: the `K` largest router logits (ties to the lower
//! index), each weight `sigmoid(logit)` in f32 rounded to the dtype, scaling the token's input
//! to the expert (`round(x · w)`) instead of its output; `norm` and `weights_f32` do not apply.
//! transformers sums a token's expert outputs once in f32 there; the op's expert-order sum with
//! a rounding a step is the same for one expert a token (every Llama 4 model). The CUDA lowering (kernels' `Gpu::moe`) rounds
//! the same way; it reads only the chosen experts' rows, one GEMV a token and expert. The router's linear stays an ordinary
//! `aten.linear` before the op (AutoDeploy's `torch_moe` takes the chosen experts and weights
//! instead; folding the routing in lets one kernel read only the chosen experts' weights).

use std::sync::Arc;

use crate::cpu::{round_as, KernelOptions};
use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::linear::{gate_act, gate_act_name, gate_act_named, GateAct};
use crate::ops::{cuda_dt, gpu_of, Op};
use crate::shape::Dim;
use crate::tensor::Tensor;
use autodeploy_kernels::cuda::exec::{MoeShape, RouterIn};

pub const MOE: &str = "torch_moe";

/// `torch_moe`'s attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moe {
    /// Experts per token.
    pub top_k: usize,
    /// The chosen probabilities divided by their sum.
    pub norm: bool,
    pub act: GateAct,
    /// The routing weights stay f32 (else rounded to the model's dtype before they scale).
    pub weights_f32: bool,
    pub router: Router,
    /// Expert parallelism: the weights hold experts `expert_offset ..` of the router's (this
    /// rank's share); a token's chosen experts elsewhere add nothing here (the ranks' outputs
    /// meet in an `all_reduce`). None: the weights hold every expert.
    pub expert_offset: Option<usize>,
    /// `router_weight=true` (the `fuse_moe_router` transform): the second input is the router's
    /// weight `[E, H]` (x's dtype) and the op computes the logits itself, as the router's
    /// `aten.linear` would (rounded to x's dtype); on CUDA one kernel computes and routes them.
    pub router_weight: bool,
}

/// How `torch_moe` turns router logits into experts and weights (the module doc states both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Router {
    /// Softmax, top-k probabilities, optionally renormalised; the weights scale the outputs.
    #[default]
    Softmax,
    /// Llama 4's: top-k logits, sigmoid weights scaling the experts' input.
    Sigmoid,
}

impl Moe {
    fn text(&self) -> String {
        let mut s = format!("top_k={}, norm={}, act={}", self.top_k, self.norm, gate_act_name(self.act));
        if self.weights_f32 {
            s.push_str(", weights_f32=true");
        }
        if self.router == Router::Sigmoid {
            s.push_str(", router=sigmoid");
        }
        if let Some(o) = self.expert_offset {
            s.push_str(&format!(", expert_offset={o}"));
        }
        if self.router_weight {
            s.push_str(", router_weight=true");
        }
        s
    }

    pub fn parse(text: &str) -> Result<Moe, String> {
        read_attrs(MOE, text, |a| {
            let top_k = a.int("top_k")?;
            if top_k < 1 {
                return Err(a.bad("top_k", &top_k.to_string(), "at least 1"));
            }
            let name = a.take("act").ok_or_else(|| a.missing("act"))?;
            let act = gate_act_named(name).ok_or_else(|| a.bad("act", name, "silu, gelu_tanh or gelu"))?;
            let router = match a.take("router") {
                None | Some("softmax") => Router::Softmax,
                Some("sigmoid") => Router::Sigmoid,
                Some(other) => return Err(a.bad("router", other, "softmax or sigmoid")),
            };
            Ok(Moe {
                top_k: top_k as usize,
                norm: a.bool("norm")?,
                act,
                weights_f32: a.opt_bool("weights_f32")?.unwrap_or(false),
                router,
                expert_offset: match a.take("expert_offset") {
                    None => None,
                    Some(v) => Some(v.parse().map_err(|_| a.bad("expert_offset", v, "an expert index"))?),
                },
                router_weight: a.opt_bool("router_weight")?.unwrap_or(false),
            })
        })
    }
}

impl Op {
    /// `torch_moe(x, router_logits, w_gate_up, w_down)` (with `router_weight`, the router's
    /// weight in place of its logits).
    pub fn moe(a: Moe) -> Op {
        Op { name: MOE, attrs: a.text() }
    }
    pub fn moe_of(&self) -> Option<Moe> {
        self.attrs_of(MOE).and_then(|a| Moe::parse(a).ok())
    }
}

/// The router logits' meta: the second input's, or (`router_weight`) the router linear's
/// output over x.
fn logits_meta(a: &Moe, x: &TensorMeta, second: &TensorMeta) -> Result<TensorMeta, String> {
    if !a.router_weight {
        return Ok(second.clone());
    }
    let ok = second.shape.len() == 2 && second.dtype == x.dtype && x.shape.last() == Some(&second.shape[1]);
    if !ok {
        return Err(format!("router_weight=true: the router's weight {second} must be [E, H] of x {x}'s dtype"));
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("checked") = second.shape[0].clone();
    Ok(TensorMeta { dtype: x.dtype, shape })
}

fn moe_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let a = Moe::parse(attrs)?;
    if ins[0].shape.is_empty() {
        return Err(format!("x {} needs a last dim", ins[0]));
    }
    let logits = &logits_meta(&a, &ins[0], &ins[1])?;
    let (x, gu, down) = (&ins[0], &ins[2], &ins[3]);
    let bad = || {
        let all: Vec<String> = ins.iter().map(|m| m.to_string()).collect();
        format!(
            "inconsistent operands {} (want x[.., H], router_logits[.., E], w_gate_up[E, 2I, H], w_down[E, H, I])",
            all.join(", ")
        )
    };
    if !x.dtype.is_float() || x.shape.is_empty() || gu.shape.len() != 3 || down.shape.len() != 3 {
        return Err(bad());
    }
    let (e, two_i, h) = (&gu.shape[0], &gu.shape[1], &gu.shape[2]);
    let inter = two_i.as_static().filter(|n| n % 2 == 0).map(|n| Dim::new(n / 2)).ok_or_else(bad)?;
    let lead = &x.shape[..x.shape.len() - 1];
    // The router's experts: all of them, of which the weights hold `expert_offset ..`.
    let routed = logits.shape.last().and_then(Dim::as_static);
    let offset = a.expert_offset.unwrap_or(0);
    let held = e.as_static().zip(routed).is_some_and(|(e, r)| offset + e <= r);
    if x.shape.last() != Some(h)
        || logits.shape.len() != x.shape.len()
        || logits.shape[..lead.len()] != *lead
        || (a.expert_offset.is_none() && logits.shape.last() != Some(e))
        || !held
        || down.shape != [e.clone(), h.clone(), inter]
        || gu.dtype != x.dtype
        || down.dtype != x.dtype
        || !logits.dtype.is_float()
    {
        return Err(bad());
    }
    if routed.is_none_or(|e| a.top_k > e) {
        return Err(format!("top_k={} needs at least that many experts, router_logits is {logits}", a.top_k));
    }
    Ok(vec![x.clone()])
}

/// Each token's chosen experts and weights: `routes[e]` lists `(token, weight)` in token order.
fn route(logits: &[f32], tokens: usize, experts: usize, a: &Moe, dtype: DType) -> Vec<Vec<(usize, f32)>> {
    let mut routes = vec![Vec::new(); experts];
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for t in 0..tokens {
        let row = &logits[t * experts..(t + 1) * experts];
        if a.router == Router::Sigmoid {
            order.clear();
            order.extend(0..experts);
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
            for &e in &order[..a.top_k] {
                routes[e].push((t, round_as(dtype, 1.0 / (1.0 + (-row[e]).exp()))));
            }
            continue;
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let p: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
        let sum: f32 = p.iter().sum();
        order.clear();
        order.extend(0..experts);
        order.sort_by(|&i, &j| p[j].total_cmp(&p[i]).then(i.cmp(&j)));
        let chosen = &order[..a.top_k];
        let probs: Vec<f32> = chosen.iter().map(|&e| p[e] / sum).collect();
        let total: f32 = probs.iter().sum();
        for (&e, &w) in chosen.iter().zip(&probs) {
            let w = if a.norm { w / total } else { w };
            routes[e].push((t, if a.weights_f32 { w } else { round_as(dtype, w) }));
        }
    }
    routes
}

/// Routing, then each expert over the tokens routed to it (only the chosen experts' weights
/// are read), rounded where transformers' modules round.
fn moe_cpu(
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
    opts: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let a = Moe::parse(attrs)?;
    let (x, gu, down) = (ins[0], ins[2], ins[3]);
    let dtype = x.dtype();
    let (experts, inter, h) = (gu.shape()[0], gu.shape()[1] / 2, gu.shape()[2]);
    let tokens = x.numel() / h.max(1);
    // The router's linear here (`router_weight`), as `aten.linear` computes and rounds it.
    let (logits, routed) = if a.router_weight {
        let mut l = crate::cpu::linear_f32(&x.to_f32(), tokens, h, ins[1], None, opts);
        l.iter_mut().for_each(|v| *v = round_as(dtype, *v));
        (l, ins[1].shape()[0])
    } else {
        (ins[1].to_f32().into_owned(), ins[1].shape().last().copied().unwrap_or(0))
    };
    let none = |t: &Tensor, what: &str| format!("{what}: {} expert weights have no CPU kernel", t.dtype());
    let gu_w = gu.as_dense().ok_or_else(|| none(gu, "w_gate_up"))?;
    let down_w = down.as_dense().ok_or_else(|| none(down, "w_down"))?;
    let routes = route(&logits, tokens, routed, &a, dtype);
    let xv = x.to_f32();
    let mut y = vec![0f32; tokens * h];
    // Only the experts the weights hold (this rank's, under expert parallelism), local index e.
    let offset = a.expert_offset.unwrap_or(0);
    for (e, list) in routes[offset..offset + experts].iter().enumerate() {
        if list.is_empty() {
            continue;
        }
        let m = list.len();
        let mut xs = Vec::with_capacity(m * h);
        let scale_in = a.router == Router::Sigmoid;
        for &(t, wt) in list {
            let row = &xv[t * h..(t + 1) * h];
            if scale_in {
                xs.extend(row.iter().map(|&v| round_as(dtype, v * wt)));
            } else {
                xs.extend_from_slice(row);
            }
        }
        let mut g = vec![0f32; m * 2 * inter];
        let w = gu_w.range(e * 2 * inter * h, 2 * inter * h);
        autodeploy_kernels::dense::dense_linear(opts.cpu, m, 2 * inter, h, &xs, w, None, &mut g);
        let mut act = vec![0f32; m * inter];
        for r in 0..m {
            for j in 0..inter {
                let (gv, uv) = (round_as(dtype, g[r * 2 * inter + j]), round_as(dtype, g[r * 2 * inter + inter + j]));
                act[r * inter + j] = round_as(dtype, round_as(dtype, gate_act(a.act, gv)) * uv);
            }
        }
        let mut d = vec![0f32; m * h];
        let w = down_w.range(e * h * inter, h * inter);
        autodeploy_kernels::dense::dense_linear(opts.cpu, m, h, inter, &act, w, None, &mut d);
        for (r, &(t, wt)) in list.iter().enumerate() {
            let wt = if scale_in { 1.0 } else { wt };
            for j in 0..h {
                let contrib = round_as(dtype, round_as(dtype, d[r * h + j]) * wt);
                let acc = &mut y[t * h + j];
                *acc = round_as(dtype, *acc + contrib);
            }
        }
    }
    Ok(vec![Tensor::from_f32_as(outs[0].0, outs[0].1.clone(), y).map_err(|e| e.to_string())?])
}

/// The sizes of a call with inputs of these shapes (`second` the logits', or with
/// `router_weight` the router weight's).
fn moe_shape(a: &Moe, x: &[usize], second: &[usize], gate_up: &[usize]) -> MoeShape {
    let hidden = gate_up.get(2).copied().unwrap_or(1);
    MoeShape {
        tokens: x.iter().product::<usize>() / hidden.max(1),
        experts: gate_up.first().copied().unwrap_or(0),
        routed: if a.router_weight { second.first() } else { second.last() }.copied().unwrap_or(0),
        offset: a.expert_offset.unwrap_or(0),
        top_k: a.top_k,
        hidden,
        inter: gate_up.get(1).copied().unwrap_or(0) / 2,
        norm: a.norm,
        weights_f32: a.weights_f32,
        act: a.act,
        sigmoid: a.router == Router::Sigmoid,
    }
}

fn moe_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let a = Moe::parse(attrs)?;
        let (x, logits, gu, down, y) = (&ins[0], &ins[1], &ins[2], &ins[3], &outs[0]);
        if [gu, down, y].iter().any(|t| t.dtype != x.dtype) {
            return Err(format!(
                "x, the expert weights and the output must share one dtype ({} vs {})",
                gu.dtype, x.dtype
            ));
        }
        let shape = moe_shape(&a, &x.shape, &logits.shape, &gu.shape);
        let regions = 5 + usize::from(a.router_weight);
        let scratch = (0..regions)
            .map(|i| l.scratch(i).ok_or_else(|| format!("scratch region {i} was not planned")))
            .collect::<Result<Vec<_>, _>>()?;
        let d = cuda_dt(x.dtype)?;
        let router = match a.router_weight {
            true => RouterIn::Weight(logits.ptr),
            false => RouterIn::Logits(logits.ptr, cuda_dt(logits.dtype)?),
        };
        gpu_of(l)?.moe(&shape, d, x.ptr, router, gu.ptr, down.ptr, y.ptr, &scratch).map_err(|e| e.0)
    })
}

/// The routing, activations, scaled outputs and grouping (`MoeShape::scratch`).
fn moe_scratch(ins: &[(DType, Vec<usize>)], attrs: &str) -> Vec<usize> {
    match Moe::parse(attrs) {
        Ok(a) => moe_shape(&a, &ins[0].1, &ins[1].1, &ins[2].1).scratch(ins[0].0.size_in_bytes(), a.router_weight),
        Err(_) => Vec::new(),
    }
}

/// The MoE op as an op-table entry.
pub fn ops() -> Vec<CustomOp> {
    vec![CustomOp {
        cuda: Some(moe_cuda()),
        cuda_scratch: Some(moe_scratch),
        ..CustomOp::built_in(
            MOE,
            4,
            Outputs::Rule(Arc::new(moe_rule)),
            |a| Moe::parse(a).map(|_| ()),
            Arc::new(moe_cpu),
        )
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(top_k: usize, norm: bool) -> Moe {
        Moe {
            top_k,
            norm,
            act: GateAct::Silu,
            weights_f32: false,
            router: Router::Softmax,
            expert_offset: None,
            router_weight: false,
        }
    }

    #[test]
    fn routing_picks_the_largest_probabilities_and_normalises_them() {
        // Token 0 prefers experts 2 then 0; token 1 has a tie between 1 and 3 (lower index wins).
        let logits = [1.0, -1.0, 2.0, 0.0, 0.0, 1.0, -2.0, 1.0];
        let r = route(&logits, 2, 4, &attrs(2, true), DType::F32);
        let p0 = [1f32.exp(), (-1f32).exp(), 2f32.exp(), 1.0];
        let s0: f32 = p0.iter().sum();
        assert_eq!(r[2][0].0, 0);
        assert!((r[2][0].1 - p0[2] / (p0[0] + p0[2])).abs() < 1e-6);
        assert!((r[0][0].1 - p0[0] / (p0[0] + p0[2])).abs() < 1e-6);
        assert_eq!(r[1], vec![(1, 0.5)]);
        assert_eq!(r[3], vec![(1, 0.5)]);
        let u = route(&logits, 2, 4, &attrs(2, false), DType::F32);
        assert!((u[2][0].1 - p0[2] / s0).abs() < 1e-6, "{u:?}");
    }

    #[test]
    fn one_expert_chosen_is_a_swiglu_mlp_scaled_by_its_probability() {
        // 2 experts, hidden 2, inter 1; logits make expert 1 the choice.
        let x = Tensor::from_f32(vec![1, 2], vec![0.5, -1.0]).unwrap();
        let logits = Tensor::from_f32(vec![1, 2], vec![0.0, 1.0]).unwrap();
        let gu = Tensor::from_f32(vec![2, 2, 2], vec![9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0, -1.0]).unwrap();
        let down = Tensor::from_f32(vec![2, 2, 1], vec![7.0, 7.0, 2.0, -3.0]).unwrap();
        let outs = [(DType::F32, vec![1, 2])];
        let y =
            moe_cpu(&[&x, &logits, &gu, &down], "top_k=1, norm=false, act=silu", &outs, &Default::default()).unwrap();
        let (g, u): (f32, f32) = (0.5 - 2.0, 0.5 * 3.0 + 1.0);
        let h = g / (1.0 + (-g).exp()) * u;
        let p = 1f32.exp() / (1.0 + 1f32.exp());
        let want = [2.0 * h * p, -3.0 * h * p];
        let got = y[0].to_f32();
        assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?} vs {want:?}");
        // With norm, the one chosen weight is 1.
        let y =
            moe_cpu(&[&x, &logits, &gu, &down], "top_k=1, norm=true, act=silu", &outs, &Default::default()).unwrap();
        let got = y[0].to_f32();
        assert!((got[0] - 2.0 * h).abs() < 1e-5 && (got[1] + 3.0 * h).abs() < 1e-5, "{got:?}");
    }

    #[test]
    fn sigmoid_routing_scales_the_experts_input_by_the_sigmoid_of_the_top_logit() {
        // Llama 4's: expert 1 has the larger logit (2.0); its weight sigmoid(2) scales x before
        // the expert, and the output is not scaled again. In bf16 the scaled input is rounded.
        let x = Tensor::from_f32(vec![1, 2], vec![0.5, -1.0]).unwrap();
        let logits = Tensor::from_f32(vec![1, 2], vec![-3.0, 2.0]).unwrap();
        let gu = Tensor::from_f32(vec![2, 2, 2], vec![9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0, -1.0]).unwrap();
        let down = Tensor::from_f32(vec![2, 2, 1], vec![7.0, 7.0, 2.0, -3.0]).unwrap();
        let outs = [(DType::F32, vec![1, 2])];
        let attrs = "top_k=1, norm=false, act=silu, router=sigmoid";
        assert_eq!(Moe::parse(attrs).unwrap().text(), attrs);
        let y = moe_cpu(&[&x, &logits, &gu, &down], attrs, &outs, &Default::default()).unwrap();
        let w = 1.0 / (1.0 + (-2f32).exp());
        let (x0, x1) = (0.5 * w, -w);
        let (g, u) = (x0 + 2.0 * x1, 3.0 * x0 - x1);
        let h = g / (1.0 + (-g).exp()) * u;
        let want = [2.0 * h, -3.0 * h];
        let got = y[0].to_f32();
        assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?} vs {want:?}");
        // Ties go to the lower index, and the weight is rounded to the dtype.
        let r = route(&[1.0, 1.0, 0.0], 1, 3, &Moe::parse(attrs).unwrap(), DType::BF16);
        assert_eq!(r[0], vec![(0, round_as(DType::BF16, 1.0 / (1.0 + (-1f32).exp())))]);
        assert!(r[1].is_empty() && r[2].is_empty());
        assert!(Moe::parse("top_k=1, norm=false, act=silu, router=relu").unwrap_err().contains("`router`"));
    }

    #[test]
    fn bad_operands_and_attributes_are_named() {
        use crate::shape::static_shape;
        let m = |s: &[usize]| TensorMeta { dtype: DType::F32, shape: static_shape(s) };
        let ok = [m(&[3, 8]), m(&[3, 4]), m(&[4, 6, 8]), m(&[4, 8, 3])];
        assert_eq!(moe_rule(&ok, "top_k=2, norm=true, act=silu").unwrap()[0], ok[0]);
        let e = moe_rule(&ok, "top_k=5, norm=true, act=silu").unwrap_err();
        assert!(e.contains("top_k=5"), "{e}");
        let bad_down = [m(&[3, 8]), m(&[3, 4]), m(&[4, 6, 8]), m(&[4, 8, 4])];
        assert!(moe_rule(&bad_down, "top_k=2, norm=true, act=silu").unwrap_err().contains("inconsistent"));
        let bad_logits = [m(&[3, 8]), m(&[3, 5]), m(&[4, 6, 8]), m(&[4, 8, 3])];
        assert!(moe_rule(&bad_logits, "top_k=2, norm=true, act=silu").is_err());
        assert!(Moe::parse("top_k=2, norm=true, act=relu").unwrap_err().contains("`act`"));
        assert!(Moe::parse("top_k=2, act=silu").unwrap_err().contains("`norm` is missing"));
    }
}
