//! The runtime interface: requests in, completions out. A runtime schedules sequences, owns the
//! KV-cache pages and samples; it talks to the engine only through a batch of tokens, positions
//! and metadata in and logits out.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::kvcache::{BatchMetadata, PagedKvCache, StepContext, StepPlan};
use crate::pipeline::Engine;
use crate::sampling::{RowDraw, SamplingParams};
use crate::Tensor;

/// Name of the graph input holding the flattened-token indices whose logits the runtime wants
/// (added with cached attention, see the `insert_cached_attention` transform).
pub const GATHER_INPUT: &str = "logits_gather_idx";

/// One sequence's share of a forward step over a graph with cached attention.
pub struct SeqStep<'a> {
    /// Its tokens not yet in the KV cache; their positions follow `cached`.
    pub new_tokens: &'a [i64],
    /// Its tokens already in the KV cache.
    pub cached: usize,
    /// Its KV-cache pages, in order: enough for `cached + new_tokens.len()` positions.
    pub pages: &'a [u32],
}

/// What a forward step gave: each sequence's last-token logits, or its next token where the
/// model picked it (greedy, or sampled with the runtime's draws, on the model's device).
pub enum StepOut {
    Logits(Vec<Vec<f32>>),
    Ids(Vec<i64>),
}

impl StepOut {
    /// Each sequence's next token: the model's ids, or picked from the logits with the same
    /// `draws` (`sampling::pick`). Refused unless there is one per draw.
    pub fn tokens(self, draws: &[RowDraw]) -> Result<Vec<i64>> {
        let n = match &self {
            StepOut::Ids(ids) => ids.len(),
            StepOut::Logits(rows) => rows.len(),
        };
        if n != draws.len() {
            return Err(Error::Msg(format!("the model returned {n} rows for a step of {} sequences", draws.len())));
        }
        Ok(match self {
            StepOut::Ids(ids) => ids,
            StepOut::Logits(rows) => rows.iter().zip(draws).map(|(row, d)| crate::sampling::pick(row, d)).collect(),
        })
    }
}

/// Whether `r` can run on `engine`: sampling parameters in range, a non-empty prompt shorter
/// than `max_len` and within `max_num_tokens`, stop strings only with a tokenizer. The error
/// names the request field at fault.
pub fn check_request(engine: &dyn ModelRunner, r: &Request, max_len: usize, max_num_tokens: usize) -> Result<()> {
    r.sampling.validate()?;
    let bad = |input: &str, msg: String| Err(Error::Input { input: input.into(), msg });
    if r.prompt.is_empty() {
        bad("prompt", "is empty".into())
    } else if r.prompt.len() >= max_len {
        bad(
            "prompt",
            format!(
                "{} tokens leave no room to generate: the longest sequence is {max_len} (max_seq_len)",
                r.prompt.len()
            ),
        )
    } else if !r.sampling.stop_strings.is_empty() && engine.detokenizer().is_none() {
        bad("stop_strings", "need a tokenizer to match text, and this model has none (use stop_token_ids)".into())
    } else if r.prompt.len() > max_num_tokens {
        bad("prompt", format!("{} tokens exceed max_num_tokens = {max_num_tokens}", r.prompt.len()))
    } else if let Some((at, id)) =
        engine.vocab_size().and_then(|v| r.prompt.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= v))
    {
        let vocab = engine.vocab_size().unwrap_or(0);
        bad("prompt", format!("token id {id} at position {at} is out of range for the vocabulary of {vocab}"))
    } else if let Some(id) =
        engine.vocab_size().and_then(|v| r.sampling.stop_token_ids.iter().find(|&&t| t < 0 || t as usize >= v))
    {
        // A stop token the model cannot produce would never stop anything.
        let vocab = engine.vocab_size().unwrap_or(0);
        bad("stop_token_ids", format!("token id {id} is out of range for the vocabulary of {vocab}"))
    } else {
        Ok(())
    }
}

