//! A library's runtime (`ffi::Runtime`, a scheduler) as a host runtime: the host keeps each
//! request's tokens, sampler and text, and lends the library the engine (`HostEngine`, the
//! ABI's `EngineOps`) for one `step` at a time. Every engine step the library asks for is
//! checked before it runs: the limits, each sequence's tokens (exactly its own), and what each
//! page it reads holds. A page records the chained key of the tokens written into it; a
//! sequence may read a page only if that key is its own prefix's, so no request ever reads
//! another's cache except through a verified shared prefix.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use autodeploy_sdk::abi_stable::sabi_trait::TD_Opaque;
use autodeploy_sdk::abi_stable::std_types::{RResult, RSlice, RString, RVec};
use autodeploy_sdk::ffi;

use crate::error::{Error, Result};
use crate::runtime::{
    check_request, Completion, CompletionText, Event, FinishReason, Gauges, ModelRunner, Request, RequestId, RunStats,
};
use crate::sampling::Sampler;

/// Steps in a row in which a library runtime neither ran the engine nor finished a request
/// before its requests are failed (a scheduler that stopped making progress).
const IDLE_STEPS_LIMIT: usize = 1000;

struct LibRequest {
    tokens: Vec<i64>,
    prompt_len: usize,
    sampler: Sampler,
    text: Option<CompletionText>,
    /// Chained keys of its full pages' prefixes (extended as tokens arrive).
    full_keys: Vec<u64>,
    scheduled: bool,
    /// The pages its last step used.
    pages: Vec<u32>,
    /// A stop string ended its text: the host finishes it after the library's step.
    stopped_by_text: bool,
}

impl LibRequest {
    /// The chained key of this request's tokens `[0, end)`, `end` within page `j`.
    fn key_through(&mut self, page: usize, j: usize, end: usize) -> u64 {
        while self.full_keys.len() < j && (self.full_keys.len() + 1) * page <= self.tokens.len() {
            let i = self.full_keys.len();
            let parent = if i == 0 { ROOT } else { self.full_keys[i - 1] };
            self.full_keys.push(chain(parent, &self.tokens[i * page..(i + 1) * page]));
        }
        let parent = if j == 0 { ROOT } else { self.full_keys[j - 1] };
        chain(parent, &self.tokens[j * page..end])
    }
}

const ROOT: u64 = 0x51_7cc1_b727_220a;

