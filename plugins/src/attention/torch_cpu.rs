//! `torch`: the CPU reference attention over the paged KV cache (AutoDeploy's name for its
//! reference backend). Handles a ragged batch of sequences in one call: prefill of several
//! prompts, single-token decode, or a mix.

use autodeploy_core::cpu::round_as;
use autodeploy_core::error::{Error, Result};
use autodeploy_core::kvcache::{AttentionBackend, StepContext};
use autodeploy_core::mutation::{self, Mutation};
use autodeploy_core::registry::{AttentionBackendPlugin, Devices};
use autodeploy_core::Tensor;
use autodeploy_kernels::cpu::{axpys_strided, dots_strided};

pub struct TorchCpuAttention;

// On CUDA, `torch` runs the `flashinfer` kernels (there is no separate reference there; CUDA
// is checked against this CPU backend).
autodeploy_core::inventory::submit! {
    AttentionBackendPlugin {
        name: "torch",
        aliases: &["cpu"],
        version: env!("CARGO_PKG_VERSION"),
        make: Some(|| Box::new(TorchCpuAttention)),
        cuda: Some(super::cuda::flashinfer),
        fuses_rope: true,
        scoring: Devices { cpu: true, cuda: true },
        kv_fp8: Devices { cpu: true, cuda: true },
    }
}

// FlashInfer's design on CUDA (plugins/src/attention/cuda.rs); no CPU implementation.
autodeploy_core::inventory::submit! {
    AttentionBackendPlugin {
        name: "flashinfer",
        aliases: &[],
        version: env!("CARGO_PKG_VERSION"),
        make: None,
        cuda: Some(super::cuda::flashinfer),
        fuses_rope: true,
        scoring: Devices { cpu: false, cuda: true },
        kv_fp8: Devices { cpu: false, cuda: true },
    }
}

// AutoDeploy's triton backend's design on CUDA (plugins/src/attention/cuda.rs); no CPU
// implementation. Its kernel reads an FP8 KV cache, but applies no window or soft-cap.
autodeploy_core::inventory::submit! {
    AttentionBackendPlugin {
        name: "triton",
        aliases: &[],
        version: env!("CARGO_PKG_VERSION"),
        make: None,
        cuda: Some(super::cuda::triton),
        fuses_rope: false,
        scoring: Devices { cpu: false, cuda: false },
        kv_fp8: Devices { cpu: false, cuda: true },
    }
}

impl AttentionBackend for TorchCpuAttention {
    fn attend(
        &self,
        layer: usize,
        sc: autodeploy_kernels::cpu::Scores,
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
        let skip_write = mutation::is(Mutation::SkipKvWrite) && layer + 1 == cx.cache.spec.layers.len();
        let (kc, vc) = cx.cache.layer_mut(layer);
        let (mut kv, mut vv) = (k.to_f32(), v.to_f32());
        // An FP8 cache holds each value as its E4M3 code at the layer's scale.
        if let Some((ks, vs)) = sc.kv_fp8 {
            autodeploy_kernels::cpu::kv_fp8_round(kv.to_mut(), ks);
            autodeploy_kernels::cpu::kv_fp8_round(vv.to_mut(), vs);
        }
        // Write this step's keys and values: cache layout [slot, kv_head, dim].
        for t in (0..tokens).filter(|_| !skip_write) {
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
        // Where each query's attention ends: its own position (causal), unless the mutation
        // check asks for the whole of its sequence's step.
        let no_causal = mutation::is(Mutation::NoCausalMask);
        let mut seq_end = vec![0usize; if no_causal { plan.page_tables.len() } else { 0 }];
        if no_causal {
            for (&s, &p) in plan.token_seq.iter().zip(&plan.token_pos) {
                seq_end[s] = seq_end[s].max(p);
            }
        }
        let swap_heads = mutation::is(Mutation::SwapHeads) && heads > 1;
        let wrong_page = mutation::is(Mutation::WrongPage);
        let read_slot = |s: usize, j: usize| {
            if wrong_page && j / plan.page_size == 1 {
                plan.slot(s, j - plan.page_size)
            } else {
                plan.slot(s, j)
            }
        };
        let mut out = vec![0f32; heads * tokens * dim];
        let attend_row = |row: usize, o: &mut [f32], scores: &mut Vec<f32>| {
            let (mut h, t) = (row / tokens, row % tokens);
            if swap_heads && h < 2 {
                h ^= 1;
            }
            let s = plan.token_seq[t];
            let pos = if no_causal { seq_end[s] } else { plan.token_pos[t] };
            let first = sc.first_key(plan.token_pos[t]);
            let row = h * tokens + t;
            let kvh = h / group;
            let qrow = &qv[row * dim..(row + 1) * dim];
            scores.clear();
            // Positions 0..=pos, page by page: within a page, slots are consecutive.
            let row_stride = kv_heads * dim;
            let mut max = f32::NEG_INFINITY;
            let mut j = first;
            while j <= pos {
                let n = (plan.page_size - j % plan.page_size).min(pos + 1 - j);
                let base = (read_slot(s, j) * kv_heads + kvh) * dim;
                let at = scores.len();
                scores.resize(at + n, 0.0);
                dots_strided(
                    qrow,
                    &kc[base..base + (n - 1) * row_stride + dim],
                    row_stride,
                    sc.scale,
                    &mut scores[at..],
                );
                if let Some(c) = sc.softcap {
                    scores[at..].iter_mut().for_each(|x| *x = c * (*x / c).tanh());
                }
                max = scores[at..].iter().fold(max, |m, &x| m.max(x));
                j += n;
            }
            let mut sum = 0.0f32;
            for x in scores.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            o.fill(0.0);
            let mut j = first;
            while j <= pos {
                let n = (plan.page_size - j % plan.page_size).min(pos + 1 - j);
                let base = (read_slot(s, j) * kv_heads + kvh) * dim;
                axpys_strided(
                    &scores[j - first..j - first + n],
                    &vc[base..base + (n - 1) * row_stride + dim],
                    row_stride,
                    o,
                );
                j += n;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x = round_as(q.dtype(), *x * inv));
        };
        // Rows of `out` are (head, token); each attends to its sequence's positions 0..=pos.
        // Decode has few rows (one per head): they run on the kernels' spinning pool, a few rows
        // per chunk.
        let rows_per_chunk = (heads * tokens).div_ceil(8 * autodeploy_kernels::pool::threads()).max(1);
        autodeploy_kernels::pool::for_each_chunk_mut(&mut out, rows_per_chunk * dim, |c, piece| {
            let mut scores = Vec::new();
            for (i, o) in piece.chunks_mut(dim).enumerate() {
                attend_row(c * rows_per_chunk + i, o, &mut scores);
            }
        });
        Tensor::from_f32_as(q.dtype(), vec![1, heads, tokens, dim], out)
    }
}
