//! Kernel fusions as graph rewrites (stage `compile`, for the compile backends that fuse:
//! `compile` and `opt`, AutoDeploy's `torch-compile` and `torch-opt`). Each makes a canonical
//! fused op the executors run as one kernel, so `autodeploy graph --stage compile` prints what
//! runs; each can be switched off in `[transforms.<name>]` (`enabled = false`) and the graph
//! then computes the same numbers through the unfused ops.

use autodeploy_core::dtype::DType;
use autodeploy_core::error::Result;
use autodeploy_core::ir::Graph;
use autodeploy_core::ops::attention::CachedAttn;
use autodeploy_core::ops::binary::{ADD, MUL};
use autodeploy_core::ops::gated_act::GatedAct;
use autodeploy_core::ops::linear::{GateAct, SwiGlu, LINEAR};
use autodeploy_core::ops::moe::Moe;
use autodeploy_core::ops::norm::{NormAttrs, ADD_RMSNORM, RMSNORM};
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::transform::{Transform, TransformContext};
use autodeploy_core::Op;
use autodeploy_core::ValueId;
use autodeploy_sdk::Stage;

/// `Some(why)` when the configured compile backend does not fuse (registered without `fuses`:
/// the transform then leaves the graph alone and says so in the history).
fn not_fusing(cx: &TransformContext, what: &str) -> Result<Option<String>> {
    let backend = autodeploy_core::registry::compile_backend_name(&cx.config.compile_backend)?;
    Ok((!autodeploy_core::registry::compile_backend_fuses(backend)?)
        .then(|| format!("compile_backend `{backend}` {what} (only compile and opt fuse)")))
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_rope_attention",
        stage: Stage::Compile,
        order: 10,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(FuseRopeAttention),
    }
}

/// RoPE into cached attention (stage `compile`, for the fusing compile backends): the RoPEs of a
/// cached attention's q and k, read by nothing else and sharing one cos/sin table, become part of
/// the attention op (`rope=true`, inputs `q, k, v, cos, sin`), which the CUDA executor runs as one
/// kernel that rotates q and k, writes the cache and attends. Only for backends registered with
/// `fuses_rope` (`flashinfer`, `torch`; not `triton`, whose kernel reads this step's rotated k
/// and v itself, nor libraries').
pub struct FuseRopeAttention;

impl Transform for FuseRopeAttention {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        if let Some(skip) = not_fusing(cx, "runs RoPE and attention apart")? {
            return Ok(skip);
        }
        let producers = g.producers();
        let uses = g.use_counts();
        let rope_of = |v: autodeploy_core::ValueId| {
            producers[v.0 as usize].filter(|&p| {
                g.nodes[p].op.rope_interleaved() == Some(false) && uses[v.0 as usize] == 1 && !g.outputs.contains(&v)
            })
        };
        let mut fused = Vec::new();
        for (j, node) in g.nodes.iter().enumerate() {
            let Some(CachedAttn { backend, rope: false, fp8_out: false, .. }) = node.op.cached_attention_of() else {
                continue;
            };
            if !autodeploy_core::registry::attention_backend_fuses_rope(&backend) {
                continue;
            }
            if let (Some(rq), Some(rk)) = (rope_of(node.inputs[0]), rope_of(node.inputs[1])) {
                let (a, b) = (&g.nodes[rq].inputs, &g.nodes[rk].inputs);
                if a[1..] == b[1..] {
                    fused.push((j, vec![a[0], b[0], node.inputs[2], a[1], a[2]]));
                }
            }
        }
        let n = fused.len();
        for (j, inputs) in fused {
            if let Some(a) = g.nodes[j].op.cached_attention_of() {
                g.nodes[j].op = Op::cached_attention(&CachedAttn { rope: true, ..a });
            }
            g.nodes[j].inputs = inputs;
        }
        let removed = g.dce();
        Ok(format!("fused the q/k RoPEs into {n} cached attentions ({removed} nodes removed)"))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_qk_norm_attention",
        stage: Stage::Compile,
        order: 12,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(FuseQkNormAttention),
    }
}

