//! From a pipeline config to a runnable engine: resolve the model, import it, run the stages,
//! compile. Transforms register per stage as they land; a stage with none leaves the graph as is.

use std::time::{Duration, Instant};

use autodeploy_sdk::Stage;

use crate::config::PipelineConfig;
use crate::error::{Error, Result};
use crate::hub;
use crate::ir::Graph;
use crate::registry::{self, CompiledModel, ImportRequest};
use crate::tensor::Tensor;

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
    pub build_time: Duration,
}

pub fn build(cfg: &PipelineConfig) -> Result<Engine> {
    let t0 = Instant::now();
    let graph = graph_after(cfg, Stage::CacheInit)?;
    let backend = registry::compile_backend(&cfg.compile_backend)?;
    tracing::info!(backend = %cfg.compile_backend, nodes = graph.nodes.len(), "compiling");
    let model = backend.compile(&graph)?;
    Ok(Engine { graph, model, build_time: t0.elapsed() })
}

/// Longest sequence the graph accepts (its `seq` range), if it has one.
pub fn max_seq(graph: &Graph) -> Option<usize> {
    graph.symbols.get("seq").map(|r| r.max)
}

/// Greedy generation by re-running the full sequence each step (no KV cache yet).
/// Returns the new tokens and the time of the first forward (the prefill).
pub fn generate_greedy(engine: &mut Engine, prompt: &[i64], max_new_tokens: usize) -> Result<(Vec<i64>, Duration)> {
    if let Some(max) = max_seq(&engine.graph) {
        if prompt.len() + max_new_tokens > max {
            return Err(Error::Msg(format!(
                "prompt of {} tokens + max_new_tokens {max_new_tokens} exceeds the longest sequence the engine accepts ({max}; see max_seq_len)",
                prompt.len()
            )));
        }
    }
    let mut seq = prompt.to_vec();
    let mut prefill = Duration::ZERO;
    for step in 0..max_new_tokens {
        let t = Instant::now();
        let n = seq.len();
        let ids = Tensor::from_i64(vec![1, n], seq.clone())?;
        let pos = Tensor::from_i64(vec![1, n], (0..n as i64).collect())?;
        let out = engine.model.forward(&[ids, pos])?;
        let logits = out[0].to_f32();
        let vocab = *out[0].shape().last().unwrap_or(&1);
        let last = &logits[(n - 1) * vocab..n * vocab];
        let mut best = 0;
        for (i, &x) in last.iter().enumerate() {
            if x > last[best] {
                best = i;
            }
        }
        seq.push(best as i64);
        if step == 0 {
            prefill = t.elapsed();
        }
    }
    Ok((seq[prompt.len()..].to_vec(), prefill))
}
