//! The engine core: a loop, not a call. Requests come and go between steps (`add_request`,
//! `abort`); each `step` runs one forward over a batch the core schedules and returns what
//! happened (new tokens, finished or failed requests). Runtimes drive it; the KV-cache pages it
//! hands out live as long as it does, and a finished or aborted request's pages go back at once.
//!
//! Two scheduling policies, both first come, first served:
//! - `Policy::PrefillFirst` (`demollm`): new requests are admitted while the batch, the token
//!   budget (`max_num_tokens`) and the free pages allow, and a step prefills the newly admitted
//!   prompts together or else decodes every running sequence by one token.
//! - `Policy::InFlight` (`trtllm`): every step decodes every running sequence and fills the rest
//!   of the token budget with prefill chunks (a long prompt is prefilled over several steps, so
//!   it never stalls the decoders); when a decode needs a page and none is free, another
//!   sequence not yet scheduled this step is preempted (the last one still prefilling, else the
//!   last decode in line): its pages are freed and it is queued again, to be recomputed from
//!   its tokens so far. With `prefix_caching`, full pages are kept in a
//!   `PrefixCache` and a new (or recomputed) sequence starts from the longest cached prefix of
//!   its tokens; cached pages nobody uses are evicted when the pool runs dry.

use std::collections::VecDeque;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::kvcache::PagePool;
use crate::prefix_cache::PrefixCache;
use crate::runtime::Gauges;
use crate::runtime::{
    check_request, Completion, CompletionText, FinishReason, ModelRunner, Request, RunStats, SeqStep, StepOut,
};
use crate::sampling::{RowDraw, Sampler, TokenLogprobs};

pub use crate::runtime::{Event, RequestId};

/// How a step is put together (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    PrefillFirst,
    InFlight,
}

/// What the core schedules within (the config's values).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_batch_size: usize,
    pub max_num_tokens: usize,
    pub page_size: usize,
    pub max_seq_len: usize,
    /// Keep and share full KV pages between requests with a common prefix (`InFlight` only).
    pub prefix_caching: bool,
}

impl Limits {
    pub fn from_config(cfg: &crate::config::PipelineConfig) -> Limits {
        Limits {
            max_batch_size: cfg.max_batch_size,
            page_size: cfg.attn_page_size,
            max_num_tokens: cfg.max_num_tokens(),
            max_seq_len: cfg.max_seq_len,
            prefix_caching: cfg.enable_prefix_caching,
        }
    }
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
    /// Prefix-cache keys of its first full pages (those the cache holds).
    keys: Vec<u64>,
    /// Whether a step has run it yet.
    scheduled: bool,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Its next token needs the logits on the host: log-probabilities asked, or stop tokens
    /// that must not be picked yet.
    fn needs_logits(&self) -> bool {
        let p = self.sampler.params();
        p.logprobs.is_some() || (self.generated() < p.min_tokens && !p.stop_token_ids.is_empty())
    }
}

pub struct EngineCore {
    limits: Limits,
    policy: Policy,
    /// The longest sequence a request may reach (prompt + generated).
    max_len: usize,
    pool: PagePool,
    /// Whether the graph has cached attention (else each step recomputes whole sequences).
    cached_graph: bool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_id: RequestId,
    stats: RunStats,
    prefix: Option<PrefixCache>,
}

impl EngineCore {
    /// A core for `engine` with `demollm`'s policy: its page pool holds the engine's `kv_pages`.
    pub fn new(engine: &dyn ModelRunner, limits: Limits) -> EngineCore {
        EngineCore::with_policy(engine, limits, Policy::PrefillFirst)
    }

