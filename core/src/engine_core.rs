//! The engine core: a loop, not a call. Requests come and go between steps (`add_request`,
//! `abort`); each `step` runs one forward over a batch the core schedules and returns what
//! happened (new tokens, finished or failed requests). Runtimes drive it; the KV-cache pages it
//! hands out live as long as it does, and a finished or aborted request's pages go back at once.
//!
//! Scheduling here is the simple policy `demollm` has always had: first come, first served;
//! new requests are admitted while the batch, the token budget (`max_num_tokens`) and the free
//! pages allow, and a step prefills the newly admitted prompts together or else decodes every
//! running sequence by one token.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::kvcache::{PagePool, PagedKvCache};
use crate::pipeline::Engine;
use crate::runtime::{
    check_request, forward_cached, Completion, CompletionText, Detokenizer, FinishReason, Request, RunStats, SeqStep,
    StepOut,
};
use crate::sampling::{RowDraw, Sampler};
use crate::Tensor;

/// A request's handle, unique within one core.
pub type RequestId = u64;

/// What a step did to one request.
#[derive(Debug)]
pub enum Event {
    /// The request's next token.
    Token { id: RequestId, token: i64 },
    /// The request ended: its completion, or why it failed (it failed alone).
    Finished { id: RequestId, result: Result<Completion> },
}

/// What the core schedules within (the config's values).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_batch_size: usize,
    pub max_num_tokens: usize,
    pub page_size: usize,
    pub max_seq_len: usize,
}

struct Seq {
    id: RequestId,
    tokens: Vec<i64>,
    prompt_len: usize,
    /// Tokens already in the KV cache.
    cached: usize,
    pages: Vec<u32>,
    sampler: Sampler,
    /// The completion's text so far, when the engine can decode tokens.
    text: Option<CompletionText>,
}

pub struct EngineCore {
    limits: Limits,
    /// The longest sequence a request may reach (prompt + generated).
    max_len: usize,
    pool: PagePool,
    cache: Option<PagedKvCache>,
    detok: Option<Arc<dyn Detokenizer>>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_id: RequestId,
    stats: RunStats,
}

impl EngineCore {
    /// A core for `engine`: its page pool holds the engine's `kv_pages`.
    pub fn new(engine: &Engine, limits: Limits) -> EngineCore {
        EngineCore {
            limits,
            max_len: engine.max_seq_len_within(limits.max_seq_len),
            pool: PagePool::new(engine.kv_pages),
            cache: engine.cache.clone().map(|spec| PagedKvCache::new(spec, limits.page_size)),
            detok: engine.detokenizer.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: RunStats::default(),
        }
    }

    /// Queues a request. A request the engine cannot run (its fields out of range, a prompt too
    /// long, token ids outside the vocabulary) is refused here, naming the field, and nothing
    /// else is affected.
    pub fn add_request(&mut self, engine: &Engine, req: Request) -> Result<RequestId> {
        check_request(engine, &req, self.max_len, self.limits.max_num_tokens)?;
        let id = self.next_id;
        self.next_id += 1;
        let text = self.detok.clone().map(|d| CompletionText::new(d, req.sampling.stop_strings.clone()));
        self.waiting.push_back(Seq {
            id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            cached: 0,
            pages: Vec::new(),
            sampler: Sampler::new(req.sampling),
            text,
        });
        Ok(id)
    }

