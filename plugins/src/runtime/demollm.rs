//! `demollm`: a simple, debuggable runtime. Admits up to `max_batch_size` requests, prefills the
//! new ones together in one flattened step, then decodes all active sequences one token per step,
//! with pages of the KV cache assigned as sequences grow and freed when they finish.

use std::collections::VecDeque;
use std::time::Instant;

use autodeploy_core::config::PipelineConfig;
use autodeploy_core::error::{Error, Result};
use autodeploy_core::kvcache::{PagePool, PagedKvCache};
use autodeploy_core::pipeline::Engine;
use autodeploy_core::runtime::{
    check_request, forward_cached, Completion, CompletionText, FinishReason, Request, RunStats, Runtime, RuntimePlugin,
    SeqStep, StepOut as Step,
};
use autodeploy_core::sampling::{RowDraw, Sampler};
use autodeploy_core::Tensor;

autodeploy_core::inventory::submit! {
    RuntimePlugin { name: "demollm", aliases: &["demo"], version: env!("CARGO_PKG_VERSION"), make: |cfg| Box::new(DemoLlm::new(cfg)) }
}

pub struct DemoLlm {
    max_batch: usize,
    page_size: usize,
    max_num_tokens: usize,
    max_seq_len: usize,
}

struct Seq<'a> {
    req: usize,
    tokens: Vec<i64>,
    prompt_len: usize,
    /// Tokens already in the KV cache.
    cached: usize,
    pages: Vec<u32>,
    sampler: Sampler,
    /// The completion's text so far, when the engine can decode tokens.
    text: Option<CompletionText<'a>>,
}

impl DemoLlm {
    pub fn new(cfg: &PipelineConfig) -> DemoLlm {
        DemoLlm {
            max_batch: cfg.max_batch_size,
            page_size: cfg.attn_page_size,
            max_num_tokens: cfg.max_num_tokens(),
            max_seq_len: cfg.max_seq_len,
        }
    }

    fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }
}

