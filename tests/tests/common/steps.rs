//! Running an engine's cached forward step by step with fixed tokens, as the runtime does: what
//! the tests comparing two engines' logits (CUDA against the CPU, a fusion on and off) share.

use autodeploy_core::kvcache::{BatchMetadata, PagePool, PagedKvCache, StepContext, StepPlan};
use autodeploy_core::pipeline::Engine;
use autodeploy_core::Tensor;

pub fn input_index(e: &Engine, name: &str) -> usize {
    e.graph.inputs.iter().position(|&v| e.graph.value(v).name == name).unwrap()
}

/// Runs a prefill of `prompts` and then the `decode` steps (one token a sequence each, fixed by
/// the caller) through the engine's cached forward with pages of `page` positions (the engine's
/// `attn_page_size`), as the runtime would; returns each step's logits rows.
pub fn run_paged_steps(e: &mut Engine, page: usize, prompts: &[Vec<i64>], decode: &[Vec<i64>]) -> Vec<Vec<Vec<f32>>> {
    let mut steps = vec![prompts.iter().cloned().enumerate().collect::<Vec<_>>()];
    steps.extend(decode.iter().map(|d| d.iter().map(|&t| vec![t]).enumerate().collect()));
    run_paged_schedule(e, page, &steps)
}

/// As `run_paged_steps`, each step a list of (sequence, its new tokens) in the step's order
/// (a sequence's first appearance starts it): mixed steps, decodes beside prompt chunks, as the
/// in-flight runtime makes them. Returns each step's logits rows (a sequence's last token's).
pub fn run_paged_schedule(e: &mut Engine, page: usize, steps: &[Vec<(usize, Vec<i64>)>]) -> Vec<Vec<Vec<f32>>> {
    let spec = e.cache.clone().expect("fixtures get a KV cache");
    let mut cache = PagedKvCache::new(spec, page);
    let mut pool = PagePool::new(e.kv_pages);
    let mut seqs: Vec<(Vec<i64>, usize, Vec<u32>)> = Vec::new();
    let mut out = Vec::new();
    for step in steps {
        let mut meta = BatchMetadata::default();
        let (mut ids, mut pos, mut gather) = (vec![], vec![], vec![]);
        for (i, new) in step {
            if *i >= seqs.len() {
                seqs.resize(i + 1, (vec![], 0, vec![]));
            }
            let s = &mut seqs[*i];
            s.0.extend_from_slice(new);
            // A backend with per-sequence slots gets its slot whole, as the runtime does.
            if let (Some(n), true) = (e.model.kv_pages_per_sequence(), s.2.is_empty()) {
                s.2 = pool.alloc_run(n).unwrap();
            }
            while s.2.len() * page < s.0.len() {
                s.2.push(pool.alloc().unwrap());
            }
            ids.extend_from_slice(&s.0[s.1..]);
            pos.extend(s.1 as i64..s.0.len() as i64);
            gather.push(ids.len() as i64 - 1);
            meta.seq_lens.push(s.0.len() - s.1);
            meta.cached_lens.push(s.1);
            meta.page_tables.push(s.2.clone());
            s.1 = s.0.len();
        }
        if !e.model.owns_kv_cache() {
            cache.ensure_pages(e.kv_pages);
        }
        let plan = StepPlan::new(&meta, page).unwrap();
        let mut inputs = vec![Tensor::from_i64(vec![0], vec![]).unwrap(); e.graph.inputs.len()];
        let t = ids.len();
        inputs[input_index(e, "input_ids")] = Tensor::from_i64(vec![1, t], ids).unwrap();
        inputs[input_index(e, "position_ids")] = Tensor::from_i64(vec![1, t], pos).unwrap();
        inputs[input_index(e, "logits_gather_idx")] = Tensor::from_i64(vec![gather.len()], gather).unwrap();
        let mut cx = StepContext { plan: &plan, cache: &mut cache };
        let o = e.model.forward(&inputs, Some(&mut cx)).unwrap();
        let v = *o[0].shape().last().unwrap();
        out.push(o[0].to_f32().chunks(v).map(<[f32]>::to_vec).collect());
    }
    out
}
