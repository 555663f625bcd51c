//! `LLM`: an engine on its own thread, behind a handle any thread (or async task) can submit
//! requests to. The thread owns the engine and one runtime (the config's: built in, an engine
//! core under a policy, or a plugin's) for the engine's whole life: requests join and leave
//! between steps, pages go back to the pool as each finishes, and the prefix cache outlives the
//! requests that filled it.
//!
//! ```no_run
//! use autodeploy_core::config::PipelineConfig;
//! use autodeploy_core::sampling::SamplingParams;
//! use autodeploy_serve::{Output, LLM};
//!
//! let cfg = PipelineConfig::from_file("examples/smollm2-cpu.toml".as_ref())?;
//! let llm = LLM::new(&cfg)?;
//! let params = SamplingParams { max_new_tokens: 32, ..Default::default() };
//! // Whole completions, in prompt order (each may fail alone).
//! for c in llm.generate(&["The capital of France is", "1, 2, 3,"], &params)? {
//!     println!("{:?}", c?.text);
//! }
//! // One completion as it is generated.
//! let mut sub = llm.submit(llm.text_request("Once upon a time", &params, false)?)?;
//! while let Some(out) = sub.blocking_next() {
//!     match out {
//!         Output::Token { text, .. } => print!("{text}"),
//!         Output::Finished(res) => println!("\n{:?}", res.map(|c| c.finish)),
//!         Output::Accepted => {}
//!     }
//! }
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use autodeploy_core::config::PipelineConfig;
use autodeploy_core::error::Error;
use autodeploy_core::pipeline::{self, Engine};
use autodeploy_core::runtime::{Completion, FinishReason, Request};
use autodeploy_core::runtime::{Event, RequestId, Runtime};
use autodeploy_core::sampling::{SamplingParams, TokenLogprobs};
use autodeploy_core::tokenizer::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::metrics::Metrics;

/// What the engine says about one submitted request, in order: `Accepted` (or at once a
/// `Finished` error naming the field at fault), then its tokens, then `Finished`.
#[derive(Debug)]
pub enum Output {
    Accepted,
    /// A generated token and the completion text it made final (see `Event::Token`).
    Token {
        token: i64,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    Finished(Result<Completion, Error>),
}

/// Why a request was not taken at all.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity ({0} requests running or queued); try again later")]
    Overloaded(usize),
    #[error("the engine has stopped: {0}")]
    Dead(String),
}

/// What the server needs to know about the engine, fixed once it is built.
#[derive(Clone)]
pub struct LlmInfo {
    /// The name requests and `/v1/models` use: the config's `model`.
    pub model: String,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The token ids that end a generation (the engine's `eos_ids`).
    pub eos_ids: Vec<i64>,
    /// Token ids must lie below it (when the graph says).
    pub vocab_size: Option<usize>,
    /// Longest sequence (prompt + generated) a request may reach.
    pub max_seq_len: usize,
    pub max_new_tokens: usize,
    /// Requests running or queued at once before `SubmitError::Overloaded`.
    pub capacity: usize,
    /// Seconds since the Unix epoch when the engine was ready.
    pub created: u64,
}

enum Command {
    Add {
        key: u64,
        req: Request,
        tx: UnboundedSender<Output>,
        arrived: Instant,
    },
    Abort(u64),
    /// Finish what is in flight, then stop.
    Drain,
}

struct Shared {
    alive: AtomicBool,
    /// Why the engine thread stopped, once it has.
    death: Mutex<Option<String>>,
    next_key: AtomicU64,
    /// Requests submitted and not yet finished.
    in_flight: AtomicUsize,
    metrics: Mutex<Metrics>,
}

/// An engine on its own thread (module docs). Dropping it finishes the requests in flight and
/// stops the thread.
pub struct LLM {
    info: LlmInfo,
    shared: Arc<Shared>,
    cmd: mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One submitted request's outputs. Dropping it before `Finished` aborts the request (its pages
/// go back to the pool at the engine's next step).
pub struct Submission {
    key: u64,
    rx: UnboundedReceiver<Output>,
    cmd: mpsc::Sender<Command>,
    done: bool,
}

impl Submission {
    fn on(&mut self, out: Option<Output>) -> Option<Output> {
        if self.done {
            return None;
        }
        let out = out.unwrap_or_else(|| {
            Output::Finished(Err(Error::Msg("the engine stopped before the request finished".into())))
        });
        self.done = matches!(out, Output::Finished(_));
        Some(out)
    }

