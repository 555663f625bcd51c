//! The runtime interface: requests in, completions out. A runtime schedules sequences, owns the
//! KV-cache pages and samples; it talks to the engine only through a batch of tokens, positions
//! and metadata in and logits out.

use std::time::Duration;

use crate::config::PipelineConfig;
use crate::error::Result;
use crate::pipeline::Engine;
use crate::sampling::SamplingParams;

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
}

pub trait Runtime {
    /// Generates for every request, calling `on_token(request index, token)` as each token is
    /// sampled. A bad request fails alone: its slot holds the error, the others complete.
    fn generate_streaming(
        &mut self,
        engine: &mut Engine,
        requests: &[Request],
        on_token: &mut dyn FnMut(usize, i64),
    ) -> (Vec<Result<Completion>>, RunStats);

    fn generate(&mut self, engine: &mut Engine, requests: &[Request]) -> (Vec<Result<Completion>>, RunStats) {
        self.generate_streaming(engine, requests, &mut |_, _| {})
    }
}

pub struct RuntimePlugin {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub version: &'static str,
    pub make: fn(&PipelineConfig) -> Box<dyn Runtime>,
}

inventory::collect!(RuntimePlugin);

pub fn runtime(cfg: &PipelineConfig) -> Result<Box<dyn Runtime>> {
    let name = cfg.runtime.as_str();
    inventory::iter::<RuntimePlugin>
        .into_iter()
        .find(|p| p.name == name || p.aliases.contains(&name))
        .map(|p| (p.make)(cfg))
        .ok_or_else(|| {
            let names: Vec<&str> = inventory::iter::<RuntimePlugin>.into_iter().map(|p| p.name).collect();
            crate::Error::Msg(format!("unknown runtime `{name}`; available: {}", names.join(", ")))
        })
}