/// What a runtime sees of an engine: its limits and one forward step, not the graph, the
/// compiled model or the cache storage. `Engine` implements it; a runtime gets nothing else.
pub trait ModelRunner {
    /// Pages a runtime's pool may hand out (the KV cache holds this many).
    fn kv_pages(&self) -> usize;
    /// `Some(n)`: the attention wants each sequence in one run of `n` consecutive pages.
    fn kv_pages_per_sequence(&self) -> Option<usize>;
    /// Whether the graph has cached attention; without, every step is a full-sequence forward.
    fn has_kv_cache(&self) -> bool;
    /// Longest sequence (prompt + generated) the graph accepts, within `cap`.
    fn max_seq_len_within(&self, cap: usize) -> usize;
    /// Token ids must lie below it, when the graph says.
    fn vocab_size(&self) -> Option<usize>;
    /// What stop strings are matched with, when the model has a tokenizer.
    fn detokenizer(&self) -> Option<std::sync::Arc<dyn Detokenizer>>;
    /// One forward over `seqs` through the paged KV cache (pages of `page_size` positions):
    /// each sequence's last-token logits, or its next token picked with its draw where the
    /// logits are (unless `want_logits`).
    fn forward_step(
        &mut self,
        page_size: usize,
        seqs: &[SeqStep],
        draws: &[RowDraw],
        want_logits: bool,
    ) -> Result<StepOut>;
    /// The last position's logits of a full-sequence forward (graphs without cached attention).
    fn forward_full(&mut self, tokens: &[i64]) -> Result<Vec<f32>>;
    /// Bytes of KV-cache storage on the host (0 when the model keeps it on its device).
    fn host_cache_bytes(&self) -> usize;
    /// Why this engine can run no more steps (a rank of a sharded engine failed), if it cannot:
    /// a server stops taking requests and answers 503.
    fn failure(&self) -> Option<String> {
        None
    }
}

impl ModelRunner for Engine {
    fn kv_pages(&self) -> usize {
        self.kv_pages
    }
    fn kv_pages_per_sequence(&self) -> Option<usize> {
        self.model.kv_pages_per_sequence()
    }
    fn has_kv_cache(&self) -> bool {
        self.cache.is_some()
    }
    fn max_seq_len_within(&self, cap: usize) -> usize {
        Engine::max_seq_len_within(self, cap)
    }
    fn vocab_size(&self) -> Option<usize> {
        Engine::vocab_size(self)
    }
    fn detokenizer(&self) -> Option<std::sync::Arc<dyn Detokenizer>> {
        self.detokenizer.clone()
    }
    fn forward_step(
        &mut self,
        page_size: usize,
        seqs: &[SeqStep],
        draws: &[RowDraw],
        want_logits: bool,
    ) -> Result<StepOut> {
        self.lead(|| crate::comm::steps::encode_step(page_size, seqs, draws, want_logits))?;
        let out = self.run_step(page_size, seqs, draws, want_logits);
        self.settle(out)
    }
    fn forward_full(&mut self, tokens: &[i64]) -> Result<Vec<f32>> {
        self.lead(|| crate::comm::steps::encode_full(tokens))?;
        let out = self.run_full(tokens);
        self.settle(out)
    }
    fn host_cache_bytes(&self) -> usize {
        if self.model.owns_kv_cache() {
            0
        } else {
            self.host_cache.as_ref().map_or(0, PagedKvCache::bytes)
        }
    }
    fn failure(&self) -> Option<String> {
        if self.world_size <= 1 {
            return None;
        }
        // The group's own (a rank's process exited) as soon as it is known, between steps too.
        self.group_failure.clone().or_else(|| crate::comm::current().ok()?.failure())
    }
}

impl Engine {
    /// [`ModelRunner::forward_step`] on this rank alone (a follower runs rank 0's steps so).
    pub(crate) fn run_step(
        &mut self,
        page_size: usize,
        seqs: &[SeqStep],
        draws: &[RowDraw],
        want_logits: bool,
    ) -> Result<StepOut> {
        let spec = self.cache.clone().ok_or_else(|| Error::Msg("the engine's graph has no cached attention".into()))?;
        // The host storage, unless the model keeps the cache on its device: made at the first
        // step (again if the page size changes), grown to the highest page a step uses.
        let mut cache = match self.host_cache.take() {
            Some(c) if c.page_size == page_size => c,
            _ => PagedKvCache::new(spec, page_size),
        };
        if !self.model.owns_kv_cache() {
            let top = seqs.iter().flat_map(|s| s.pages.iter()).map(|&p| p as usize + 1).max().unwrap_or(0);
            cache.ensure_pages(top);
        }
        let out = forward_cached(self, &mut cache, page_size, seqs, draws, want_logits);
        self.host_cache = Some(cache);
        out
    }