impl DemoLlm {
    /// One forward over `seqs`, each contributing `tokens[cached..]`; returns each sequence's
    /// next token, sampled from its last token's logits (greedy batches on a model that can
    /// take the argmax where the logits are get ids back, not logits).
    fn step(
        &self,
        engine: &mut Engine,
        cache: Option<&mut PagedKvCache>,
        seqs: &mut [&mut Seq<'_>],
    ) -> Result<Vec<i64>> {
        // Each sequence's draw for this token, taken before the forward: the same draw picks
        // the token on the host or where the logits are.
        let draws: Vec<RowDraw> = seqs.iter_mut().map(|s| s.sampler.draw()).collect();
        self.forward(engine, cache, seqs, &draws)?.tokens(&draws)
    }

    fn forward(
        &self,
        engine: &mut Engine,
        cache: Option<&mut PagedKvCache>,
        seqs: &[&mut Seq<'_>],
        draws: &[RowDraw],
    ) -> Result<Step> {
        let Some(cache) = cache else {
            // Uncached graph: a full-sequence forward per sequence.
            let mut rows = Vec::new();
            for s in seqs {
                let n = s.tokens.len();
                let ids = Tensor::from_i64(vec![1, n], s.tokens.clone())?;
                let pos = Tensor::from_i64(vec![1, n], (0..n as i64).collect())?;
                let out = engine.model.forward(&[ids, pos], None)?;
                let v = *out[0].shape().last().unwrap_or(&1);
                rows.push(out[0].to_f32()[(n - 1) * v..n * v].to_vec());
            }
            return Ok(Step::Logits(rows));
        };
        let steps: Vec<SeqStep> = seqs
            .iter()
            .map(|s| SeqStep { new_tokens: &s.tokens[s.cached..], cached: s.cached, pages: &s.pages })
            .collect();
        forward_cached(engine, cache, self.page_size, &steps, draws)
    }
}

impl Runtime for DemoLlm {
    fn generate_streaming(
        &mut self,
        engine: &mut Engine,
        requests: &[Request],
        on_token: &mut dyn FnMut(usize, i64),
    ) -> (Vec<Result<Completion>>, RunStats) {
        let mut results: Vec<Option<Result<Completion>>> = (0..requests.len()).map(|_| None).collect();
        // Held here, apart from the engine the steps borrow mutably.
        let detok = engine.detokenizer.clone();
        let mut stats = RunStats::default();
        let max_len = engine.max_seq_len_within(self.max_seq_len);
        let mut pool = PagePool::new(engine.kv_pages);
        let mut cache = engine.cache.clone().map(|spec| PagedKvCache::new(spec, self.page_size));

        let mut queue: VecDeque<usize> = VecDeque::new();
        for (i, r) in requests.iter().enumerate() {
            let check = check_request(engine, r, max_len, self.max_num_tokens);
            match check {
                Ok(()) => queue.push_back(i),
                Err(e) => results[i] = Some(Err(e)),
            }
        }

        let mut active: Vec<Seq> = Vec::new();
        loop {
            // Admit new sequences while the batch, the token budget and the pages allow.
            let mut new: Vec<Seq> = Vec::new();
            let mut new_tokens = 0;
            while let Some(&i) = queue.front() {
                let r = &requests[i];
                // A backend with per-sequence slots gets a whole slot up front.
                let slot = engine.model.kv_pages_per_sequence();
                let need = slot.unwrap_or_else(|| self.pages_for(r.prompt.len()));
                if active.len() + new.len() >= self.max_batch
                    || (!new.is_empty() && new_tokens + r.prompt.len() > self.max_num_tokens)
                    || pool.available() < need
                {
                    break;
                }
                queue.pop_front();
                new_tokens += r.prompt.len();
                let pages = match slot {
                    Some(n) => match pool.alloc_run(n) {
                        Some(run) => run,
                        None => break,
                    },
                    None => (0..need).map(|_| pool.alloc().expect("availability checked")).collect(),
                };
                new.push(Seq {
                    req: i,
                    tokens: r.prompt.clone(),
                    prompt_len: r.prompt.len(),
                    cached: 0,
                    pages,
                    sampler: Sampler::new(r.sampling.clone()),
                    text: detok.as_deref().map(|d| CompletionText::new(d, &r.sampling.stop_strings)),
                });
            }
            let prefill = !new.is_empty();
            let mut batch: Vec<Seq> = if prefill {
                new
            } else if !active.is_empty() {
                std::mem::take(&mut active)
            } else {
                break;
            };
            // Room for this step's tokens.
            for s in batch.iter_mut() {
                while s.pages.len() < self.pages_for(s.tokens.len()) {
                    s.pages.push(pool.alloc().expect("the pool holds max_batch_size full sequences"));
                }
            }
            if let Some(c) = cache.as_mut().filter(|_| !engine.model.owns_kv_cache()) {
                let top = batch.iter().flat_map(|s| s.pages.iter()).map(|&p| p as usize + 1).max().unwrap_or(0);
                c.ensure_pages(top);
            }
            stats.peak_pages = stats.peak_pages.max(pool.capacity() - pool.available());
            let t0 = Instant::now();
            let n_tokens: usize = batch.iter().map(|s| s.tokens.len() - s.cached).sum();
            let mut refs: Vec<&mut Seq> = batch.iter_mut().collect();
            let step = self.step(engine, cache.as_mut(), &mut refs);
            stats.steps += 1;
            let next = match step {
                Ok(ids) => ids,
                Err(e) => {
                    // A failed step fails the sequences in it, not the run.
                    let msg = e.to_string();
                    for s in batch {
                        pool.release(s.pages);
                        results[s.req] = Some(Err(Error::Msg(format!("forward step failed: {msg}"))));
                    }
                    continue;
                }
            };
            for (s, &t) in batch.iter_mut().zip(&next) {
                s.cached = s.tokens.len();
                s.tokens.push(t);
                on_token(s.req, t);
            }
            if prefill {
                stats.prefill_tokens += n_tokens;
                stats.prefill_time += t0.elapsed();
            } else {
                stats.decode_tokens += batch.len();
                stats.decode_time += t0.elapsed();
            }
            for mut s in batch {
                let generated = s.tokens.len() - s.prompt_len;
                let last = *s.tokens.last().expect("just pushed");
                let p = s.sampler.params();
                let stop_token = p.stop_token_ids.contains(&last);
                // A stop token ends the text; it is not part of it.
                let stop_string = !stop_token && s.text.as_mut().is_some_and(|t| t.push(last));
                let finish = if stop_token || stop_string {
                    Some(FinishReason::Stop)
                } else if generated >= p.max_new_tokens || s.tokens.len() >= max_len {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                match finish {
                    Some(f) => {
                        pool.release(std::mem::take(&mut s.pages));
                        let text = s.text.take().map(CompletionText::finish);
                        results[s.req] =
                            Some(Ok(Completion { tokens: s.tokens[s.prompt_len..].to_vec(), text, finish: f }));
                    }
                    None => active.push(s),
                }
            }
        }
        stats.cache_bytes = cache.as_ref().map(|c| c.bytes()).unwrap_or(0);
        let results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Msg("request was never scheduled (KV cache too small?)".into()))))
            .collect();
        (results, stats)
    }
}