fn chain(parent: u64, tokens: &[i64]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// What the engine lets a library runtime do, from the config and the engine.
#[derive(Clone, Copy)]
struct Limits {
    max_batch: usize,
    page_size: usize,
    max_num_tokens: usize,
    max_len: usize,
    num_pages: usize,
}

struct State {
    requests: HashMap<RequestId, LibRequest>,
    next_id: RequestId,
    stats: RunStats,
    /// Host KV-cache bytes after the last step.
    cache_bytes: usize,
    /// Per page: the positions written into it and the chained key of the prefix they end.
    pages: Vec<Option<(usize, u64)>>,
    /// Events of the current step (tokens as the engine samples them).
    events: Vec<Event>,
    /// Whether the library ran the engine in the current step.
    ran: bool,
}

pub(super) struct LibraryRuntime {
    who: String,
    inner: ffi::RuntimeBox,
    max_batch: usize,
    page_size: usize,
    max_num_tokens: usize,
    max_seq_len: usize,
    state: Option<State>,
    idle_steps: usize,
}

impl LibraryRuntime {
    pub(super) fn new(
        name: &str,
        origin: &str,
        inner: ffi::RuntimeBox,
        cfg: &crate::config::PipelineConfig,
    ) -> LibraryRuntime {
        LibraryRuntime {
            who: format!("runtime `{name}` ({origin})"),
            inner,
            max_batch: cfg.max_batch_size,
            page_size: cfg.attn_page_size,
            max_num_tokens: cfg.max_num_tokens(),
            max_seq_len: cfg.max_seq_len,
            state: None,
            idle_steps: 0,
        }
    }

    fn limits(&self, engine: &dyn ModelRunner) -> Limits {
        Limits {
            max_batch: self.max_batch,
            page_size: self.page_size,
            max_num_tokens: self.max_num_tokens,
            max_len: engine.max_seq_len_within(self.max_seq_len),
            num_pages: engine.kv_pages(),
        }
    }

    fn state(&mut self, engine: &dyn ModelRunner) -> &mut State {
        self.state.get_or_insert_with(|| State {
            requests: HashMap::new(),
            next_id: 0,
            stats: RunStats::default(),
            cache_bytes: 0,
            pages: vec![None; engine.kv_pages()],
            events: Vec::new(),
            ran: false,
        })
    }
}

impl crate::runtime::Runtime for LibraryRuntime {
    fn add_request(&mut self, engine: &dyn ModelRunner, req: Request) -> Result<RequestId> {
        let max_len = engine.max_seq_len_within(self.max_seq_len);
        // The library may prefill in chunks: a prompt is not bound by max_num_tokens here.
        check_request(engine, &req, max_len, usize::MAX)?;
        if !engine.has_kv_cache() {
            return Err(Error::Msg(format!(
                "{}: this engine's graph has no cached attention; runtimes from libraries need it",
                self.who
            )));
        }
        let detok = engine.detokenizer();
        let st = self.state(engine);
        let id = st.next_id;
        st.next_id += 1;
        let text = detok.map(|d| CompletionText::new(d, req.sampling.stop_strings.clone()));
        let given = ffi::RuntimeRequest {
            prompt: req.prompt.clone().into(),
            max_new_tokens: req.sampling.max_new_tokens,
            stop_token_ids: req.sampling.stop_token_ids.clone().into(),
        };
        st.requests.insert(
            id,
            LibRequest {
                prompt_len: req.prompt.len(),
                tokens: req.prompt,
                sampler: Sampler::new(req.sampling),
                text,
                full_keys: Vec::new(),
                scheduled: false,
                pages: Vec::new(),
                stopped_by_text: false,
            },
        );
        self.inner.add_request(id, given);
        Ok(id)
    }

    fn abort(&mut self, id: RequestId) -> bool {
        let known = self.state.as_mut().is_some_and(|s| s.requests.remove(&id).is_some());
        if known {
            self.inner.abort(id);
        }
        known
    }

    fn step(&mut self, engine: &mut dyn ModelRunner) -> Vec<Event> {
        let limits = self.limits(engine);
        let who = self.who.clone();
        if self.state.is_none() {
            return Vec::new();
        }
        let st = self.state.as_mut().expect("made above");
        st.ran = false;
        let finished = {
            let mut host = HostEngine { engine, st, limits };
            self.inner.step(ffi::EngineOps_TO::from_ptr(&mut host, TD_Opaque))
        };
        let st = self.state.as_mut().expect("made above");
        let mut events = std::mem::take(&mut st.events);
        let progressed = st.ran || !finished.is_empty();
        for f in finished {
            let Some(mut r) = st.requests.remove(&f.request) else { continue };
            let result = match f.result {
                RResult::ROk(stopped) => Ok(Completion {
                    tokens: r.tokens[r.prompt_len..].to_vec(),
                    text: r.text.take().map(CompletionText::finish),
                    finish: if stopped { FinishReason::Stop } else { FinishReason::Length },
                }),
                RResult::RErr(e) => Err(Error::Msg(format!("{who}: {e}"))),
            };
            events.push(Event::Finished { id: f.request, result });
        }
        // Requests a stop string ended: the host finishes them and tells the library.
        let by_text: Vec<RequestId> =
            st.requests.iter().filter(|(_, r)| r.stopped_by_text).map(|(&id, _)| id).collect();
        for id in by_text {
            let mut r = st.requests.remove(&id).expect("listed above");
            self.inner.abort(id);
            let completion = Completion {
                tokens: r.tokens[r.prompt_len..].to_vec(),
                text: r.text.take().map(CompletionText::finish),
                finish: FinishReason::Stop,
            };
            events.push(Event::Finished { id, result: Ok(completion) });
        }
        // A library that has dropped requests, or stopped making progress, fails them.
        self.idle_steps = if progressed { 0 } else { self.idle_steps + 1 };
        let st = self.state.as_mut().expect("made above");
        let stalled = self.idle_steps >= IDLE_STEPS_LIMIT;
        if !st.requests.is_empty() && (stalled || !self.inner.has_unfinished()) {
            let why = if stalled {
                format!("{who} made no progress in {IDLE_STEPS_LIMIT} steps")
            } else {
                format!("{who} dropped the request unfinished")
            };
            for (id, _) in st.requests.drain() {
                events.push(Event::Finished { id, result: Err(Error::Msg(why.clone())) });
                self.inner.abort(id);
            }
            self.idle_steps = 0;
        }
        events
    }

    fn has_unfinished(&self) -> bool {
        self.state.as_ref().is_some_and(|s| !s.requests.is_empty())
    }

    fn stats(&self) -> RunStats {
        let mut s = self.state.as_ref().map(|s| s.stats.clone()).unwrap_or_default();
        s.cache_bytes = self.state.as_ref().map_or(0, |s| s.cache_bytes);
        s
    }

    fn reset_stats(&mut self) {
        if let Some(s) = self.state.as_mut() {
            s.stats = RunStats::default();
        }
    }

    fn gauges(&self) -> Gauges {
        let Some(st) = self.state.as_ref() else { return Gauges::default() };
        let mut used: Vec<u32> = st.requests.values().flat_map(|r| r.pages.iter().copied()).collect();
        used.sort_unstable();
        used.dedup();
        Gauges {
            running: st.requests.values().filter(|r| r.scheduled).count(),
            waiting: st.requests.values().filter(|r| !r.scheduled).count(),
            pages_total: st.pages.len(),
            pages_used: used.len(),
            pages_prefix_only: 0,
        }
    }
}

/// The engine as a library's runtime drives it during one of its steps.
struct HostEngine<'a> {
    engine: &'a mut dyn ModelRunner,
    st: &'a mut State,
    limits: Limits,
}

