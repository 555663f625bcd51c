//! `sequential`: a runtime that serves one request at a time — its whole prompt in one step,
//! then one token per step — in the fewest pages it needs. The simplest correct scheduler, for
//! reading alongside the built-in `demollm` (which batches): with greedy sampling both give the
//! same tokens.

use autodeploy_sdk::abi_stable::std_types::{RResult, RSlice, RString, RVec};
use autodeploy_sdk::ffi::{runtime_box, EngineRef, Runtime, RuntimeBox, RuntimeCompletion, RuntimeRequest, SeqStep};

pub extern "C" fn new_sequential() -> RuntimeBox {
    runtime_box(Sequential)
}

struct Sequential;

impl Runtime for Sequential {
    fn generate(
        &mut self,
        mut engine: EngineRef<'_>,
        requests: RSlice<'_, RuntimeRequest>,
    ) -> RVec<RResult<RuntimeCompletion, RString>> {
        requests.iter().enumerate().map(|(i, r)| serve(&mut engine, i, r)).collect()
    }
}

/// Runs request `index` to completion. The KV cache is free between requests, so it always
/// starts at page 0 (a backend that wants one run of pages per sequence gets pages 0..n).
fn serve(engine: &mut EngineRef<'_>, index: usize, r: &RuntimeRequest) -> RResult<RuntimeCompletion, RString> {
    let (page_size, max_len) = (engine.page_size(), engine.max_seq_len());
    let slot = engine.pages_per_sequence();
    let mut tokens: Vec<i64> = r.prompt.to_vec();
    let mut generated = Vec::new();
    let mut cached = 0;
    loop {
        let len = tokens.len();
        let pages: Vec<u32> = (0..if slot > 0 { slot } else { len.div_ceil(page_size) } as u32).collect();
        let seq =
            SeqStep { new_tokens: tokens[cached..].into(), cached, pages: pages.as_slice().into(), request: index };
        let next = match engine.step(RSlice::from_slice(&[seq])) {
            RResult::ROk(ids) if ids.len() == 1 => ids[0],
            RResult::ROk(ids) => {
                return RResult::RErr(format!("the engine returned {} tokens for one sequence", ids.len()).into())
            }
            RResult::RErr(e) => return RResult::RErr(e),
        };
        cached = len;
        tokens.push(next);
        generated.push(next);
        engine.emit(index, next);
        let stopped = r.stop_token_ids.contains(&next);
        if stopped || generated.len() >= r.max_new_tokens || tokens.len() >= max_len {
            return RResult::ROk(RuntimeCompletion { tokens: generated.into(), stopped });
        }
    }
}
