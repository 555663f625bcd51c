//! The built-in runtimes, each the engine core (`autodeploy_core::engine_core`) under one of its
//! scheduling policies:
//! - `demollm`: the simple reference. Admits up to `max_batch_size` requests, prefills the new
//!   ones together in one flattened step, then decodes all active sequences one token per step.
//! - `trtllm`: in-flight batching. Every step decodes all running sequences and fills the rest
//!   of `max_num_tokens` with prefill chunks; preempts (and later recomputes) a sequence when
//!   the KV cache runs out of pages.
//!
//! Both give the same greedy tokens (tests/tests/generate.rs).

use autodeploy_core::config::PipelineConfig;
use autodeploy_core::engine_core::{EngineCore, Limits, Policy};
use autodeploy_core::error::Result;
use autodeploy_core::registry::RuntimePlugin;
use autodeploy_core::runtime::{Event, Gauges, ModelRunner, Request, RequestId, RunStats, Runtime};

autodeploy_core::inventory::submit! {
    RuntimePlugin {
        name: "demollm",
        aliases: &["demo"],
        version: env!("CARGO_PKG_VERSION"),
        make: |cfg| Box::new(CoreRuntime::new(cfg, Policy::PrefillFirst)),
    }
}

autodeploy_core::inventory::submit! {
    RuntimePlugin {
        name: "trtllm",
        aliases: &["in-flight"],
        version: env!("CARGO_PKG_VERSION"),
        make: |cfg| Box::new(CoreRuntime::new(cfg, Policy::InFlight)),
    }
}

/// A built-in runtime: the engine core under its policy, made for the engine of the first
/// request it is given (the core needs the engine's page count and cache layout).
pub struct CoreRuntime {
    limits: Limits,
    policy: Policy,
    core: Option<EngineCore>,
}

impl CoreRuntime {
    pub fn new(cfg: &PipelineConfig, policy: Policy) -> CoreRuntime {
        CoreRuntime { policy, limits: Limits::from_config(cfg), core: None }
    }
}

impl Runtime for CoreRuntime {
    fn add_request(&mut self, engine: &dyn ModelRunner, req: Request) -> Result<RequestId> {
        let (limits, policy) = (self.limits, self.policy);
        self.core.get_or_insert_with(|| EngineCore::with_policy(engine, limits, policy)).add_request(engine, req)
    }

    fn abort(&mut self, id: RequestId) -> bool {
        self.core.as_mut().is_some_and(|c| c.abort(id))
    }

    fn step(&mut self, engine: &mut dyn ModelRunner) -> Vec<Event> {
        self.core.as_mut().map(|c| c.step(engine)).unwrap_or_default()
    }

    fn has_unfinished(&self) -> bool {
        self.core.as_ref().is_some_and(EngineCore::has_unfinished)
    }

    fn stats(&self) -> RunStats {
        self.core.as_ref().map(EngineCore::stats).unwrap_or_default()
    }

    fn reset_stats(&mut self) {
        if let Some(c) = self.core.as_mut() {
            c.reset_stats();
        }
    }

    fn gauges(&self) -> Gauges {
        self.core.as_ref().map(EngineCore::gauges).unwrap_or_default()
    }
}
