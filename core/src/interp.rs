//! Running a graph node by node on the CPU kernels: what the `simple` compile backend's
//! interpreter and compile backends from plugin libraries (plugin_abi/) share.

use crate::cpu;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::kvcache::{AttentionBackend, StepContext};
use crate::ops::attention::CachedAttn;
use crate::ops::Op;
use crate::shape::Bindings;
use crate::tensor::Tensor;

/// Every weight the graph reads, loaded in the dtype the graph gives it and checked against its
/// shape: `(value id, tensor)`. `each(name)` is called before each load (for a progress bar).
pub fn load_params(graph: &Graph, mut each: impl FnMut(&str)) -> Result<Vec<(usize, Tensor)>> {
    let mut params = Vec::with_capacity(graph.params.len());
    for p in &graph.params {
        each(&p.weight);
        let meta = graph.meta(p.value);
        let t = graph.weights.load(&p.weight, meta.dtype)?;
        let want: Vec<usize> = meta.shape.iter().filter_map(|d| d.as_static()).collect();
        if want.len() != meta.shape.len() || t.shape() != want.as_slice() {
            return Err(Error::TensorShape {
                file: graph.weights.location(&p.weight).into(),
                name: p.weight.clone(),
                expected: want,
                found: t.shape().to_vec(),
            });
        }
        params.push((p.value.0 as usize, t));
    }
    Ok(params)
}

/// A forward's value table, indexed by value id: the graph inputs and the weights hold their
/// tensors (clones share storage), every other value nothing yet.
pub fn initial_values(g: &Graph, inputs: &[Tensor], params: &[(usize, Tensor)]) -> Vec<Option<Tensor>> {
    let mut slots: Vec<Option<Tensor>> = vec![None; g.values.len()];
    for (&v, t) in g.inputs.iter().zip(inputs) {
        slots[v.0 as usize] = Some(t.clone());
    }
    for (v, t) in params {
        slots[*v] = Some(t.clone());
    }
    slots
}

/// The dtypes and concrete shapes of node `i`'s outputs at `bind`, if every symbol is bound.
fn out_shapes(g: &Graph, i: usize, bind: &Bindings) -> Option<Vec<(crate::DType, Vec<usize>)>> {
    let n = &g.nodes[i];
    n.outputs.iter().map(|&o| Some((g.meta(o).dtype, crate::shape::eval_shape(&g.meta(o).shape, bind).ok()?))).collect()
}

/// Node `i` of `g` on `ins` (its inputs' values): cached attention through `attention` with the
/// step's plan and KV cache, every other op through the CPU kernels. Errors name the node.
pub fn eval_node(
    g: &Graph,
    i: usize,
    ins: &[&Tensor],
    bind: &Bindings,
    kernels: &cpu::KernelOptions,
    attention: Option<&dyn AttentionBackend>,
    step: Option<&mut StepContext>,
) -> Result<Vec<Tensor>> {
    let n = &g.nodes[i];
    let name = &g.value(n.outputs[0]).name;
    let cached = n.op.cached_attention_of();
    let res = match (&cached, attention, step) {
        (Some(a), Some(b), Some(cx)) => attend_cached(a, ins, bind, kernels, b, cx).map(|t| vec![t]),
        (Some(_), _, None) => Err(Error::Msg(
            "this graph has cached attention: forward needs a step context (batch metadata and KV cache)".into(),
        )),
        _ => match out_shapes(g, i, bind) {
            // The node's own output shapes at this step's sizes: the graph was checked with
            // them, so the shape rule need not run again (the kernel's outputs are checked).
            Some(outs) => crate::custom_op::eval(n.op.name, &n.op.attrs, ins, &outs, kernels),
            None => cpu::eval_outputs(&n.op, ins, bind, kernels),
        },
    };
    let out = res.map_err(|e| match e {
        Error::Shape { .. } => e.at_node(name),
        e => Error::Op { op: n.op.name().into(), msg: format!("node `{name}`: {e}") },
    })?;
    if kernels.debug_checks {
        let what = match &cached {
            Some(CachedAttn { backend, layer, .. }) => Some(format!(
                "attention backend `{backend}` ({}), layer {layer}",
                crate::registry::attention_backend_origin(backend)
            )),
            // A library's op (the built-in ones of the op table are the host's own kernels).
            None => {
                let (op, origin) =
                    (n.op.name, crate::registry::custom_op(n.op.name).map_or("unregistered", |c| c.origin));
                (origin != "built-in").then(|| format!("op `{op}` ({origin})"))
            }
        };
        if let Some(what) = what {
            for t in &out {
                crate::custom_op::check_output(&format!("{what} at node `{name}`"), &t.to_f32())?;
            }
        }
    }
    Ok(out)
}

