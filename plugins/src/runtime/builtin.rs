//! The built-in runtimes, each the engine core (`autodeploy_core::engine_core`) under one of its
//! scheduling policies, stepped until a list of requests is done:
//! - `demollm`: the simple reference. Admits up to `max_batch_size` requests, prefills the new
//!   ones together in one flattened step, then decodes all active sequences one token per step.
//! - `trtllm`: in-flight batching. Every step decodes all running sequences and fills the rest
//!   of `max_num_tokens` with prefill chunks; preempts (and later recomputes) a sequence when
//!   the KV cache runs out of pages.
//!
//! Both give the same greedy tokens (tests/tests/generate.rs).

use autodeploy_core::config::PipelineConfig;
use autodeploy_core::engine_core::{EngineCore, Event, Limits, Policy};
use autodeploy_core::error::Result;
use autodeploy_core::pipeline::Engine;
use autodeploy_core::runtime::{Completion, Request, RunStats, Runtime, RuntimePlugin};

autodeploy_core::inventory::submit! {
    RuntimePlugin {
        name: "demollm",
        aliases: &["demo"],
        version: env!("CARGO_PKG_VERSION"),
        make: |cfg| Box::new(CoreRuntime::new(cfg, "demollm")),
    }
}

autodeploy_core::inventory::submit! {
    RuntimePlugin {
        name: "trtllm",
        aliases: &["in-flight"],
        version: env!("CARGO_PKG_VERSION"),
        make: |cfg| Box::new(CoreRuntime::new(cfg, "trtllm")),
    }
}

pub struct CoreRuntime {
    limits: Limits,
    policy: Policy,
}

impl CoreRuntime {
    pub fn new(cfg: &PipelineConfig, runtime: &str) -> CoreRuntime {
        let policy = Policy::of_runtime(runtime).expect("a built-in runtime's name");
        CoreRuntime { policy, limits: Limits::from_config(cfg) }
    }
}

impl Runtime for CoreRuntime {
    fn generate_streaming(
        &mut self,
        engine: &mut Engine,
        requests: &[Request],
        on_token: &mut dyn FnMut(usize, i64),
    ) -> (Vec<Result<Completion>>, RunStats) {
        let mut core = EngineCore::with_policy(engine, self.limits, self.policy);
        let mut results: Vec<Option<Result<Completion>>> = (0..requests.len()).map(|_| None).collect();
        // Request ids are handed out in order, so the id of a queued request maps back to its
        // index through this table.
        let mut index = std::collections::HashMap::new();
        for (i, r) in requests.iter().enumerate() {
            match core.add_request(engine, r.clone()) {
                Ok(id) => {
                    index.insert(id, i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        while core.has_unfinished() {
            for event in core.step(engine) {
                match event {
                    Event::Token { id, token, .. } => on_token(index[&id], token),
                    Event::Finished { id, result } => results[index[&id]] = Some(result),
                    Event::Scheduled { .. } => {}
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(autodeploy_core::error::Error::Msg("the request ended without a result".into()))
                })
            })
            .collect();
        (results, core.stats())
    }
}