    /// [`ModelRunner::forward_full`] on this rank alone.
    pub(crate) fn run_full(&mut self, tokens: &[i64]) -> Result<Vec<f32>> {
        let n = tokens.len();
        let ids = Tensor::from_i64(vec![1, n], tokens.to_vec())?;
        let pos = Tensor::from_i64(vec![1, n], (0..n as i64).collect())?;
        let out = self.model.forward(&[ids, pos], None)?;
        let v = *out[0].shape().last().unwrap_or(&1);
        Ok(out[0].to_f32()[(n - 1) * v..n * v].to_vec())
    }
}

/// The index of the graph input named `name`.
pub fn input_index(engine: &Engine, name: &str) -> Result<usize> {
    engine
        .graph
        .inputs
        .iter()
        .position(|&v| engine.graph.value(v).name == name)
        .ok_or_else(|| Error::Msg(format!("the engine's graph has no input `{name}`")))
}

/// One forward over `seqs` (flattened into one batch of tokens with the page table as metadata).
/// A model that can pick tokens where the logits are, with `draws` (one per sequence), returns
/// ids instead of logits, unless `want_logits` (a request asked for log-probabilities or must
/// not pick its stop tokens yet).
fn forward_cached(
    engine: &mut Engine,
    cache: &mut PagedKvCache,
    page_size: usize,
    seqs: &[SeqStep],
    draws: &[RowDraw],
    want_logits: bool,
) -> Result<StepOut> {
    let mut meta = BatchMetadata::default();
    let (mut ids, mut pos, mut gather) = (Vec::new(), Vec::new(), Vec::new());
    for s in seqs {
        ids.extend_from_slice(s.new_tokens);
        pos.extend(s.cached as i64..(s.cached + s.new_tokens.len()) as i64);
        if crate::mutation::is(crate::mutation::Mutation::ShiftRope) {
            let n = s.new_tokens.len();
            let at = pos.len() - n;
            pos[at..].iter_mut().filter(|p| **p > 0).for_each(|p| *p += 1);
        }
        gather.push(ids.len() as i64 - 1);
        meta.seq_lens.push(s.new_tokens.len());
        meta.cached_lens.push(s.cached);
        meta.page_tables.push(s.pages.to_vec());
    }
    let t = ids.len();
    let plan = StepPlan::new(&meta, page_size)?;
    let mut inputs = vec![Tensor::from_i64(vec![0], vec![])?; engine.graph.inputs.len()];
    inputs[input_index(engine, "input_ids")?] = Tensor::from_i64(vec![1, t], ids)?;
    inputs[input_index(engine, "position_ids")?] = Tensor::from_i64(vec![1, t], pos)?;
    inputs[input_index(engine, GATHER_INPUT)?] = Tensor::from_i64(vec![gather.len()], gather)?;
    let mut cx = StepContext { plan: &plan, cache };
    if want_logits {
        // Straight to the logits below.
    } else if draws.iter().all(|d| d.temperature <= 0.0 || d.top_k == 1) {
        if let Some(ids) = engine.model.forward_greedy(&inputs, Some(&mut cx))? {
            return Ok(StepOut::Ids(ids));
        }
    } else if let Some(ids) = engine.model.forward_sampled(&inputs, Some(&mut cx), draws)? {
        return Ok(StepOut::Ids(ids));
    }
    let out = engine.model.forward(&inputs, Some(&mut cx))?;
    let v = *out[0].shape().last().unwrap_or(&1);
    Ok(StepOut::Logits(out[0].to_f32().chunks(v).map(<[f32]>::to_vec).collect()))
}

/// A request's handle, unique within one runtime.
pub type RequestId = u64;

/// What a step did to one request.
#[derive(Debug)]
pub enum Event {
    /// The request left the queue: its first step ran (once per request).
    Scheduled { id: RequestId },
    /// The request's next token; `text` is the completion's text that this token made final
    /// (empty while a character or a possible stop string is incomplete; the finished
    /// completion's text begins with every piece sent); `logprobs` when the request asked.
    Token { id: RequestId, token: i64, text: String, logprobs: Option<crate::sampling::TokenLogprobs> },
    /// The request ended: its completion, or why it failed (it failed alone).
    Finished { id: RequestId, result: Result<Completion> },
}

