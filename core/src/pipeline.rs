//! From a pipeline config to a runnable engine: resolve the model, import it, run the transform
//! stages, compile.

use std::time::{Duration, Instant};

use autodeploy_sdk::Stage;

use crate::config::PipelineConfig;
use crate::error::Result;
use crate::hub;
use crate::ir::Graph;
use crate::kvcache::CacheSpec;
use crate::registry::{self, CompiledModel, ImportRequest};

/// Resolves and imports the model named by the config.
pub fn import(cfg: &PipelineConfig) -> Result<Graph> {
    let path = hub::resolve_model(&cfg.model, cfg.base_dir.as_deref())?;
    let (name, importer) = match &cfg.importer {
        Some(n) => (n.clone(), registry::importer(n)?),
        None => {
            let (n, i) = registry::detect_importer(&path)?;
            (n.to_string(), i)
        }
    };
    tracing::info!(importer = %name, path = %path.display(), "importing");
    let req =
        ImportRequest { path, dtype: cfg.dtype(), max_batch_size: cfg.max_batch_size, max_seq_len: cfg.max_seq_len };
    importer.import(&req)
}

/// The graph as it stands after `stage`.
pub fn graph_after(cfg: &PipelineConfig, stage: Stage) -> Result<Graph> {
    let mut g = import(cfg)?;
    crate::transform::run_stages(&mut g, cfg, stage)?;
    Ok(g)
}

pub struct Engine {
    pub graph: Graph,
    pub model: Box<dyn CompiledModel>,
    /// Set when the graph has cached attention; `None` means full-sequence forwards.
    pub cache: Option<CacheSpec>,
    /// The model's tokenizer, when its importer provides one (needed for stop strings).
    pub detokenizer: Option<std::sync::Arc<dyn crate::runtime::Detokenizer>>,
    pub build_time: Duration,
}

impl Engine {
    /// Longest sequence one request may reach (prompt + generated).
    pub fn max_seq_len(&self, cfg: &PipelineConfig) -> usize {
        self.graph.symbols.get("seq").map(|r| r.max).unwrap_or(usize::MAX).min(cfg.max_seq_len)
    }
}

pub fn build(cfg: &PipelineConfig) -> Result<Engine> {
    let t0 = Instant::now();
    let graph = graph_after(cfg, Stage::CacheInit)?;
    let backend = registry::compile_backend(&cfg.compile_backend)?;
    tracing::info!(backend = %cfg.compile_backend, nodes = graph.nodes.len(), "compiling");
    let model = backend.compile(&graph)?;
    let cache = CacheSpec::of(&graph)?;
    Ok(Engine { graph, model, cache, detokenizer: None, build_time: t0.elapsed() })
}