    /// The next output; `None` after `Finished`.
    pub async fn next(&mut self) -> Option<Output> {
        if self.done {
            return None;
        }
        let out = self.rx.recv().await;
        self.on(out)
    }

    /// `next` for threads outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Output> {
        if self.done {
            return None;
        }
        let out = self.rx.blocking_recv();
        self.on(out)
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.cmd.send(Command::Abort(self.key));
        }
    }
}

impl LLM {
    /// Builds the engine (on its thread; CUDA state stays on the thread that made it) and
    /// starts the loop under the config's runtime (built in or a plugin's).
    pub fn new(cfg: &PipelineConfig) -> anyhow::Result<LLM> {
        autodeploy_plugins::link();
        let runtime = autodeploy_core::registry::runtime(cfg)?;
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            death: Mutex::new(None),
            next_key: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            metrics: Mutex::new(Metrics::default()),
        });
        let (cmd, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread_cfg = cfg.clone();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new().name("autodeploy-engine".into()).spawn(move || {
            let engine = match pipeline::build(&thread_cfg) {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            let info = LlmInfo {
                model: thread_cfg.model.clone(),
                tokenizer: engine.tokenizer.clone(),
                eos_ids: engine.eos_ids.clone(),
                vocab_size: engine.vocab_size(),
                max_seq_len: engine.max_seq_len(&thread_cfg),
                max_new_tokens: thread_cfg.max_new_tokens,
                capacity: thread_cfg.max_batch_size + thread_cfg.max_waiting_requests,
                created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            };
            let _ = ready_tx.send(Ok(info));
            engine_loop(engine, runtime, rx, thread_shared);
        })?;
        let info = ready_rx.recv().map_err(|_| anyhow::anyhow!("the engine thread stopped while building"))??;
        Ok(LLM { info, shared, cmd, thread: Some(thread) })
    }

    pub fn info(&self) -> &LlmInfo {
        &self.info
    }

    /// The name requests must use and `/v1/models` lists.
    pub fn set_served_name(&mut self, name: &str) {
        self.info.model = name.to_string();
    }

    /// Whether the engine thread is running.
    /// Whether the engine still runs: its thread has not stopped, and (sharded) no rank has
    /// failed, as this process's communicator knows at once even while a step waits on it.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire) && autodeploy_core::comm::process_failure().is_none()
    }

    /// The engine's counters and histograms now.
    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// `params` with the model's end-of-sequence token among the stop tokens, unless
    /// `ignore_eos`.
    pub fn with_eos(&self, mut params: SamplingParams, ignore_eos: bool) -> SamplingParams {
        for &eos in &self.info.eos_ids {
            if !ignore_eos && !params.stop_token_ids.contains(&eos) {
                params.stop_token_ids.push(eos);
            }
        }
        params
    }

    /// A request for `text` (tokenized with the model's BOS where it wants one), stopping at
    /// EOS unless `ignore_eos`.
    pub fn text_request(&self, text: &str, params: &SamplingParams, ignore_eos: bool) -> anyhow::Result<Request> {
        let tok = self.info.tokenizer.as_ref().ok_or_else(|| anyhow::anyhow!("this model has no tokenizer"))?;
        Ok(Request { prompt: tok.encode(text, true)?, sampling: self.with_eos(params.clone(), ignore_eos) })
    }

    /// Queues one request; see `submit_all`.
    pub fn submit(&self, req: Request) -> Result<Submission, SubmitError> {
        Ok(self.submit_all(vec![req])?.pop().expect("one submission per request"))
    }

    /// Queues requests together (all or none: the capacity is checked for all of them).
    pub fn submit_all(&self, reqs: Vec<Request>) -> Result<Vec<Submission>, SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Dead(self.death()));
        }
        let n = reqs.len();
        let cap = self.info.capacity;
        if self.shared.in_flight.fetch_add(n, Ordering::AcqRel) + n > cap {
            self.shared.in_flight.fetch_sub(n, Ordering::AcqRel);
            if let Ok(mut m) = self.shared.metrics.lock() {
                m.rejected += n as u64;
            }
            return Err(SubmitError::Overloaded(cap));
        }
        let arrived = Instant::now();
        let mut subs = Vec::with_capacity(n);
        for req in reqs {
            let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = unbounded_channel();
            if self.cmd.send(Command::Add { key, req, tx, arrived }).is_err() {
                return Err(SubmitError::Dead(self.death()));
            }
            subs.push(Submission { key, rx, cmd: self.cmd.clone(), done: false });
        }
        Ok(subs)
    }

    /// Generates for every prompt (tokenized, stopping at EOS) and waits for all of them; each
    /// completion fails alone. Call it from a plain thread, not inside an async runtime.
    pub fn generate(
        &self,
        prompts: &[&str],
        params: &SamplingParams,
    ) -> anyhow::Result<Vec<Result<Completion, Error>>> {
        let reqs = prompts.iter().map(|p| self.text_request(p, params, false)).collect::<anyhow::Result<Vec<_>>>()?;
        let subs = self.submit_all(reqs)?;
        Ok(subs
            .into_iter()
            .map(|mut s| loop {
                match s.blocking_next() {
                    Some(Output::Finished(r)) => break r,
                    Some(_) => {}
                    None => break Err(Error::Msg("the request ended without a result".into())),
                }
            })
            .collect())
    }

    /// Why the engine stopped (once it has).
    pub fn death(&self) -> String {
        let recorded = self.shared.death.lock().ok().and_then(|d| d.clone());
        recorded.or_else(autodeploy_core::comm::process_failure).unwrap_or_else(|| "it was shut down".into())
    }

    /// Finishes the requests in flight and stops the engine thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.cmd.send(Command::Drain);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LLM {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A request the engine thread is serving.