/// A runtime's load now, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    pub running: usize,
    pub waiting: usize,
    /// KV-cache pages in all, held by requests, and kept only by a prefix cache (free to take).
    pub pages_total: usize,
    pub pages_used: usize,
    pub pages_prefix_only: usize,
}

#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<i64>,
    pub sampling: SamplingParams,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// Reached `max_new_tokens` or the longest sequence the engine accepts.
    Length,
    /// Emitted a stop token or produced a stop string.
    Stop,
}

#[derive(Clone, Debug)]
pub struct Completion {
    pub tokens: Vec<i64>,
    /// The decoded completion, when the engine has a tokenizer; it ends before a stop string.
    pub text: Option<String>,
    pub finish: FinishReason,
}

/// Turns token ids back into text: what stop strings are matched against.
pub trait Detokenizer: Send + Sync {
    fn decode(&self, ids: &[i64]) -> String;
}

/// One completion's text as its tokens arrive, cut where a stop string begins. A token costs
/// O(its text + the longest stop string): the tokens are decoded a short window at a time
/// (`StreamDecoder`), and only the new text, with the tail of the old that a stop string could
/// straddle, is searched.
pub struct CompletionText {
    decoder: crate::tokenizer::StreamDecoder<std::sync::Arc<dyn Detokenizer>>,
    text: String,
    stops: Vec<String>,
    longest_stop: usize,
    stopped: bool,
    /// Bytes of `text` handed out by `take_delta`.
    emitted: usize,
}

impl CompletionText {
    pub fn new(detok: std::sync::Arc<dyn Detokenizer>, stops: Vec<String>) -> CompletionText {
        let longest_stop = stops.iter().map(String::len).max().unwrap_or(0);
        CompletionText {
            decoder: crate::tokenizer::StreamDecoder::new(detok),
            text: String::new(),
            stops,
            longest_stop,
            stopped: false,
            emitted: 0,
        }
    }

    /// Adds a generated token (not a stop token: its text is not part of the completion).
    /// Returns true once a stop string has appeared; the text then ends before it.
    pub fn push(&mut self, id: i64) -> bool {
        self.push_checked(id, true)
    }

    /// `push`, matching stop strings in the new text only when `check` (a request still short
    /// of its `min_tokens` is not stopped by one).
    pub fn push_checked(&mut self, id: i64, check: bool) -> bool {
        if self.stopped {
            return true;
        }
        if let Some(piece) = self.decoder.push(id) {
            self.append(&piece, check);
        }
        self.stopped
    }

    fn append(&mut self, piece: &str, check: bool) {
        let old = self.text.len();
        self.text.push_str(piece);
        if self.stops.is_empty() || !check {
            return;
        }
        // A match that ends in the new text starts at most `longest - 1` bytes before it.
        let mut from = old.saturating_sub(self.longest_stop.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let tail = &self.text[from..];
        if let Some(at) = self.stops.iter().filter_map(|x| tail.find(x.as_str())).min() {
            self.text.truncate(from + at);
            self.stopped = true;
        }
    }

    /// The text no stop string can cut any more that `take_delta` has not yet returned (for
    /// streaming): all of it once stopped, else all but the last `longest stop - 1` bytes (a
    /// stop string found later starts no earlier: it would have been found already). The final
    /// text (`finish`) begins with everything returned.
    pub fn take_delta(&mut self) -> String {
        let mut end = if self.stopped {
            self.text.len()
        } else {
            self.text.len().saturating_sub(self.longest_stop.saturating_sub(1))
        };
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.emitted {
            return String::new();
        }
        let d = self.text[self.emitted..end].to_string();
        self.emitted = end;
        d
    }

    /// The completion's text: what a stop string left, else everything decoded, with bytes
    /// still held back (an incomplete character at the end) rendered as a full decode renders
    /// them.
    pub fn finish(mut self) -> String {
        if !self.stopped {
            let rest = self.decoder.flush();
            self.append(&rest, true);
        }
        self.text
    }
}

/// Where the time went, for the timing line users see.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    pub prefill_tokens: usize,
    pub prefill_time: Duration,
    pub decode_tokens: usize,
    pub decode_time: Duration,
    pub steps: usize,
    /// Peak KV-cache pages in use, and bytes of cache storage.
    pub peak_pages: usize,
    pub cache_bytes: usize,
    /// Sequences whose pages were taken back to make room (recomputed later).
    pub preemptions: usize,
    /// The most tokens one step carried.
    pub max_step_tokens: usize,
    /// Prompt tokens looked up in the prefix cache, and those found there (not recomputed).
    pub prefix_queried_tokens: usize,
    pub prefix_hit_tokens: usize,
    /// Wall time inside the runtime's steps, all of it: scheduling, the forward steps
    /// (`prefill_time + decode_time`) and the bookkeeping after them. The difference is host
    /// work the device waits for (what overlapping host and device could hide).
    pub step_time: Duration,
}

