//! The runtime interface: requests in, completions out. A runtime schedules sequences, owns the
//! KV-cache pages and samples; it talks to the engine only through a batch of tokens, positions
//! and metadata in and logits out.

use std::time::Duration;

use crate::config::PipelineConfig;
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
pub fn check_request(engine: &Engine, r: &Request, max_len: usize, max_num_tokens: usize) -> Result<()> {
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
    } else if !r.sampling.stop_strings.is_empty() && engine.detokenizer.is_none() {
        bad("stop_strings", "need a tokenizer to match text, and this model has none (use stop_token_ids)".into())
    } else if r.prompt.len() > max_num_tokens {
        bad("prompt", format!("{} tokens exceed max_num_tokens = {max_num_tokens}", r.prompt.len()))
    } else if let Some((at, id)) =
        engine.vocab_size().and_then(|v| r.prompt.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= v))
    {
        let vocab = engine.vocab_size().unwrap_or(0);
        bad("prompt", format!("token id {id} at position {at} is out of range for the vocabulary of {vocab}"))
    } else {
        Ok(())
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
/// ids instead of logits.
pub fn forward_cached(
    engine: &mut Engine,
    cache: &mut PagedKvCache,
    page_size: usize,
    seqs: &[SeqStep],
    draws: &[RowDraw],
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
    if draws.iter().all(|d| d.temperature <= 0.0 || d.top_k == 1) {
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

/// Makes a library's runtime for a config (what `External::make` gives for runtimes).
pub type RuntimeMaker = dyn Fn(&PipelineConfig) -> Box<dyn Runtime> + Send + Sync;

static EXTERNAL_RUNTIMES: crate::registry::ExternalTable<RuntimeMaker> = crate::registry::ExternalTable::new();

/// Adds a runtime from a plugin library; refused if a built-in runtime or an earlier library's
/// has its name.
pub fn register_external_runtime(r: crate::registry::External<RuntimeMaker>) -> std::result::Result<(), String> {
    let builtin = inventory::iter::<RuntimePlugin>.into_iter().any(|p| p.name == r.name || p.aliases.contains(&r.name));
    EXTERNAL_RUNTIMES.register(r, "a runtime", builtin)
}

pub fn external_runtimes() -> Vec<&'static crate::registry::External<RuntimeMaker>> {
    EXTERNAL_RUNTIMES.all()
}

/// The runtime `cfg.runtime` names: built-in (by name or alias), then from libraries.
pub fn runtime(cfg: &PipelineConfig) -> Result<Box<dyn Runtime>> {
    let name = cfg.runtime.as_str();
    if let Some(p) = inventory::iter::<RuntimePlugin>.into_iter().find(|p| p.name == name || p.aliases.contains(&name))
    {
        return Ok((p.make)(cfg));
    }
    if let Some(p) = external_runtimes().into_iter().find(|p| p.name == name) {
        return Ok((p.make)()(cfg));
    }
    let mut names: Vec<&str> = inventory::iter::<RuntimePlugin>.into_iter().map(|p| p.name).collect();
    names.extend(external_runtimes().iter().map(|p| p.name));
    names.sort();
    Err(Error::Msg(format!(
        "unknown runtime `{name}`; available: {}{}",
        names.join(", "),
        crate::plugin_abi::refusals_note()
    )))
}
