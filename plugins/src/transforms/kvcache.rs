//! Cache insertion (stage `cache_init`): every causal attention becomes the configured backend's
//! cached-attention op, tokens of all sequences are flattened into one `[1, tokens]` batch, and
//! the logits are gathered at the positions the runtime asks for before the LM head.

use autodeploy_core::error::{Error, Result};
use autodeploy_core::ir::{Graph, TensorMeta};
use autodeploy_core::registry::attention_backend_name;
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::shape::{Dim, SymRange};
use autodeploy_core::transform::{Transform, TransformContext};
use autodeploy_core::{DType, Op};
use autodeploy_sdk::Stage;

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "insert_cached_attention",
        stage: Stage::CacheInit,
        order: 10,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        make: || Box::new(InsertCachedAttention),
    }
}

pub use autodeploy_core::runtime::GATHER_INPUT;

pub struct InsertCachedAttention;

impl Transform for InsertCachedAttention {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        let backend = attention_backend_name(&cx.config.attn_backend)?;
        // Every attention must be one we can cache; otherwise the graph stays uncached (correct,
        // slower) and we say which node stopped us.
        let blockers: Vec<String> = g
            .nodes
            .iter()
            .filter(|n| match n.op {
                Op::Attention { causal, .. } => !causal,
                Op::Sdpa { .. } | Op::Softmax { .. } => true,
                _ => false,
            })
            .map(|n| format!("%{} ({})", g.value(n.outputs[0]).name, n.op.name()))
            .collect();
        if !blockers.is_empty() {
            tracing::warn!(
                "cache_init: attention not recognised at {}; the graph stays uncached (full recompute each step)",
                blockers.join(", ")
            );
            return Ok(format!("kept uncached: unrecognised attention at {}", blockers.join(", ")));
        }
        let mut layer = 0;
        for i in 0..g.nodes.len() {
            if let Op::Attention { scale, .. } = g.nodes[i].op {
                g.nodes[i].op = Op::CachedAttention { backend: backend.to_string(), layer, scale, rope: false };
                layer += 1;
            }
        }
        if layer == 0 {
            return Ok("no attention found; graph unchanged".into());
        }
        // Gather the hidden states of the requested tokens before the LM head.
        let out = *g.outputs.first().ok_or_else(|| Error::Msg("graph has no output".into()))?;
        let head = g.producer(out).filter(|&i| matches!(g.nodes[i].op, Op::Linear));
        let Some(head) = head else {
            return Err(Error::Msg(format!(
                "cache_init: graph output %{} is not produced by a linear (LM head)",
                g.value(out).name
            )));
        };
        let max_tokens = cx.config.max_num_tokens();
        g.symbols.insert("gather".into(), SymRange { min: 1, max: max_tokens });
        // `seq` now counts the flattened tokens of a step; the per-sequence bound moves to `seq_len`.
        if let Some(r) = g.symbols.get_mut("seq") {
            let per_seq = *r;
            r.max = max_tokens;
            g.symbols.insert("seq_len".into(), per_seq);
        }
        // All sequences of a step travel as one flattened row.
        g.specialize("batch", 1);
        let idx = g.add_input(GATHER_INPUT, TensorMeta { dtype: DType::I64, shape: vec![Dim::sym("gather")] });
        let hidden = g.nodes[head].inputs[0];
        let gathered = g.insert_node(head, "gathered", Op::IndexSelect { dim: 1 }, &[hidden, idx])?;
        g.nodes[head + 1].inputs[0] = gathered;
        let new_meta = autodeploy_core::ops::infer(
            &Op::Linear,
            &g.nodes[head + 1].inputs.iter().map(|&v| g.meta(v).clone()).collect::<Vec<_>>(),
        )?;
        g.values[out.0 as usize].meta = new_meta[0].clone();
        Ok(format!("inserted {layer} cached attention ({backend}); logits gathered before the LM head"))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_rope_attention",
        stage: Stage::Compile,
        order: 10,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        make: || Box::new(FuseRopeAttention),
    }
}

/// The compile backends that fuse kernels (AutoDeploy's `torch-compile` and `torch-opt`).
const FUSING_BACKENDS: [&str; 2] = ["compile", "opt"];

/// RoPE into cached attention (stage `compile`, for the fusing compile backends): the RoPEs of a
/// cached attention's q and k, read by nothing else and sharing one cos/sin table, become part of
/// the attention op (`rope=true`, inputs `q, k, v, cos, sin`), which the CUDA executor runs as one
/// kernel that rotates q and k, writes the cache and attends. Not for `triton`, whose kernel
/// reads this step's rotated k and v itself.
pub struct FuseRopeAttention;

impl Transform for FuseRopeAttention {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        let backend = autodeploy_core::registry::compile_backend_name(&cx.config.compile_backend)?;
        if !FUSING_BACKENDS.contains(&backend) {
            return Ok(format!(
                "compile_backend `{backend}` runs RoPE and attention apart (only compile and opt fuse)"
            ));
        }
        let producers = g.producers();
        let uses = g.use_counts();
        let rope_of = |v: autodeploy_core::ValueId| {
            producers[v.0 as usize].filter(|&p| {
                matches!(g.nodes[p].op, Op::Rope { interleaved: false })
                    && uses[v.0 as usize] == 1
                    && !g.outputs.contains(&v)
            })
        };
        let mut fused = Vec::new();
        for (j, node) in g.nodes.iter().enumerate() {
            let Op::CachedAttention { backend, rope: false, .. } = &node.op else { continue };
            if backend == "triton" {
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
            if let Op::CachedAttention { rope, .. } = &mut g.nodes[j].op {
                *rope = true;
            }
            g.nodes[j].inputs = inputs;
        }
        let removed = g.dce();
        Ok(format!("fused the q/k RoPEs into {n} cached attentions ({removed} nodes removed)"))
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
        make: || Box::new(FuseSwigluEpilogue),
    }
}

/// SwiGLU into the gate/up GEMV (stage `compile`, for the fusing compile backends): every fused
/// SwiGLU MLP (gate and up one weight) is marked `epilogue=true`, and the CUDA executor computes
/// a single row's silu(gate)·up inside the gate/up GEMV instead of a kernel after it.
pub struct FuseSwigluEpilogue;

impl Transform for FuseSwigluEpilogue {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        let backend = autodeploy_core::registry::compile_backend_name(&cx.config.compile_backend)?;
        if !FUSING_BACKENDS.contains(&backend) {
            return Ok(format!(
                "compile_backend `{backend}` runs the SwiGLU activation apart (only compile and opt fuse)"
            ));
        }
        let mut n = 0;
        for node in &mut g.nodes {
            if let Op::SwiGluMlp { fused: true, epilogue } = &mut node.op {
                *epilogue = true;
                n += 1;
            }
        }
        Ok(format!("marked {n} SwiGLU MLPs for the gate/up GEMV epilogue"))
    }
}