/// A runtime is a loop over one engine: requests join (`add_request`) and leave (`abort`)
/// between steps, and each `step` runs (at most) one forward over the batch the runtime
/// schedules and says what happened. A runtime lives as long as its caller keeps it (the
/// server: as long as the engine), and with it its KV-cache pages and prefix cache.
pub trait Runtime: Send {
    /// Queues a request; one the engine cannot run is refused here, naming the field, and
    /// nothing else is affected.
    fn add_request(&mut self, engine: &dyn ModelRunner, req: Request) -> Result<RequestId>;
    /// Drops a request, waiting or running; its pages are free at once. False when no such
    /// request is unfinished.
    fn abort(&mut self, id: RequestId) -> bool;
    /// One step; empty when there is nothing to do.
    fn step(&mut self, engine: &mut dyn ModelRunner) -> Vec<Event>;
    fn has_unfinished(&self) -> bool;
    /// Where the time went since the last `reset_stats`.
    fn stats(&self) -> RunStats;
    fn reset_stats(&mut self);
    fn gauges(&self) -> Gauges;

    /// Runs `requests` to completion, calling `on_token(request index, token)` as each token is
    /// sampled. A bad request fails alone: its slot holds the error, the others complete.
    fn generate_streaming(
        &mut self,
        engine: &mut dyn ModelRunner,
        requests: &[Request],
        on_token: &mut dyn FnMut(usize, i64),
    ) -> (Vec<Result<Completion>>, RunStats) {
        self.reset_stats();
        let mut results: Vec<Option<Result<Completion>>> = (0..requests.len()).map(|_| None).collect();
        let mut index = std::collections::HashMap::new();
        for (i, r) in requests.iter().enumerate() {
            match self.add_request(engine, r.clone()) {
                Ok(id) => {
                    index.insert(id, i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        while self.has_unfinished() {
            for event in self.step(engine) {
                match event {
                    Event::Token { id, token, .. } => {
                        if let Some(&i) = index.get(&id) {
                            on_token(i, token)
                        }
                    }
                    Event::Finished { id, result } => {
                        if let Some(&i) = index.get(&id) {
                            results[i] = Some(result)
                        }
                    }
                    Event::Scheduled { .. } => {}
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Msg("the request ended without a result".into()))))
            .collect();
        (results, self.stats())
    }

    fn generate(&mut self, engine: &mut dyn ModelRunner, requests: &[Request]) -> (Vec<Result<Completion>>, RunStats) {
        self.generate_streaming(engine, requests, &mut |_, _| {})
    }
}

#[cfg(test)]
mod tests {
    use super::{CompletionText, Detokenizer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Token i is byte i (as a byte-level tokenizer's byte tokens); decoding is lossy UTF-8, so
    /// a character split across tokens decodes as U+FFFD until complete. Counts decoded ids.
    #[derive(Default)]
    struct Bytes {
        decoded: AtomicUsize,
    }
    impl Detokenizer for Bytes {
        fn decode(&self, ids: &[i64]) -> String {
            self.decoded.fetch_add(ids.len(), Ordering::Relaxed);
            String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned()
        }
    }

    fn ids(s: &str) -> Vec<i64> {
        s.bytes().map(i64::from).collect()
    }

    /// The definition: decode everything, cut at the earliest stop string.
    fn full(text_ids: &[i64], stops: &[String]) -> (String, bool) {
        let text = Bytes::default().decode(text_ids);
        match stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            Some(at) => (text[..at].to_string(), true),
            None => (text, false),
        }
    }

    /// Feeds tokens until a stop; returns the text, whether it stopped and the tokens taken.
    fn incremental(d: &Arc<Bytes>, text_ids: &[i64], stops: &[String]) -> (String, bool, usize) {
        let mut t = CompletionText::new(d.clone(), stops.to_vec());
        // What a stream would have sent: never text a stop string later cuts off.
        let mut streamed = String::new();
        let mut end = (false, text_ids.len());
        for (i, &id) in text_ids.iter().enumerate() {
            let stopped = t.push(id);
            streamed.push_str(&t.take_delta());
            if stopped {
                end = (true, i + 1);
                break;
            }
        }
        let text = t.finish();
        assert!(text.starts_with(&streamed), "streamed {streamed:?} is not a prefix of {text:?}");
        (text, end.0, end.1)
    }

    #[test]
    fn matches_the_full_decode_across_pieces_and_multibyte_characters() {
        let cases: &[(&str, &[&str])] = &[
            ("The capital of France is Paris.", &["Paris", "France"]),
            ("héllo wörld naïve café", &["wö"]),
            ("日本語 and 中文 text", &["中文", "and 中"]),
            ("emoji 😀👍🏽 done", &["👍"]),
            ("no stop here at all", &["zzz"]),
            ("abcabcabd", &["abd", "cab"]),
            ("ends inside a char \u{00e9}", &[]),
        ];
        for (text, stops) in cases {
            let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
            let d = Arc::new(Bytes::default());
            let (got, stopped, taken) = incremental(&d, &ids(text), &stops);
            let (want, want_stop) = full(&ids(text), &stops);
            assert_eq!((got.as_str(), stopped), (want.as_str(), want_stop), "{text:?} {stops:?}");
            if stopped {
                // It stopped at the token completing the earliest match, not later.
                assert!(full(&ids(text)[..taken], &stops).1, "{text:?}: no match in the tokens taken");
                assert!(!full(&ids(text)[..taken - 1], &stops).1, "{text:?}: a match before the last token taken");
            }
        }
        // Cut mid-character: the held-back bytes come out as a full decode renders them.
        let mut cut = ids("caf\u{00e9}");
        cut.pop();
        let d = Arc::new(Bytes::default());
        assert_eq!(incremental(&d, &cut, &[]).0, Bytes::default().decode(&cut));
        assert!(incremental(&d, &cut, &[]).0.ends_with('\u{FFFD}'));
    }

    /// Ids past 255 decode to nothing (as ids a tokenizer has no text for): a run of them must
    /// not grow the decoded window token by token.
    #[test]
    fn tokens_without_text_do_not_grow_the_window() {
        struct Sparse(AtomicUsize);
        impl Detokenizer for Sparse {
            fn decode(&self, ids: &[i64]) -> String {
                self.0.fetch_add(ids.len(), Ordering::Relaxed);
                ids.iter().filter(|&&i| i < 256).map(|&i| i as u8 as char).collect()
            }
        }
        let d = Arc::new(Sparse(AtomicUsize::new(0)));
        let mut t = CompletionText::new(d.clone(), vec!["zz".into()]);
        let mut tokens: Vec<i64> = (0..3000).map(|i| 1000 + i).collect();
        tokens.extend(ids("tail".repeat(3).as_str()));
        for &id in &tokens {
            assert!(!t.push(id));
        }
        assert_eq!(t.finish(), "tail".repeat(3));
        let decoded = d.0.load(Ordering::Relaxed);
        // Two decodes a token of at most 2 × MAX_HELD_TOKENS ids (unbounded: about 1,500 a token).
        assert!(decoded <= 64 * tokens.len(), "{decoded} ids decoded for {} tokens", tokens.len());
    }

    #[test]
    fn each_token_decodes_a_short_window() {
        // 5,000 tokens of mixed one- to four-byte characters: a full decode per token would
        // decode about 12.5 million ids; the windowed decoder a few per token.
        let text: String = "ab é 日 😀 ".repeat(400);
        let t = ids(&text);
        let stops = vec!["not present".to_string(), "😀😀".to_string()];
        let d = Arc::new(Bytes::default());
        let (got, stopped, _) = incremental(&d, &t, &stops);
        assert!(!stopped);
        assert_eq!(got, text);
        let decoded = d.decoded.load(Ordering::Relaxed);
        assert!(decoded <= 12 * t.len(), "{decoded} ids decoded for {} tokens", t.len());
    }
}