/// The q/k RMSNorms into a RoPE-fused cached attention (stage `compile`, after
/// `fuse_rope_attention`): where q and k each come from a `torch_rmsnorm` over the head dim
/// (optionally through the transpose to heads-major), read by nothing else, with equal
/// attributes, in the model's dtype (weights too, the norm rounded to it), the op takes the
/// norms' inputs and weights (`qk_norm_eps`, `qk_norm_dtype`; inputs `q, k, v, cos, sin,
/// q_norm_w, k_norm_w`) and computes the same numbers; the CUDA executor's RoPE kernels then
/// normalise each head row too (the q/k norms of Qwen3, Qwen3-MoE, OpenELM, Llama 4, and Gemma 3
/// in f32: two launches a layer fewer).
pub struct FuseQkNormAttention;

impl Transform for FuseQkNormAttention {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        if let Some(skip) = not_fusing(cx, "runs the q/k norms apart")? {
            return Ok(skip);
        }
        let producers = g.producers();
        let uses = g.use_counts();
        let private = |v: ValueId| uses[v.0 as usize] == 1 && !g.outputs.contains(&v);
        // The norm behind attention input `v`: (the transpose node between them, if any, the
        // norm's input, its weight, its attributes).
        let norm_behind = |v: ValueId| -> Option<(Option<usize>, ValueId, ValueId, NormAttrs)> {
            let mut at = v;
            let mut via = None;
            let p = producers[at.0 as usize]?;
            if let Some((a, b)) = g.nodes[p].op.transpose_dims() {
                let rank = g.meta(v).shape.len() as i64;
                let last = |d: i64| d == -1 || d == rank - 1;
                if last(a) || last(b) || !private(at) {
                    return None;
                }
                via = Some(p);
                at = g.nodes[p].inputs[0];
            }
            let n = producers[at.0 as usize]?;
            let attrs = g.nodes[n].op.norm_attrs(RMSNORM).filter(|a| !a.fp8_out)?;
            let (x, w) = (g.nodes[n].inputs[0], g.nodes[n].inputs[1]);
            let dt = g.meta(x).dtype;
            let same = g.meta(at).dtype == dt && g.meta(w).dtype == dt && attrs.norm_dtype == dt;
            (private(at) && same).then_some((via, x, w, attrs))
        };
        let mut fused = Vec::new();
        for (j, node) in g.nodes.iter().enumerate() {
            let Some(a @ CachedAttn { rope: true, qk_norm: None, fp8_out: false, .. }) = node.op.cached_attention_of()
            else {
                continue;
            };
            if let (Some(q), Some(k)) = (norm_behind(node.inputs[0]), norm_behind(node.inputs[1])) {
                if q.3 == k.3 {
                    fused.push((j, a, q, k));
                }
            }
        }
        let n = fused.len();
        for (j, a, q, k) in fused {
            for (slot, (via, x, _, _)) in [(0, q), (1, k)] {
                match via {
                    Some(t) => g.nodes[t].inputs[0] = x,
                    None => g.nodes[j].inputs[slot] = x,
                }
            }
            g.nodes[j].inputs.extend([q.2, k.2]);
            g.nodes[j].op = Op::cached_attention(&CachedAttn { qk_norm: Some(q.3), ..a });
        }
        let removed = g.dce();
        Ok(format!("fused the q/k norms into {n} cached attentions ({removed} nodes removed)"))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_moe_router",
        stage: Stage::Compile,
        order: 15,
        enabled_by_default: false,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(FuseMoeRouter),
    }
}

/// The router's linear into the mixture-of-experts op (stage `compile`, for the fusing compile
/// backends): where a `torch_moe`'s router logits are an `aten.linear` (no bias) of the op's own
/// input, read by nothing else, the op takes the router's weight instead (`router_weight=true`)
/// and computes the same logits; on CUDA one kernel computes and routes them (bf16), where the
/// router GEMV and `moe_route` were two launches. Off by default: checked on an H100, but the
/// Qwen3-30B-A3B step was 1.2% slower with it (BENCHMARKS.md, session 34).
pub struct FuseMoeRouter;