    /// Drops a request, waiting or running; its pages return to the pool at once. False when no
    /// such request is unfinished.
    pub fn abort(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = self.running.remove(i);
            self.pool.release(s.pages);
            return true;
        }
        false
    }

    /// Whether any request is waiting or running.
    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Pages handed out now (0 once every request has finished or been aborted).
    pub fn pages_in_use(&self) -> usize {
        self.pool.capacity() - self.pool.available()
    }

    pub fn stats(&self) -> RunStats {
        let mut s = self.stats.clone();
        s.cache_bytes = self.cache.as_ref().map(|c| c.bytes()).unwrap_or(0);
        s
    }

    fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.limits.page_size)
    }

    /// Admits waiting requests while the batch, the token budget and the pages allow.
    fn admit(&mut self, engine: &Engine) -> Vec<Seq> {
        let mut new: Vec<Seq> = Vec::new();
        let mut new_tokens = 0;
        while let Some(s) = self.waiting.front() {
            let len = s.tokens.len();
            // A backend with per-sequence slots gets a whole slot up front.
            let slot = engine.model.kv_pages_per_sequence();
            let need = slot.unwrap_or_else(|| self.pages_for(len));
            if self.running.len() + new.len() >= self.limits.max_batch_size
                || (!new.is_empty() && new_tokens + len > self.limits.max_num_tokens)
                || self.pool.available() < need
            {
                break;
            }
            let pages = match slot {
                Some(n) => match self.pool.alloc_run(n) {
                    Some(run) => run,
                    None => break,
                },
                None => (0..need).map(|_| self.pool.alloc().expect("availability checked")).collect(),
            };
            let mut s = self.waiting.pop_front().expect("front exists");
            s.pages = pages;
            new_tokens += len;
            new.push(s);
        }
        new
    }

    /// Runs one step: a prefill of newly admitted requests, else one decode token for every
    /// running sequence. Returns what happened; empty when there is nothing to do.
    pub fn step(&mut self, engine: &mut Engine) -> Vec<Event> {
        let mut events = Vec::new();
        let new = self.admit(engine);
        let prefill = !new.is_empty();
        let mut batch = if prefill {
            new
        } else if !self.running.is_empty() {
            std::mem::take(&mut self.running)
        } else {
            // Nothing runs and the first waiting request does not fit even the empty pool: it
            // never will, so it fails (alone) instead of waiting forever.
            if let Some(s) = self.waiting.pop_front() {
                let need = engine.model.kv_pages_per_sequence().unwrap_or_else(|| self.pages_for(s.tokens.len()));
                let msg = format!(
                    "the request needs {need} KV-cache pages of {} tokens for its {}-token prompt, and the engine has {} in all",
                    self.limits.page_size,
                    s.tokens.len(),
                    self.pool.capacity()
                );
                events.push(Event::Finished { id: s.id, result: Err(Error::Msg(msg)) });
            }
            return events;
        };
        // Room for this step's tokens.
        for s in batch.iter_mut() {
            while s.pages.len() < s.tokens.len().div_ceil(self.limits.page_size) {
                s.pages.push(self.pool.alloc().expect("the pool holds max_batch_size full sequences"));
            }
        }
        if let Some(c) = self.cache.as_mut().filter(|_| !engine.model.owns_kv_cache()) {
            let top = batch.iter().flat_map(|s| s.pages.iter()).map(|&p| p as usize + 1).max().unwrap_or(0);
            c.ensure_pages(top);
        }
        self.stats.peak_pages = self.stats.peak_pages.max(self.pages_in_use());
        let t0 = Instant::now();
        let n_tokens: usize = batch.iter().map(|s| s.tokens.len() - s.cached).sum();
        // Each sequence's draw for this token, taken before the forward: the same draw picks
        // the token on the host or where the logits are.
        let draws: Vec<RowDraw> = batch.iter_mut().map(|s| s.sampler.draw()).collect();
        let next = forward(engine, self.cache.as_mut(), self.limits.page_size, &batch, &draws)
            .and_then(|out| out.tokens(&draws));
        self.stats.steps += 1;
        let next = match next {
            Ok(ids) => ids,
            Err(e) => {
                // A failed step fails the sequences in it, not the engine.
                let msg = e.to_string();
                for s in batch {
                    self.pool.release(s.pages);
                    events.push(Event::Finished {
                        id: s.id,
                        result: Err(Error::Msg(format!("forward step failed: {msg}"))),
                    });
                }
                return events;
            }
        };
        for (s, &t) in batch.iter_mut().zip(&next) {
            s.cached = s.tokens.len();
            s.tokens.push(t);
            events.push(Event::Token { id: s.id, token: t });
        }
        if prefill {
            self.stats.prefill_tokens += n_tokens;
            self.stats.prefill_time += t0.elapsed();
        } else {
            self.stats.decode_tokens += batch.len();
            self.stats.decode_time += t0.elapsed();
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
            } else if generated >= p.max_new_tokens || s.tokens.len() >= self.max_len {
                Some(FinishReason::Length)
            } else {
                None
            };
            match finish {
                Some(f) => {
                    self.pool.release(std::mem::take(&mut s.pages));
                    let text = s.text.take().map(CompletionText::finish);
                    let completion = Completion { tokens: s.tokens[s.prompt_len..].to_vec(), text, finish: f };
                    events.push(Event::Finished { id: s.id, result: Ok(completion) });
                }
                None => self.running.push(s),
            }
        }
        events
    }
}

/// One forward over `seqs`, each contributing `tokens[cached..]`: through the paged cache, or
/// (an uncached graph) a full-sequence forward per sequence.
fn forward(
    engine: &mut Engine,
    cache: Option<&mut PagedKvCache>,
    page_size: usize,
    seqs: &[Seq],
    draws: &[RowDraw],
) -> Result<StepOut> {
    let Some(cache) = cache else {
        let mut rows = Vec::new();
        for s in seqs {
            let n = s.tokens.len();
            let ids = Tensor::from_i64(vec![1, n], s.tokens.clone())?;
            let pos = Tensor::from_i64(vec![1, n], (0..n as i64).collect())?;
            let out = engine.model.forward(&[ids, pos], None)?;
            let v = *out[0].shape().last().unwrap_or(&1);
            rows.push(out[0].to_f32()[(n - 1) * v..n * v].to_vec());
        }
        return Ok(StepOut::Logits(rows));
    };
    let steps: Vec<SeqStep> =
        seqs.iter().map(|s| SeqStep { new_tokens: &s.tokens[s.cached..], cached: s.cached, pages: &s.pages }).collect();
    forward_cached(engine, cache, page_size, &steps, draws)
}