struct Live {
    key: u64,
    tx: UnboundedSender<Output>,
    arrived: Instant,
    last_token: Option<Instant>,
}

/// The engine thread: takes commands between steps, steps while anything is unfinished, and
/// sends each request its outputs. A request whose receiver is gone is aborted. A panic in a
/// step fails every request and marks the engine dead (health answers 503 from then on).
fn engine_loop(mut engine: Engine, mut core: Box<dyn Runtime>, rx: mpsc::Receiver<Command>, shared: Arc<Shared>) {
    let mut live: HashMap<RequestId, Live> = HashMap::new();
    let mut by_key: HashMap<u64, RequestId> = HashMap::new();
    let mut draining = false;
    let finish = |shared: &Shared, m: &mut Metrics, outcome: Option<&Result<Completion, Error>>| {
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        match outcome {
            Some(Ok(c)) if c.finish == FinishReason::Stop => m.finished_stop += 1,
            Some(Ok(_)) => m.finished_length += 1,
            Some(Err(_)) => m.failed += 1,
            None => m.finished_abort += 1,
        }
    };
    loop {
        let mut commands: Vec<Command> = Vec::new();
        if !core.has_unfinished() {
            if draining {
                break;
            }
            // Idle: a sharded engine's rank that stops is noticed within half a second.
            match rx.recv_timeout(std::time::Duration::from_millis(500)) {
                Ok(c) => commands.push(c),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(why) = autodeploy_core::runtime::ModelRunner::failure(&engine) {
                        fail_all(&shared, &mut live, &why);
                        return;
                    }
                    continue;
                }
                // Every handle is gone.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        commands.extend(rx.try_iter());
        {
            let mut m = shared.metrics.lock().unwrap_or_else(|p| p.into_inner());
            for c in commands {
                match c {
                    Command::Add { key, req, tx, arrived } => {
                        let prompt_len = req.prompt.len();
                        match core.add_request(&engine, req) {
                            Ok(id) => {
                                m.prompt_tokens += prompt_len as u64;
                                let _ = tx.send(Output::Accepted);
                                live.insert(id, Live { key, tx, arrived, last_token: None });
                                by_key.insert(key, id);
                            }
                            Err(e) => {
                                shared.in_flight.fetch_sub(1, Ordering::AcqRel);
                                let _ = tx.send(Output::Finished(Err(e)));
                            }
                        }
                    }
                    Command::Abort(key) => {
                        if let Some(id) = by_key.remove(&key) {
                            live.remove(&id);
                            core.abort(id);
                            finish(&shared, &mut m, None);
                        }
                    }
                    Command::Drain => draining = true,
                }
            }
        }
        if !core.has_unfinished() {
            update_gauges(core.as_ref(), &shared);
            continue;
        }
        let step_start = Instant::now();
        let events = match std::panic::catch_unwind(AssertUnwindSafe(|| core.step(&mut engine))) {
            Ok(ev) => ev,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                fail_all(&shared, &mut live, &format!("the engine failed in a step: {why}"));
                return;
            }
        };
        if let Some(why) = autodeploy_core::runtime::ModelRunner::failure(&engine) {
            // A rank of a sharded engine failed: nothing more can run.
            fail_all(&shared, &mut live, &why);
            return;
        }
        let now = Instant::now();
        // Gauges first: whoever hears of a finished request sees the pages it freed.
        update_gauges(core.as_ref(), &shared);
        let mut gone: Vec<RequestId> = Vec::new();
        let gone_empty;
        {
            let mut m = shared.metrics.lock().unwrap_or_else(|p| p.into_inner());
            for ev in events {
                match ev {
                    Event::Scheduled { id } => {
                        if let Some(l) = live.get(&id) {
                            m.queue.observe(step_start.saturating_duration_since(l.arrived).as_secs_f64());
                        }
                    }
                    Event::Token { id, token, text, logprobs } => {
                        let Some(l) = live.get_mut(&id) else { continue };
                        m.generation_tokens += 1;
                        match l.last_token {
                            None => m.ttft.observe(now.duration_since(l.arrived).as_secs_f64()),
                            Some(t) => m.itl.observe(now.duration_since(t).as_secs_f64()),
                        }
                        l.last_token = Some(now);
                        if l.tx.send(Output::Token { token, text, logprobs }).is_err() {
                            gone.push(id);
                        }
                    }
                    Event::Finished { id, result } => {
                        let Some(l) = live.remove(&id) else { continue };
                        by_key.remove(&l.key);
                        m.e2e.observe(now.duration_since(l.arrived).as_secs_f64());
                        finish(&shared, &mut m, Some(&result));
                        let _ = l.tx.send(Output::Finished(result));
                    }
                }
            }
            // Receivers dropped without an abort (a client gone mid-step): abort them now.
            gone_empty = gone.is_empty();
            for id in gone {
                if let Some(l) = live.remove(&id) {
                    by_key.remove(&l.key);
                    core.abort(id);
                    finish(&shared, &mut m, None);
                }
            }
        }
        if !gone_empty {
            update_gauges(core.as_ref(), &shared);
        }
    }
    shared.alive.store(false, Ordering::Release);
}

/// The engine can run nothing more: health answers 503 from now on, and every live request
/// fails saying why.
fn fail_all(shared: &Shared, live: &mut HashMap<RequestId, Live>, why: &str) {
    tracing::error!("{why}");
    if let Ok(mut d) = shared.death.lock() {
        *d = Some(why.to_string());
    }
    shared.alive.store(false, Ordering::Release);
    for (_, l) in live.drain() {
        let _ = l.tx.send(Output::Finished(Err(Error::Msg(format!("the engine failed: {why}")))));
    }
}

fn update_gauges(core: &dyn Runtime, shared: &Shared) {
    let stats = core.stats();
    let g = core.gauges();
    let mut m = shared.metrics.lock().unwrap_or_else(|p| p.into_inner());
    m.running = g.running;
    m.waiting = g.waiting;
    m.pages_total = g.pages_total;
    m.pages_prefix_only = g.pages_prefix_only;
    m.pages_used = g.pages_used;
    m.prefix_queries = stats.prefix_queried_tokens as u64;
    m.prefix_hits = stats.prefix_hit_tokens as u64;
    m.preemptions = stats.preemptions as u64;
}