    pub fn with_policy(engine: &dyn ModelRunner, limits: Limits, policy: Policy) -> EngineCore {
        EngineCore {
            limits,
            policy,
            max_len: engine.max_seq_len_within(limits.max_seq_len),
            pool: PagePool::new(engine.kv_pages()),
            cached_graph: engine.has_kv_cache(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: RunStats::default(),
            // Shared pages need a page table per sequence: not with per-sequence slots.
            prefix: (policy == Policy::InFlight
                && limits.prefix_caching
                && engine.has_kv_cache()
                && engine.kv_pages_per_sequence().is_none())
            .then(PrefixCache::default),
        }
    }

    /// Queues a request. A request the engine cannot run (its fields out of range, a prompt too
    /// long, token ids outside the vocabulary) is refused here, naming the field, and nothing
    /// else is affected.
    pub fn add_request(&mut self, engine: &dyn ModelRunner, req: Request) -> Result<RequestId> {
        // In flight, a prompt longer than the token budget is prefilled in chunks.
        let budget = match self.policy {
            Policy::PrefillFirst => self.limits.max_num_tokens,
            Policy::InFlight => usize::MAX,
        };
        check_request(engine, &req, self.max_len, budget)?;
        let id = self.next_id;
        self.next_id += 1;
        let text = engine.detokenizer().map(|d| CompletionText::new(d, req.sampling.stop_strings.clone()));
        self.waiting.push_back(Seq {
            id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            cached: 0,
            pages: Vec::new(),
            sampler: Sampler::new(req.sampling),
            text,
            keys: Vec::new(),
            scheduled: false,
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

    /// Pages the prefix cache keeps (counted in `pages_in_use`; evicted when needed).
    pub fn prefix_cached_pages(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixCache::len)
    }

    /// Pages only the prefix cache holds: in use, but evicted as soon as a page is needed.
    pub fn evictable_pages(&self) -> usize {
        self.prefix.as_ref().map_or(0, |c| c.evictable(&self.pool))
    }

    /// Pages in all.
    pub fn total_pages(&self) -> usize {
        self.pool.capacity()
    }

    /// Requests running (holding pages, scheduled at least once since their last preemption).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting for their first (or, after a preemption, next) step.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn stats(&self) -> RunStats {
        let mut s = self.stats.clone();
        if let Some(p) = &self.prefix {
            s.prefix_queried_tokens = p.queried_tokens;
            s.prefix_hit_tokens = p.hit_tokens;
        }
        s
    }

    /// Zeroes what `stats` counts (the prefix cache keeps its pages).
    pub fn reset_stats(&mut self) {
        self.stats = RunStats::default();
        if let Some(p) = self.prefix.as_mut() {
            p.queried_tokens = 0;
            p.hit_tokens = 0;
        }
    }

    pub fn gauges(&self) -> Gauges {
        let evictable = self.evictable_pages();
        Gauges {
            running: self.num_running(),
            waiting: self.num_waiting(),
            pages_total: self.total_pages(),
            pages_used: self.pages_in_use() - evictable,
            pages_prefix_only: evictable,
        }
    }

    /// A free page, evicting an unused cached prefix page when none is free.
    fn alloc_page(&mut self) -> Option<u32> {
        if let Some(p) = self.pool.alloc() {
            return Some(p);
        }
        let cache = self.prefix.as_mut()?;
        cache.evict_one(&mut self.pool).then(|| self.pool.alloc()).flatten()
    }

    fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.limits.page_size)
    }