impl Transform for FuseMoeRouter {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        if let Some(skip) = not_fusing(cx, "runs the router's linear apart")? {
            return Ok(skip);
        }
        let producers = g.producers();
        let uses = g.use_counts();
        let mut found = Vec::new();
        for (j, node) in g.nodes.iter().enumerate() {
            let Some(a) = node.op.moe_of().filter(|a| !a.router_weight) else { continue };
            let logits = node.inputs[1];
            let Some(p) =
                producers[logits.0 as usize].filter(|_| uses[logits.0 as usize] == 1 && !g.outputs.contains(&logits))
            else {
                continue;
            };
            let lin = &g.nodes[p];
            let (x, w) = (node.inputs[0], lin.inputs.get(1).copied());
            if lin.op.is(LINEAR) && lin.inputs.len() == 2 && lin.inputs[0] == x {
                if let Some(w) =
                    w.filter(|&w| g.meta(w).dtype == g.meta(x).dtype && g.meta(logits).dtype == g.meta(x).dtype)
                {
                    found.push((j, a, w));
                }
            }
        }
        let n = found.len();
        for (j, a, w) in found {
            g.nodes[j].op = Op::moe(Moe { router_weight: true, ..a });
            g.nodes[j].inputs[1] = w;
        }
        let removed = g.dce();
        g.validate()?;
        Ok(format!("fused the router's linear into {n} mixture-of-experts ops ({removed} nodes removed)"))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_swiglu_epilogue",
        stage: Stage::Compile,
        order: 20,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(FuseSwigluEpilogue),
    }
}

/// SwiGLU into the gate/up GEMV (stage `compile`, for the fusing compile backends): every fused
/// SwiGLU MLP (gate and up one weight) is marked `epilogue=true`, and the CUDA executor computes
/// a single row's silu(gate)·up inside the gate/up GEMV instead of a kernel after it.
pub struct FuseSwigluEpilogue;

impl Transform for FuseSwigluEpilogue {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        if let Some(skip) = not_fusing(cx, "runs the SwiGLU activation apart")? {
            return Ok(skip);
        }
        let mut n = 0;
        for node in &mut g.nodes {
            if let Some(s @ SwiGlu { fused: true, act: GateAct::Silu, .. }) = node.op.swiglu_of() {
                node.op = Op::swiglu(SwiGlu { epilogue: true, ..s });
                n += 1;
            }
        }
        Ok(format!("marked {n} SwiGLU MLPs for the gate/up GEMV epilogue"))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_add_rmsnorm",
        stage: Stage::Compile,
        order: 30,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(FuseAddRmsNorm),
    }
}

/// Residual add into the RMSNorm that reads it: `add(x, r)` whose result a `torch_rmsnorm`
/// normalises becomes one `fused_add_rmsnorm(x, r, w)` with two outputs, the normalised rows
/// and the sum the residual stream goes on with. Only where x and r have one dtype and shape
/// (the sum then has them too) and the norm's weight is defined before the add.
pub struct FuseAddRmsNorm;