/// Why `seqs` cannot run as one step, if it cannot: the limits, each sequence's tokens (its
/// request's own from `cached` on), and what the pages it reads hold (`pages`, by page id).
fn check_step(
    l: &Limits,
    requests: &mut HashMap<RequestId, LibRequest>,
    pages: &[Option<(usize, u64)>],
    seqs: &[ffi::SeqStep],
) -> std::result::Result<(), String> {
    if seqs.is_empty() {
        return Err("a step needs at least one sequence".into());
    }
    if seqs.len() > l.max_batch {
        return Err(format!("{} sequences in one step; max_batch_size is {}", seqs.len(), l.max_batch));
    }
    let total: usize = seqs.iter().map(|s| s.new_tokens.len()).sum();
    if total > l.max_num_tokens {
        return Err(format!("{total} tokens in one step; max_num_tokens is {}", l.max_num_tokens));
    }
    let mut seen = std::collections::HashSet::new();
    let mut written = std::collections::HashSet::new();
    for (i, s) in seqs.iter().enumerate() {
        let Some(r) = requests.get_mut(&s.request) else {
            return Err(format!("sequence {i}: request {} is not one the runtime was given, or has ended", s.request));
        };
        if !seen.insert(s.request) {
            return Err(format!("sequence {i}: request {} appears twice", s.request));
        }
        let (n, end) = (s.new_tokens.len(), s.cached + s.new_tokens.len());
        if n == 0 {
            return Err(format!("sequence {i}: no new tokens"));
        }
        if end > r.tokens.len() || r.tokens[s.cached..end] != *s.new_tokens.as_slice() {
            return Err(format!(
                "sequence {i}: its new tokens are not request {}'s tokens from position {}",
                s.request, s.cached
            ));
        }
        if end > l.max_len {
            return Err(format!("sequence {i}: {end} positions; the longest sequence is {}", l.max_len));
        }
        if s.pages.len() * l.page_size < end {
            return Err(format!(
                "sequence {i}: {} pages of {} positions cannot hold {end}",
                s.pages.len(),
                l.page_size
            ));
        }
        for (j, &p) in s.pages.iter().enumerate() {
            if p as usize >= l.num_pages {
                return Err(format!("sequence {i}: page {p} is not below {}", l.num_pages));
            }
            let (lo, hi) = (j * l.page_size, (j + 1) * l.page_size);
            // Positions it reads from this page (those already cached) must be its own.
            if lo < s.cached {
                let need = s.cached.min(hi);
                let own = r.key_through(l.page_size, j, need);
                if pages[p as usize] != Some((need, own)) {
                    return Err(format!(
                        "sequence {i}: page {p} does not hold request {}'s tokens at positions {lo}..{need}",
                        s.request
                    ));
                }
            }
            // Positions it writes: no two sequences of a step write one page.
            if end > lo && s.cached < hi && !written.insert(p) {
                return Err(format!("sequence {i}: page {p} is written by two sequences in one step"));
            }
        }
    }
    Ok(())
}

