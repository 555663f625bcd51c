//! `sequential`: a runtime that serves one request at a time — its whole prompt in one step,
//! then one token per step — in the fewest pages it needs. The simplest correct scheduler, for
//! reading alongside the built-in `demollm` (which batches): with greedy sampling both give the
//! same tokens. The host drives it: requests are added and aborted between steps, and each
//! `step` runs one engine step for the request at the head of the queue.

use std::collections::VecDeque;

use autodeploy_sdk::abi_stable::std_types::{RResult, RSlice, RVec};
use autodeploy_sdk::ffi::{runtime_box, EngineRef, Runtime, RuntimeBox, RuntimeFinished, RuntimeRequest, SeqStep};

pub extern "C" fn new_sequential() -> RuntimeBox {
    runtime_box(Sequential::default())
}

struct Active {
    id: u64,
    request: RuntimeRequest,
    /// The prompt, then each token the engine sampled.
    tokens: Vec<i64>,
    /// Tokens the KV cache holds.
    cached: usize,
}

#[derive(Default)]
struct Sequential {
    queue: VecDeque<(u64, RuntimeRequest)>,
    active: Option<Active>,
}

impl Runtime for Sequential {
    fn add_request(&mut self, id: u64, request: RuntimeRequest) {
        self.queue.push_back((id, request));
    }

    fn abort(&mut self, id: u64) -> bool {
        if self.active.as_ref().is_some_and(|a| a.id == id) {
            self.active = None;
            return true;
        }
        let before = self.queue.len();
        self.queue.retain(|(i, _)| *i != id);
        self.queue.len() < before
    }

    fn has_unfinished(&self) -> bool {
        self.active.is_some() || !self.queue.is_empty()
    }

    fn step(&mut self, mut engine: EngineRef<'_>) -> RVec<RuntimeFinished> {
        if self.active.is_none() {
            let Some((id, request)) = self.queue.pop_front() else { return RVec::new() };
            let tokens = request.prompt.to_vec();
            self.active = Some(Active { id, request, tokens, cached: 0 });
        }
        let a = self.active.as_mut().expect("set above");
        let finished = |result| RVec::from(vec![RuntimeFinished { request: a.id, result }]);
        // The KV cache is free between requests, so it always starts at page 0 (a backend that
        // wants one run of pages per sequence gets pages 0..n).
        let (page_size, max_len, slot) = (engine.page_size(), engine.max_seq_len(), engine.pages_per_sequence());
        let len = a.tokens.len();
        let pages: Vec<u32> = (0..if slot > 0 { slot } else { len.div_ceil(page_size) } as u32).collect();
        let seq = SeqStep {
            new_tokens: a.tokens[a.cached..].into(),
            cached: a.cached,
            pages: pages.as_slice().into(),
            request: a.id,
        };
        let next = match engine.step(RSlice::from_slice(&[seq])) {
            RResult::ROk(ids) if ids.len() == 1 => ids[0],
            RResult::ROk(ids) => {
                let msg = format!("the engine returned {} tokens for one sequence", ids.len());
                let out = finished(RResult::RErr(msg.into()));
                self.active = None;
                return out;
            }
            RResult::RErr(e) => {
                let out = finished(RResult::RErr(e));
                self.active = None;
                return out;
            }
        };
        a.cached = len;
        a.tokens.push(next);
        let generated = a.tokens.len() - a.request.prompt.len();
        let stopped = a.request.stop_token_ids.contains(&next);
        if stopped || generated >= a.request.max_new_tokens || a.tokens.len() >= max_len {
            let out = finished(RResult::ROk(stopped));
            self.active = None;
            return out;
        }
        RVec::new()
    }
}
