//! Cache insertion (stage `cache_init`): every causal attention becomes the configured backend's
//! cached-attention op, tokens of all sequences are flattened into one `[1, tokens]` batch, and
//! the logits are gathered at the positions the runtime asks for before the LM head.

use autodeploy_core::error::{Error, Result};
use autodeploy_core::ir::{Graph, TensorMeta};
use autodeploy_core::ops::attention::CachedAttn;
use autodeploy_core::ops::attention::{AttentionAttrs, SDPA};
use autodeploy_core::ops::linear::LINEAR;
use autodeploy_core::ops::reduce::SOFTMAX;
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::registry::{attention_backend_lacks, attention_backend_name};
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
        origin: "built-in",
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
            .filter(|n| match &n.op {
                op if op.is(SDPA) || op.is(SOFTMAX) => true,
                op => op.attention_attrs().is_some_and(|a| !a.causal),
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
        // Sliding windows, soft-caps and an FP8 cache need a backend that applies them on this
        // device.
        let device = cx.config.device.as_str();
        for n in &g.nodes {
            let Some(lacks) = n.op.attention_attrs().and_then(|a| attention_backend_lacks(backend, device, &a.scoring))
            else {
                continue;
            };
            return Err(Error::Msg(format!(
                "cache_init: attention %{} ({}) needs {lacks}, which attention backend `{backend}` does not apply on \
                 device `{device}` (attn_backend = \"{}\" does)",
                g.value(n.outputs[0]).name,
                n.op.attrs,
                if device == "cuda" { "flashinfer" } else { "torch" }
            )));
        }
        let mut layer = 0;
        for i in 0..g.nodes.len() {
            if let Some(AttentionAttrs { scale, scoring, .. }) = g.nodes[i].op.attention_attrs() {
                let backend = backend.to_string();
                g.nodes[i].op = Op::cached_attention(&CachedAttn {
                    backend,
                    layer,
                    scale,
                    rope: false,
                    qk_norm: None,
                    scoring,
                    fp8_out: false,
                });
                layer += 1;
            }
        }
        if layer == 0 {
            return Ok("no attention found; graph unchanged".into());
        }
        // Gather the hidden states of the requested tokens before the LM head.
        let out = *g.outputs.first().ok_or_else(|| Error::Msg("graph has no output".into()))?;
        // The LM head: the linear producing the output, or reached from it through one-input
        // ops that keep its shape (Granite's logits scaling) or its rows (a sharded head's
        // gather of the vocabulary's slices along the last dim).
        let mut tail = Vec::new();
        let mut at = g.producer(out);
        while let Some(i) = at.filter(|&i| !g.nodes[i].op.is(LINEAR)) {
            let n = &g.nodes[i];
            let (a, b) = (&g.meta(n.inputs[0]).shape, &g.meta(n.outputs[0]).shape);
            let rows = n.op.all_gather_of().is_some_and(|x| x.dim == -1 || x.dim + 1 == a.len() as i64)
                && a.len() == b.len()
                && a[..a.len() - 1] == b[..b.len() - 1];
            if n.inputs.len() != 1 || (a != b && !rows) {
                at = None;
                break;
            }
            tail.push(n.outputs[0]);
            at = g.producer(n.inputs[0]);
        }
        let Some(head) = at else {
            return Err(Error::Msg(format!(
                "cache_init: graph output %{} is not produced by a linear (LM head), alone or through shape-keeping \
                 one-input ops",
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
        let gathered = g.insert_node(head, "gathered", Op::index_select(1), &[hidden, idx])?;
        g.nodes[head + 1].inputs[0] = gathered;
        // The head's output and the ops after it now hold the gathered rows.
        let head_out = g.nodes[head + 1].outputs[0];
        for v in std::iter::once(head_out).chain(tail.into_iter().rev()) {
            let i = g.producer(v).expect("produced by a node");
            let ins: Vec<_> = g.nodes[i].inputs.iter().map(|&x| g.meta(x).clone()).collect();
            g.values[v.0 as usize].meta = autodeploy_core::ops::infer(&g.nodes[i].op, &ins)?.remove(0);
        }
        Ok(format!("inserted {layer} cached attention ({backend}); logits gathered before the LM head"))
    }
}