impl Transform for FuseAddRmsNorm {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        if let Some(skip) = not_fusing(cx, "runs the residual add and RMSNorm apart")? {
            return Ok(skip);
        }
        let producers = g.producers();
        // (add node, norm node): each add fused into the first RMSNorm reading it.
        let mut pairs: Vec<(usize, usize)> = Vec::new();
        let mut taken = vec![false; g.nodes.len()];
        for (j, node) in g.nodes.iter().enumerate() {
            if !node.op.is(RMSNORM) {
                continue;
            }
            let Some(a) = producers[node.inputs[0].0 as usize] else { continue };
            let add = &g.nodes[a];
            let weight_before = producers[node.inputs[1].0 as usize].is_none_or(|p| p < a);
            if add.op.is(ADD)
                && !taken[a]
                && g.meta(add.inputs[0]) == g.meta(add.inputs[1])
                && g.meta(add.inputs[0]) == g.meta(add.outputs[0])
                && weight_before
            {
                taken[a] = true;
                pairs.push((a, j));
            }
        }
        for &(a, j) in &pairs {
            let Some(attrs) = g.nodes[j].op.norm_attrs(RMSNORM) else { continue };
            let (sum, normed, w) = (g.nodes[a].outputs[0], g.nodes[j].outputs[0], g.nodes[j].inputs[1]);
            let node = &mut g.nodes[a];
            node.op = Op::add_rmsnorm(attrs);
            node.inputs.push(w);
            node.outputs = vec![normed, sum];
        }
        let mut drop: Vec<usize> = pairs.iter().map(|p| p.1).collect();
        drop.sort_unstable();
        for j in drop.into_iter().rev() {
            g.nodes.remove(j);
        }
        g.validate()?;
        Ok(format!("fused {} residual adds into the RMSNorm reading them", pairs.len()))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_gated_act",
        stage: Stage::Compile,
        order: 35,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(FuseGatedAct),
    }
}

/// A gated MLP's activation as one op (stage `compile`, for the fusing compile backends), where
/// the MLP matchers left the MLP unfused (quantized linears): `mul(act(gate), up)`, `act`
/// `aten.silu` or `aten.gelu` read by the product alone, becomes `torch_gated_act(gate_up)` when
/// gate and up are the two halves of one tensor's last dim (the fused gate/up linear's output,
/// sliced), else `torch_gated_act(gate, up)`. It rounds where those ops do (the activation to
/// the dtype, then the product), so the numbers do not change; on CUDA it is one kernel instead
/// of two. On by default since a GPU run checked it with `fuse_fp8_input_quant` (BENCHMARKS.md,
/// session 34).
pub struct FuseGatedAct;

/// The gate/up tensor of which `g` is the first half and `u` the second along the last dim,
/// both plain slices read once.
fn halves_of(g: &Graph, producers: &[Option<usize>], uses: &[usize], gate: ValueId, up: ValueId) -> Option<ValueId> {
    let slice = |v: ValueId| {
        let p = producers[v.0 as usize].filter(|_| uses[v.0 as usize] == 1)?;
        let s = g.nodes[p].op.slice_of()?;
        let src = g.nodes[p].inputs[0];
        let rank = g.meta(src).shape.len() as i64;
        (s.step == 1 && (s.dim == -1 || s.dim == rank - 1)).then_some((src, s.start, s.end))
    };
    let ((src, g0, g1), (src_u, u0, u1)) = (slice(gate)?, slice(up)?);
    let width = g.meta(src).shape.last()?.as_static()? as i64;
    let u1 = u1.min(width);
    (src == src_u && g0 == 0 && 2 * g1 == width && u0 == g1 && u1 == width).then_some(src)
}