    /// Admits waiting requests while the batch, the token budget and the pages allow.
    fn admit(&mut self, engine: &dyn ModelRunner) -> Vec<Seq> {
        let mut new: Vec<Seq> = Vec::new();
        let mut new_tokens = 0;
        while let Some(s) = self.waiting.front() {
            let len = s.tokens.len();
            // A backend with per-sequence slots gets a whole slot up front.
            let slot = engine.kv_pages_per_sequence();
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

    /// Fails the first waiting request, which does not fit even the empty pool, naming the pages
    /// it needs and those the engine has.
    fn fail_unfittable(&mut self, engine: &dyn ModelRunner) -> Option<Event> {
        let s = self.waiting.pop_front()?;
        let need = engine.kv_pages_per_sequence().unwrap_or_else(|| self.pages_for(s.tokens.len()));
        let msg = format!(
            "the request needs {need} KV-cache pages of {} tokens for its {} tokens, and the engine has {} in all",
            self.limits.page_size,
            s.tokens.len(),
            self.pool.capacity()
        );
        Some(Event::Finished { id: s.id, result: Err(Error::Msg(msg)) })
    }

    /// Runs one step under the core's policy. Returns what happened; empty when there is
    /// nothing to do.
    pub fn step(&mut self, engine: &mut dyn ModelRunner) -> Vec<Event> {
        let t0 = Instant::now();
        let events = match self.policy {
            Policy::PrefillFirst => self.step_prefill_first(engine),
            Policy::InFlight => self.step_in_flight(engine),
        };
        self.stats.step_time += t0.elapsed();
        events
    }

    /// `Policy::PrefillFirst`: a prefill of newly admitted requests, else one decode token for
    /// every running sequence.
    fn step_prefill_first(&mut self, engine: &mut dyn ModelRunner) -> Vec<Event> {
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
            events.extend(self.fail_unfittable(engine));
            return events;
        };
        // Room for this step's tokens.
        for s in batch.iter_mut() {
            while s.pages.len() < s.tokens.len().div_ceil(self.limits.page_size) {
                s.pages.push(self.pool.alloc().expect("the pool holds max_batch_size full sequences"));
            }
        }
        let chunks: Vec<usize> = batch.iter().map(|s| s.tokens.len() - s.cached).collect();
        self.run(engine, batch, &chunks, &mut events);
        events
    }

    /// `Policy::InFlight`: every running sequence's decode token, then prefill chunks (running
    /// prompts not yet fully prefilled first, then newly admitted ones) up to `max_num_tokens`.
    fn step_in_flight(&mut self, engine: &mut dyn ModelRunner) -> Vec<Event> {
        if !self.cached_graph {
            // An uncached graph runs whole sequences; there is nothing to chunk.
            return self.step_prefill_first(engine);
        }
        let mut events = Vec::new();
        let page = self.limits.page_size;
        let mut budget = self.limits.max_num_tokens;
        // Decodes first: each needs room for one more position, preempting a sequence not yet
        // scheduled this step when the pool is empty.
        let mut decodes: VecDeque<Seq> = VecDeque::new();
        let mut prefilling: Vec<Seq> = Vec::new();
        for s in std::mem::take(&mut self.running) {
            if s.tokens.len() - s.cached == 1 {
                decodes.push_back(s);
            } else {
                prefilling.push(s);
            }
        }
        let mut batch: Vec<Seq> = Vec::new();
        let mut chunks: Vec<usize> = Vec::new();
        let mut preempted: Vec<Seq> = Vec::new();
        while let Some(mut s) = decodes.pop_front() {
            if budget == 0 {
                self.running.push(s);
                continue;
            }
            let need = s.tokens.len().div_ceil(page);
            while s.pages.len() < need {
                match self.alloc_page() {
                    Some(p) => s.pages.push(p),
                    None => {
                        // The last sequence not yet scheduled this step gives way.
                        let victim = prefilling.pop().or_else(|| decodes.pop_back());
                        match victim {
                            Some(v) => preempted.push(self.preempt(v)),
                            None => break,
                        }
                    }
                }
            }
            if s.pages.len() < need {
                // Not even this sequence alone fits: it gives way too.
                preempted.push(self.preempt(s));
                continue;
            }
            budget -= 1;
            chunks.push(1);
            batch.push(s);
        }
        // Prefill chunks: running prompts first, then new admissions, as pages and budget allow.
        for mut s in prefilling {
            let n = self.chunk_for(&mut s, budget);
            if n == 0 {
                self.running.push(s);
                continue;
            }
            budget -= n;
            chunks.push(n);
            batch.push(s);
        }
        while budget > 0 && batch.len() + self.running.len() < self.limits.max_batch_size {
            let Some(mut s) = self.waiting.pop_front() else { break };
            if let (Some(cache), true) = (self.prefix.as_mut(), s.pages.is_empty()) {
                let (pages, keys) = cache.lookup(&mut self.pool, &s.tokens, page);
                s.cached = pages.len() * page;
                s.pages = pages;
                s.keys = keys;
            }
            if let Some(slot) = engine.kv_pages_per_sequence() {
                match self.pool.alloc_run(slot) {
                    Some(run) => s.pages = run,
                    None => {
                        self.waiting.push_front(s);
                        break;
                    }
                }
            }
            let n = self.chunk_for(&mut s, budget);
            if n == 0 {
                self.reset(&mut s);
                self.waiting.push_front(s);
                break;
            }
            budget -= n;
            chunks.push(n);
            batch.push(s);
        }
        // Nothing could run although sequences are running: all of them are mid-prefill and no
        // page is free for any. The newest give way until the oldest can take a chunk (without
        // this the step would be empty forever).
        if batch.is_empty() && !self.running.is_empty() {
            let mut first = self.running.remove(0);
            let mut n = self.chunk_for(&mut first, budget);
            while n == 0 {
                let Some(v) = self.running.pop() else { break };
                preempted.push(self.preempt(v));
                n = self.chunk_for(&mut first, budget);
            }
            if n > 0 {
                chunks.push(n);
                batch.push(first);
            } else {
                // Alone with every page it could take, it still does not fit: it never will.
                let msg = format!(
                    "the request's {} tokens need more KV-cache pages of {page} tokens than the engine has ({} in all)",
                    first.tokens.len(),
                    self.pool.capacity()
                );
                self.reset(&mut first);
                events.push(Event::Finished { id: first.id, result: Err(Error::Msg(msg)) });
                // Its pages are free now; the queue gets them next step.
                for s in preempted.into_iter() {
                    self.waiting.push_front(s);
                }
                return events;
            }
        }
        // Preempted sequences go back to the front of the queue, oldest first.
        for s in preempted.into_iter() {
            self.waiting.push_front(s);
        }
        if batch.is_empty() {
            if self.running.is_empty() {
                events.extend(self.fail_unfittable(engine));
            }
            return events;
        }
        self.run(engine, batch, &chunks, &mut events);
        events
    }

    /// How many of `s`'s uncached tokens fit this step (at most `budget`), with the pages for
    /// them taken from the pool (evicting unused cached prefix pages if need be); 0 when none
    /// fit.
    fn chunk_for(&mut self, s: &mut Seq, budget: usize) -> usize {
        let page = self.limits.page_size;
        let n = (s.tokens.len() - s.cached).min(budget);
        while s.pages.len() < (s.cached + n).div_ceil(page) {
            match self.alloc_page() {
                Some(p) => s.pages.push(p),
                None => break,
            }
        }
        // As many as the pages it holds have room for (they always cover `cached`).
        n.min(s.pages.len() * page - s.cached)
    }

    /// Frees `s`'s pages and resets it to be recomputed from its tokens so far (its sampler
    /// keeps its state, so a seeded request continues its own sequence of draws).
    fn preempt(&mut self, mut s: Seq) -> Seq {
        self.reset(&mut s);
        self.stats.preemptions += 1;
        s
    }

    /// Gives back `s`'s pages: nothing of it is in the cache any more.
    fn reset(&mut self, s: &mut Seq) {
        self.pool.release(std::mem::take(&mut s.pages));
        s.cached = 0;
        s.keys.clear();
    }

    /// One forward over `batch`, sequence i contributing `chunks[i]` tokens from its `cached`
    /// (its pages already hold them). A sequence whose chunk reaches the end of its tokens gets
    /// its next token; the others (prefill chunks) only advance. Finished sequences release
    /// their pages; the rest go back to running.
    fn run(&mut self, engine: &mut dyn ModelRunner, mut batch: Vec<Seq>, chunks: &[usize], events: &mut Vec<Event>) {
        self.stats.peak_pages = self.stats.peak_pages.max(self.pages_in_use());
        self.stats.max_step_tokens = self.stats.max_step_tokens.max(chunks.iter().sum());
        let t0 = Instant::now();
        let completes: Vec<bool> = batch.iter().zip(chunks).map(|(s, &n)| s.cached + n == s.tokens.len()).collect();
        // A decode feeds one generated token; everything else (prompts, recomputation after a
        // preemption) is prefill.
        let is_decode = |s: &Seq, n: usize| n == 1 && s.cached + 1 == s.tokens.len() && s.cached >= s.prompt_len;
        let decodes = batch.iter().zip(chunks).filter(|(s, &n)| is_decode(s, n)).count();
        let prefill_tokens: usize = batch.iter().zip(chunks).filter(|(s, &n)| !is_decode(s, n)).map(|(_, &n)| n).sum();
        // Each completing sequence's draw for this token, taken before the forward: the same
        // draw picks the token on the host or where the logits are. A chunk that does not reach
        // the end of its prompt takes no draw (its row is not used).
        let draws: Vec<RowDraw> = batch
            .iter_mut()
            .zip(&completes)
            .map(
                |(s, &c)| if c { s.sampler.draw() } else { RowDraw { temperature: 0.0, top_k: 0, top_p: 1.0, u: 0.0 } },
            )
            .collect();
        for s in batch.iter_mut().filter(|s| !s.scheduled) {
            s.scheduled = true;
            events.push(Event::Scheduled { id: s.id });
        }
        let want_logits = batch.iter().zip(&completes).any(|(s, &c)| c && s.needs_logits());
        let next = forward(engine, self.cached_graph, self.limits.page_size, &batch, chunks, &draws, want_logits)
            .and_then(|out| pick_tokens(out, &batch, &draws));
        self.stats.steps += 1;
        self.stats.cache_bytes = engine.host_cache_bytes();
        let next = match next {
            Ok(picked) => picked,
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
                return;
            }
        };
        if prefill_tokens > 0 {
            self.stats.prefill_tokens += prefill_tokens;
            self.stats.prefill_time += t0.elapsed();
        } else {
            self.stats.decode_time += t0.elapsed();
        }
        self.stats.decode_tokens += decodes;
        for ((mut s, &n), ((t, logprobs), &complete)) in
            batch.into_iter().zip(chunks).zip(next.into_iter().zip(&completes))
        {
            s.cached += n;
            if let Some(cache) = self.prefix.as_mut() {
                cache.register(&mut self.pool, &s.tokens, s.cached, &s.pages, &mut s.keys, self.limits.page_size);
            }
            if !complete {
                self.running.push(s);
                continue;
            }
            s.tokens.push(t);
            let generated = s.generated();
            let p = s.sampler.params();
            // (Before `min_tokens`, stop tokens were masked out of the pick.)
            let stop_token = p.stop_token_ids.contains(&t);
            // A stop token ends the text; it is not part of it.
            let armed = generated >= p.min_tokens;
            let stop_string = !stop_token && s.text.as_mut().is_some_and(|x| x.push_checked(t, armed));
            let text = s.text.as_mut().map(CompletionText::take_delta).unwrap_or_default();
            events.push(Event::Token { id: s.id, token: t, text, logprobs });
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
    }
}

/// One forward over `seqs`, sequence i contributing `chunks[i]` tokens from its `cached`:
/// through the paged cache, or (an uncached graph) a full-sequence forward per sequence.
fn forward(
    engine: &mut dyn ModelRunner,
    cached_graph: bool,
    page_size: usize,
    seqs: &[Seq],
    chunks: &[usize],
    draws: &[RowDraw],
    want_logits: bool,
) -> Result<StepOut> {
    if !cached_graph {
        return Ok(StepOut::Logits(seqs.iter().map(|s| engine.forward_full(&s.tokens)).collect::<Result<_>>()?));
    }
    let steps: Vec<SeqStep> = seqs
        .iter()
        .zip(chunks)
        .map(|(s, &n)| SeqStep { new_tokens: &s.tokens[s.cached..s.cached + n], cached: s.cached, pages: &s.pages })
        .collect();
    engine.forward_step(page_size, &steps, draws, want_logits)
}

/// Each sequence's next token (with its log-probabilities when asked) from a step's output:
/// the model's picks, or picked here from the logits with the same draws, a sequence short of
/// its `min_tokens` with its stop tokens masked out.
fn pick_tokens(out: StepOut, seqs: &[Seq], draws: &[RowDraw]) -> Result<Vec<(i64, Option<TokenLogprobs>)>> {
    let rows = match out {
        StepOut::Logits(rows) if rows.len() == seqs.len() => rows,
        ids => return Ok(ids.tokens(draws)?.into_iter().map(|t| (t, None)).collect()),
    };
    Ok(rows
        .into_iter()
        .zip(seqs.iter().zip(draws))
        .map(|(mut row, (s, d))| {
            let p = s.sampler.params();
            if s.generated() < p.min_tokens {
                for &t in &p.stop_token_ids {
                    if let Some(x) = usize::try_from(t).ok().and_then(|t| row.get_mut(t)) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let t = crate::sampling::pick(&row, d);
            (t, p.logprobs.map(|k| crate::sampling::logprobs(&row, t, k)))
        })
        .collect())
}