/// Cached attention `a` on its inputs through backend `b`. RoPE (and the q/k norms) fused into
/// the op: q and k normalised and rotated here, so every backend (plugins included) sees what
/// the unfused graph gave it; `quant=fp8`: the backend's output made the E4M3 codes the op
/// defines.
fn attend_cached(
    a: &CachedAttn,
    ins: &[&Tensor],
    bind: &Bindings,
    kernels: &cpu::KernelOptions,
    b: &dyn AttentionBackend,
    cx: &mut StepContext,
) -> Result<Tensor> {
    let scores = a.scoring.scores(a.scale as f32, true);
    let out = if a.rope {
        let rot = Op::rope(false);
        let prep = |x: &Tensor, w: usize| -> Result<Tensor> {
            let normed = match a.qk_norm {
                Some(n) => Some(cpu::eval_with(&Op::rmsnorm(n), &[x, ins[w]], bind, kernels)?),
                None => None,
            };
            cpu::eval_with(&rot, &[normed.as_ref().unwrap_or(x), ins[3], ins[4]], bind, kernels)
        };
        let (q, k) = (prep(ins[0], 5)?, prep(ins[1], 6)?);
        b.attend(a.layer, scores, &q, &k, ins[2], cx)?
    } else {
        b.attend(a.layer, scores, ins[0], ins[1], ins[2], cx)?
    };
    match ins.last().filter(|_| a.fp8_out) {
        Some(scale) => {
            crate::ops::quant_linear::codes_out::codes(out.to_f32().into_owned(), out.dtype(), scale, out.shape())
                .map_err(Error::Msg)
        }
        None => Ok(out),
    }
}

/// Binds the symbols of the graph inputs' shapes from concrete inputs, checking every static
/// size, dtype and symbol range.
pub fn bind_inputs(g: &Graph, inputs: &[Tensor]) -> Result<Bindings> {
    if inputs.len() != g.inputs.len() {
        return Err(Error::Msg(format!("the graph takes {} inputs, got {}", g.inputs.len(), inputs.len())));
    }
    let mut bind = Bindings::new();
    for (&v, t) in g.inputs.iter().zip(inputs) {
        let info = g.value(v);
        let bad = |msg: String| Error::Input { input: info.name.clone(), msg };
        if t.dtype() != info.meta.dtype || t.rank() != info.meta.shape.len() {
            return Err(bad(format!("expected {}, got {}{:?}", info.meta, t.dtype(), t.shape())));
        }
        for (d, &n) in info.meta.shape.iter().zip(t.shape()) {
            if let [s] = d.symbols() {
                if d.as_static().is_none() && d.eval(&Bindings::from([(s.clone(), 1)]))? == 1 {
                    if let Some(&prev) = bind.get(s) {
                        if prev != n {
                            return Err(bad(format!("`{s}` is {n} here but {prev} in an earlier input")));
                        }
                    }
                    bind.insert(s.clone(), n);
                }
            }
        }
    }
    for (&v, t) in g.inputs.iter().zip(inputs) {
        let info = g.value(v);
        for (d, &n) in info.meta.shape.iter().zip(t.shape()) {
            if d.eval(&bind)? != n {
                return Err(Error::Input {
                    input: info.name.clone(),
                    msg: format!("size {n} where the graph wants {d}"),
                });
            }
        }
    }
    for (s, r) in &g.symbols {
        if let Some(&n) = bind.get(s) {
            if n < r.min || n > r.max {
                return Err(Error::Msg(format!("`{s}` = {n} is outside the supported range [{}, {}]", r.min, r.max)));
            }
        }
    }
    Ok(bind)
}
