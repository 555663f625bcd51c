//! `torch`: the CPU reference attention over the paged KV cache (AutoDeploy's name for its
//! reference backend). Handles a ragged batch of sequences in one call: prefill of several
//! prompts, single-token decode, or a mix.

use autodeploy_core::cpu::round_as;
use autodeploy_core::error::{Error, Result};
use autodeploy_core::kvcache::{AttentionBackend, AttentionBackendPlugin, StepContext};
use autodeploy_core::Tensor;
use autodeploy_kernels::cpu::dot;
use rayon::prelude::*;

pub struct TorchCpuAttention;

autodeploy_core::inventory::submit! {
    AttentionBackendPlugin { name: "torch", aliases: &["cpu"], version: env!("CARGO_PKG_VERSION"), make: || Box::new(TorchCpuAttention) }
}

impl AttentionBackend for TorchCpuAttention {
    fn attend(
        &self,
        layer: usize,
        scale: f32,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cx: &mut StepContext,
    ) -> Result<Tensor> {
        let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
        let [_, heads, tokens, dim] = qs[..] else {
            return Err(Error::op("torch_attention_with_kv_cache", "q must be 4-D"));
        };
        let kv_heads = ks[1];
        let lc = cx
            .cache
            .spec
            .layers
            .get(layer)
            .cloned()
            .ok_or_else(|| Error::op("torch_attention_with_kv_cache", format!("layer {layer} has no cache")))?;
        if lc.kv_heads != kv_heads || lc.head_dim != dim || vs[3] != dim || ks[2] != tokens {
            return Err(Error::op(
                "torch_attention_with_kv_cache",
                format!(
                    "layer {layer}: q {qs:?}, k {ks:?}, v {vs:?} do not fit the cache ({} kv heads of {})",
                    lc.kv_heads, lc.head_dim
                ),
            ));
        }
        let plan = cx.plan;
        if plan.token_seq.len() != tokens {
            return Err(Error::op(
                "torch_attention_with_kv_cache",
                format!("step has {tokens} tokens but the batch metadata describes {}", plan.token_seq.len()),
            ));
        }
        let group = heads / kv_heads;
        let (kc, vc) = cx.cache.layer_mut(layer);
        let (kv, vv) = (k.to_f32(), v.to_f32());
        // Write this step's keys and values: cache layout [slot, kv_head, dim].
        for t in 0..tokens {
            let slot = plan.slot(plan.token_seq[t], plan.token_pos[t]);
            for h in 0..kv_heads {
                let src = (h * tokens + t) * dim;
                let dst = (slot * kv_heads + h) * dim;
                kc[dst..dst + dim].copy_from_slice(&kv[src..src + dim]);
                vc[dst..dst + dim].copy_from_slice(&vv[src..src + dim]);
            }
        }
        let (kc, vc) = (&*kc, &*vc);
        let qv = q.to_f32();
        let mut out = vec![0f32; heads * tokens * dim];
        // Rows of `out` are (head, token); each attends to its sequence's positions 0..=pos.
        out.par_chunks_mut(dim).enumerate().for_each_init(Vec::new, |scores, (row, o)| {
            let (h, t) = (row / tokens, row % tokens);
            let (s, pos) = (plan.token_seq[t], plan.token_pos[t]);
            let kvh = h / group;
            let qrow = &qv[row * dim..(row + 1) * dim];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..=pos {
                let at = (plan.slot(s, j) * kv_heads + kvh) * dim;
                let x = dot(qrow, &kc[at..at + dim]) * scale;
                max = max.max(x);
                scores.push(x);
            }
            let mut sum = 0.0f32;
            for x in scores.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            o.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let at = (plan.slot(s, j) * kv_heads + kvh) * dim;
                for (oo, vvv) in o.iter_mut().zip(&vc[at..at + dim]) {
                    *oo += p * vvv;
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x = round_as(q.dtype(), *x * inv));
        });
        Tensor::from_f32_as(q.dtype(), vec![1, heads, tokens, dim], out)
    }
}