impl Transform for FuseGatedAct {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        if let Some(skip) = not_fusing(cx, "runs a gated MLP's activation and product apart")? {
            return Ok(skip);
        }
        let producers = g.producers();
        let uses = g.use_counts();
        let act_of = |op: &Op| match (op.name, op.attrs.as_str()) {
            ("aten.silu", "") => Some(GateAct::Silu),
            ("aten.gelu", "" | "approximate=none") => Some(GateAct::Gelu),
            ("aten.gelu", "approximate=tanh") => Some(GateAct::GeluTanh),
            _ => None,
        };
        // (product node, activation, inputs of the fused op).
        let mut found = Vec::new();
        for (j, node) in g.nodes.iter().enumerate() {
            if !node.op.is(MUL) || node.inputs.len() != 2 {
                continue;
            }
            for (a, u) in [(node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])] {
                let Some(p) = producers[a.0 as usize].filter(|_| uses[a.0 as usize] == 1 && !g.outputs.contains(&a))
                else {
                    continue;
                };
                let Some(act) = act_of(&g.nodes[p].op) else { continue };
                let gate = g.nodes[p].inputs[0];
                let same = [a, u, node.outputs[0]].iter().all(|&v| g.meta(v) == g.meta(gate));
                if !same || gate == u || !g.meta(gate).dtype.is_float() {
                    continue;
                }
                let inputs = match halves_of(g, &producers, &uses, gate, u) {
                    Some(gate_up) => vec![gate_up],
                    None => vec![gate, u],
                };
                found.push((j, act, inputs));
                break;
            }
        }
        let n = found.len();
        for (j, act, inputs) in found {
            g.nodes[j].op = Op::gated_act(GatedAct { act, fp8_out: false });
            g.nodes[j].inputs = inputs;
        }
        let removed = g.dce();
        g.validate()?;
        Ok(format!("made {n} gated activations one op ({removed} nodes removed)"))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_quant_gated_epilogue",
        stage: Stage::Compile,
        order: 37,
        enabled_by_default: false,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(FuseQuantGatedEpilogue),
    }
}

/// A quantized MLP's activation into the FP8 or NVFP4 gate/up linear before it (stage `compile`,
/// after `fuse_gated_act`, which makes the `torch_gated_act` it reads): where a
/// `torch_gated_act` (no `quant`) reads the whole output of one FP8 (over float inputs) or NVFP4
/// linear (the fused gate/up, read by nothing else),
/// the two become that linear with `act=<act>`, which outputs `act(gate) · up` rounded as the
/// two ops round it. On CUDA the decode GEMV computes each gate row beside its up row and writes
/// the product: one launch, and no `[.., 2·I]` tensor, instead of two. Before
/// `fuse_fp8_input_quant`, which then has an FP8 gate/up linear write the down projection's
/// input codes itself (`quant=fp8`: before, the down projection quantized its input). Off by
/// default: checked on an H100, 2.9% faster for FP8 at batch 1 alone but not on top of the
/// folds, and 5% slower for NVFP4 (BENCHMARKS.md, session 34).
pub struct FuseQuantGatedEpilogue;

impl Transform for FuseQuantGatedEpilogue {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        if let Some(skip) = not_fusing(cx, "runs a quantized MLP's activation after its gate/up linear")? {
            return Ok(skip);
        }
        let producers = g.producers();
        let uses = g.use_counts();
        let mut found = Vec::new();
        for (j, node) in g.nodes.iter().enumerate() {
            let Some(a) = node.op.gated_act_of().filter(|a| !a.fp8_out) else { continue };
            let [gate_up] = node.inputs[..] else { continue };
            let Some(p) = producers[gate_up.0 as usize]
                .filter(|_| uses[gate_up.0 as usize] == 1 && !g.outputs.contains(&gate_up))
            else {
                continue;
            };
            if let Some(op) = g.nodes[p].op.quant_linear_gated(a.act) {
                found.push((j, op, g.nodes[p].inputs.clone()));
            }
        }
        let n = found.len();
        for (j, op, inputs) in found {
            g.nodes[j].op = op;
            g.nodes[j].inputs = inputs;
        }
        let removed = g.dce();
        g.reinfer()?;
        g.validate()?;
        Ok(format!("made {n} quantized gate/up linears compute their gated activation ({removed} nodes removed)"))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_fp8_input_quant",
        stage: Stage::Compile,
        order: 40,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in (fp8 plugin)",
        make: || Box::new(FuseFp8InputQuant),
    }
}