impl ffi::EngineOps for HostEngine<'_> {
    fn max_batch_size(&self) -> usize {
        self.limits.max_batch
    }
    fn max_seq_len(&self) -> usize {
        self.limits.max_len
    }
    fn max_num_tokens(&self) -> usize {
        self.limits.max_num_tokens
    }
    fn page_size(&self) -> usize {
        self.limits.page_size
    }
    fn num_pages(&self) -> usize {
        self.limits.num_pages
    }
    fn pages_per_sequence(&self) -> usize {
        self.engine.kv_pages_per_sequence().unwrap_or(0)
    }

    fn step(&mut self, seqs: RSlice<'_, ffi::SeqStep<'_>>) -> RResult<RVec<i64>, RString> {
        if let Err(e) = check_step(&self.limits, &mut self.st.requests, &self.st.pages, &seqs) {
            return RResult::RErr(format!("refused step: {e}").into());
        }
        let page = self.limits.page_size;
        let st = &mut *self.st;
        let t0 = std::time::Instant::now();
        let completes: Vec<bool> =
            seqs.iter().map(|s| s.cached + s.new_tokens.len() == st.requests[&s.request].tokens.len()).collect();
        let draws: Vec<crate::sampling::RowDraw> = seqs
            .iter()
            .zip(&completes)
            .map(|(s, &c)| {
                let r = st.requests.get_mut(&s.request).expect("checked");
                if c {
                    r.sampler.draw()
                } else {
                    crate::sampling::RowDraw { temperature: 0.0, top_k: 0, top_p: 1.0, u: 0.0 }
                }
            })
            .collect();
        let steps: Vec<crate::runtime::SeqStep> = seqs
            .iter()
            .map(|s| crate::runtime::SeqStep {
                new_tokens: s.new_tokens.as_slice(),
                cached: s.cached,
                pages: s.pages.as_slice(),
            })
            .collect();
        let ids = match self.engine.forward_step(page, &steps, &draws, false).and_then(|out| out.tokens(&draws)) {
            Ok(ids) => ids,
            Err(e) => return RResult::RErr(format!("forward step failed: {e}").into()),
        };
        st.ran = true;
        st.cache_bytes = self.engine.host_cache_bytes();
        let n_tokens: usize = seqs.iter().map(|s| s.new_tokens.len()).sum();
        let prefill = seqs.iter().any(|s| s.new_tokens.len() > 1 || s.cached == 0);
        st.stats.steps += 1;
        st.stats.max_step_tokens = st.stats.max_step_tokens.max(n_tokens);
        let mut out = Vec::with_capacity(seqs.len());
        for ((s, &t), &complete) in seqs.iter().zip(&ids).zip(&completes) {
            let r = st.requests.get_mut(&s.request).expect("checked");
            // What its pages hold now.
            let end = s.cached + s.new_tokens.len();
            for (j, &p) in s.pages.iter().enumerate() {
                let (lo, hi) = (j * page, (j + 1) * page);
                if end > lo && s.cached < hi {
                    let upto = end.min(hi);
                    st.pages[p as usize] = Some((upto, r.key_through(page, j, upto)));
                }
            }
            r.pages = s.pages.to_vec();
            if !r.scheduled {
                r.scheduled = true;
                st.events.push(Event::Scheduled { id: s.request });
            }
            if !complete {
                out.push(-1);
                continue;
            }
            r.tokens.push(t);
            // A stop token ends the text; it is not part of it.
            let stop_token = r.sampler.params().stop_token_ids.contains(&t);
            if !stop_token {
                r.stopped_by_text |= r.text.as_mut().is_some_and(|x| x.push(t));
            }
            let text = r.text.as_mut().map(CompletionText::take_delta).unwrap_or_default();
            st.events.push(Event::Token { id: s.request, token: t, text, logprobs: None });
            out.push(t);
        }
        st.stats.peak_pages = st.stats.peak_pages.max(st.pages.iter().filter(|p| p.is_some()).count());
        if prefill {
            st.stats.prefill_tokens += n_tokens;
            st.stats.prefill_time += t0.elapsed();
        } else {
            st.stats.decode_tokens += seqs.len();
            st.stats.decode_time += t0.elapsed();
        }
        RResult::ROk(out.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(tokens: &[i64]) -> LibRequest {
        LibRequest {
            tokens: tokens.to_vec(),
            prompt_len: tokens.len(),
            sampler: Sampler::new(Default::default()),
            text: None,
            full_keys: Vec::new(),
            scheduled: false,
            pages: Vec::new(),
            stopped_by_text: false,
        }
    }

    fn seq<'a>(tokens: &'a [i64], cached: usize, pages: &'a [u32], request: u64) -> ffi::SeqStep<'a> {
        ffi::SeqStep { new_tokens: tokens.into(), cached, pages: pages.into(), request }
    }

    #[test]
    fn a_library_runtimes_bad_steps_are_refused_with_the_reason() {
        let l = Limits { max_batch: 2, page_size: 4, max_num_tokens: 5, max_len: 16, num_pages: 6 };
        let mut reqs: HashMap<RequestId, LibRequest> = HashMap::new();
        reqs.insert(0, request(&[5, 6, 7]));
        // Request 1 has 5 tokens in the cache (pages 1 and 2) and its sampled 6th to feed.
        reqs.insert(1, request(&[1, 2, 3, 4, 8, 9]));
        // Request 2 shares request 1's first 4 tokens (a full page), then differs.
        reqs.insert(2, request(&[1, 2, 3, 4, 7, 7]));
        let mut pages = vec![None; 6];
        let k =
            |reqs: &mut HashMap<RequestId, LibRequest>, r, j, upto| reqs.get_mut(&r).unwrap().key_through(4, j, upto);
        pages[1] = Some((4, k(&mut reqs, 1, 0, 4)));
        pages[2] = Some((5, k(&mut reqs, 1, 1, 5)));
        let mut check = |seqs: &[ffi::SeqStep]| check_step(&l, &mut reqs, &pages, seqs);
        // A prefill of 3 and a decode at position 5 reading its own pages: fine.
        assert_eq!(check(&[seq(&[5, 6, 7], 0, &[0], 0), seq(&[9], 5, &[1, 2], 1)]), Ok(()));
        // Request 2 reads request 1's full first page (the same 4 tokens): a verified shared prefix.
        assert_eq!(check(&[seq(&[7, 7], 4, &[1, 3], 2)]), Ok(()));
        let mut refused = |seqs: &[ffi::SeqStep], why: &str| {
            let e = check(seqs).unwrap_err();
            assert!(e.contains(why), "{e} (wanted {why})");
        };
        refused(&[], "at least one sequence");
        refused(&[seq(&[5], 0, &[0], 0), seq(&[1], 0, &[1], 1), seq(&[1], 0, &[2], 2)], "max_batch_size is 2");
        refused(
            &[seq(&[5, 6, 7], 0, &[0], 0), seq(&[1, 2, 3], 0, &[1], 1)],
            "6 tokens in one step; max_num_tokens is 5",
        );
        refused(&[seq(&[5], 0, &[0], 9)], "request 9 is not one the runtime was given");
        refused(&[seq(&[5], 0, &[0], 0), seq(&[5], 0, &[1], 0)], "appears twice");
        refused(&[seq(&[], 0, &[0], 0)], "no new tokens");
        refused(&[seq(&[5, 6, 8], 0, &[0], 0)], "not request 0's tokens from position 0");
        refused(&[seq(&[5, 6, 7], 0, &[], 0)], "0 pages of 4 positions cannot hold 3");
        refused(&[seq(&[5, 6, 7], 0, &[6], 0)], "page 6 is not below 6");
        refused(&[seq(&[5, 6, 7], 0, &[3], 0), seq(&[1], 0, &[3], 1)], "page 3 is written by two sequences");
        // Reading another request's positions that are not its own prefix: request 2 claims 5
        // cached tokens on request 1's pages (position 4 holds 8 there, 7 in request 2).
        refused(&[seq(&[7], 5, &[1, 2], 2)], "page 2 does not hold request 2's tokens at positions 4..5");
        // Claiming positions never written.
        refused(&[seq(&[7], 2, &[4], 0)], "page 4 does not hold request 0's tokens at positions 0..2");
    }
}