/// The FP8 linears' activation quantization into the op before them (stage `compile`, for the
/// fusing compile backends): a `torch_rmsnorm`, `fused_add_rmsnorm`, `torch_gated_act` or FP8
/// gate/up linear with a gated epilogue (`fuse_quant_gated_epilogue`'s) whose
/// (first) output only FP8 linears with a static input scale read, as their input, all at equal
/// scales (ModelOpt's q/k/v and gate/up after `fuse_gemms`, its down projection), gets
/// `quant=fp8` and that scale, and writes E4M3 codes; the linears become
/// `torch_quant_fp8_linear(out=<dtype>)` over the codes. The codes are the ones each linear made
/// of the op's rounded output, so the numbers do not change; on CUDA the linears' quantizing
/// launches go (the GEMV stages the codes, cuBLASLt reads them) and the op writes a byte a value
/// instead of two. On by default since a GPU run checked and timed it (FP8 offline +32% on an
/// H100, BENCHMARKS.md session 34).
pub struct FuseFp8InputQuant;

/// `op` with `quant=fp8`, if it is one that can write codes and does not yet.
fn with_codes_out(op: &Op) -> Option<Op> {
    for name in [RMSNORM, ADD_RMSNORM] {
        if let Some(a) = op.norm_attrs(name).filter(|a| !a.fp8_out) {
            let quant = NormAttrs { fp8_out: true, ..a };
            return Some(if name == RMSNORM { Op::rmsnorm(quant) } else { Op::add_rmsnorm(quant) });
        }
    }
    if let Some(a) = op.gated_act_of().filter(|a| !a.fp8_out) {
        return Some(Op::gated_act(GatedAct { fp8_out: true, ..a }));
    }
    op.fp8_linear_gated_codes()
}

/// Readers of each value of `g`: (node, input position).
fn readers_at(g: &Graph) -> Vec<Vec<(usize, usize)>> {
    let mut readers: Vec<Vec<(usize, usize)>> = vec![Vec::new(); g.values.len()];
    for (j, node) in g.nodes.iter().enumerate() {
        for (p, v) in node.inputs.iter().enumerate() {
            readers[v.0 as usize].push((j, p));
        }
    }
    readers
}

/// The input scale `users` share, where every one is a static-scale FP8 linear reading the
/// value as its input and their scales hold equal values (so one set of codes serves them all).
fn shared_fp8_scale(g: &Graph, users: &[(usize, usize)]) -> Result<Option<ValueId>> {
    let fp8_reader = |&(l, p): &(usize, usize)| p == 0 && g.nodes[l].op.fp8_linear_of() == Some(false);
    if users.is_empty() || !users.iter().all(fp8_reader) {
        return Ok(None);
    }
    let scale = g.nodes[users[0].0].inputs[2];
    let first = super::fusion::values(g, scale)?;
    for &(l, _) in &users[1..] {
        if super::fusion::values(g, g.nodes[l].inputs[2])? != first {
            return Ok(None);
        }
    }
    Ok(Some(scale))
}

/// Node `j` becomes `op` (writing codes) with `scale` as its last input, and `linears` read
/// its codes (`out=<dtype>`, `dtype` the node's plain output dtype).
fn write_codes(g: &mut Graph, j: usize, op: Op, dtype: DType, scale: ValueId, linears: &[(usize, usize)]) {
    g.nodes[j].op = op;
    g.nodes[j].inputs.push(scale);
    for &(l, _) in linears {
        if let Some(op) = g.nodes[l].op.fp8_linear_over_codes(dtype) {
            g.nodes[l].op = op;
        }
    }
}

impl Transform for FuseFp8InputQuant {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        if let Some(skip) = not_fusing(cx, "quantizes the FP8 linears' inputs in the linears")? {
            return Ok(skip);
        }
        let readers = readers_at(g);
        // (node, its plain output dtype, the input scale, the linears).
        let mut folds = Vec::new();
        for (j, node) in g.nodes.iter().enumerate() {
            if with_codes_out(&node.op).is_none() {
                continue;
            }
            let out = node.outputs[0];
            let dtype = g.meta(out).dtype;
            if g.outputs.contains(&out) || !matches!(dtype, DType::F32 | DType::BF16) {
                continue;
            }
            let users = &readers[out.0 as usize];
            if let Some(scale) = shared_fp8_scale(g, users)? {
                folds.push((j, dtype, scale, users.clone()));
            }
        }
        let (mut norms, mut acts, mut epilogues) = (0, 0, 0);
        for (j, dtype, scale, linears) in folds {
            // From the node's op as it is now: a gated gate/up linear may have become one over
            // its norm's codes (`out=`) since the list was made.
            let Some(op) = with_codes_out(&g.nodes[j].op) else { continue };
            let count = match op {
                _ if op.gated_act_of().is_some() => &mut acts,
                _ if op.norm_attrs(RMSNORM).is_some() || op.norm_attrs(ADD_RMSNORM).is_some() => &mut norms,
                _ => &mut epilogues,
            };
            *count += 1;
            write_codes(g, j, op, dtype, scale, &linears);
        }
        g.reinfer()?;
        g.validate()?;
        Ok(format!(
            "folded the FP8 input quantization into {norms} RMSNorms, {acts} gated activations and {epilogues} \
             gated FP8 linears"
        ))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_fp8_attention_out",
        stage: Stage::Compile,
        order: 41,
        enabled_by_default: false,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in (fp8 plugin)",
        make: || Box::new(FuseFp8AttentionOut),
    }
}

/// FP8 output of attention where the next GEMM wants it (stage `compile`, for the fusing
/// compile backends, after `fuse_fp8_input_quant`): a cached attention whose output reaches,
/// through layout ops alone (`aten.transpose.int`, `aten.reshape`, `aten.view`, each read once),
/// only FP8 linears with a static input scale as their input, all at equal scales (ModelOpt's
/// o_proj), gets `quant=fp8` and that scale and writes E4M3 codes; the layout ops move codes and
/// the linears become `torch_quant_fp8_linear(out=<dtype>)` over them. The codes are the ones
/// each linear made of the attention's rounded output, so the numbers do not change; on CUDA
/// the attention's values go to scratch and `e4m3_heads` writes their codes token-major (a
/// prefill's transposing copy becomes that launch). Off by default: checked on an H100, but 1%
/// slower at batch 1 and offline (BENCHMARKS.md, session 34): it pays only once the decode
/// kernels write the codes themselves.
pub struct FuseFp8AttentionOut;

impl Transform for FuseFp8AttentionOut {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        use autodeploy_core::ops::layout::{RESHAPE, TRANSPOSE, VIEW};
        if let Some(skip) = not_fusing(cx, "quantizes the attention output in the FP8 linears")? {
            return Ok(skip);
        }
        let readers = readers_at(g);
        let private = |v: ValueId| readers[v.0 as usize].len() == 1 && !g.outputs.contains(&v);
        // (attention node, its op with codes out, its dtype, the scale, the linears).
        let mut folds = Vec::new();
        for (j, node) in g.nodes.iter().enumerate() {
            let Some(a) = node.op.cached_attention_of().filter(|a| !a.fp8_out) else { continue };
            let dtype = g.meta(node.outputs[0]).dtype;
            if !matches!(dtype, DType::F32 | DType::BF16) {
                continue;
            }
            // Down the chain of layout ops to the value the linears read.
            let mut at = node.outputs[0];
            while private(at) {
                let (l, _) = readers[at.0 as usize][0];
                if ![TRANSPOSE, RESHAPE, VIEW].contains(&g.nodes[l].op.name()) {
                    break;
                }
                at = g.nodes[l].outputs[0];
            }
            if g.outputs.contains(&at) {
                continue;
            }
            let users = &readers[at.0 as usize];
            if let Some(scale) = shared_fp8_scale(g, users)? {
                let op = Op::cached_attention(&CachedAttn { fp8_out: true, ..a });
                folds.push((j, op, dtype, scale, users.clone()));
            }
        }
        let n = folds.len();
        for (j, op, dtype, scale, linears) in folds {
            write_codes(g, j, op, dtype, scale, &linears);
        }
        g.reinfer()?;
        g.validate()?;
        Ok(format!("made {n} cached attentions write the E4M3 codes their FP8 linears read"))
    }
}
