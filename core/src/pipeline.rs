//! From a pipeline config to a runnable engine: resolve the model, import it, run the transform
//! stages, compile.

use std::time::{Duration, Instant};

use autodeploy_sdk::Stage;

use crate::backend::{CompiledModel, ImportRequest};
use crate::config::PipelineConfig;
use crate::error::Result;
use crate::hub;
use crate::ir::Graph;
use crate::kvcache::CacheSpec;
use crate::registry;
use crate::tokenizer::Tokenizer;
use std::sync::Arc;

/// Resolves and imports the model named by the config.
pub fn import(cfg: &PipelineConfig) -> Result<Graph> {
    Ok(import_with_tokenizer(cfg)?.0)
}

/// The graph and, when the model files carry one, the tokenizer.
pub fn import_with_tokenizer(cfg: &PipelineConfig) -> Result<(Graph, Option<Tokenizer>)> {
    let (g, t, _) = import_all(cfg)?;
    Ok((g, t))
}

/// The token ids that end a generation, as transformers' `generate` takes them: the
/// tokenizer's EOS, and `eos_token_id` (one id or a list) from `generation_config.json`, else
/// from `config.json`, in the model's folder. A model without a tokenizer still stops there.
pub fn eos_ids(path: &std::path::Path, tokenizer: Option<&Tokenizer>) -> Vec<i64> {
    let mut ids: Vec<i64> = tokenizer.and_then(|t| t.eos_id).into_iter().collect();
    let dir = if path.is_dir() { Some(path) } else { None };
    let from = |file: &str| -> Option<Vec<i64>> {
        let text = std::fs::read_to_string(dir?.join(file)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        match v.get("eos_token_id")? {
            serde_json::Value::Number(n) => Some(vec![n.as_i64()?]),
            serde_json::Value::Array(a) => Some(a.iter().filter_map(serde_json::Value::as_i64).collect()),
            _ => None,
        }
    };
    for id in from("generation_config.json").or_else(|| from("config.json")).unwrap_or_default() {
        if id >= 0 && !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

fn import_all(cfg: &PipelineConfig) -> Result<(Graph, Option<Tokenizer>, Vec<i64>)> {
    let path = hub::resolve_model(&cfg.model, cfg.base_dir.as_deref())?;
    let (name, importer) = match &cfg.importer {
        Some(n) => (n.clone(), registry::importer(n)?),
        None => {
            let (n, i) = registry::detect_importer(&path)?;
            (n.to_string(), i)
        }
    };
    tracing::info!(importer = %name, path = %path.display(), "importing");
    let tokenizer = importer.tokenizer(&path)?;
    let req = ImportRequest {
        path,
        dtype: cfg.dtype(),
        max_batch_size: cfg.max_batch_size,
        max_seq_len: cfg.max_seq_len,
        dummy_weights: cfg.load_format == crate::config::LoadFormat::Dummy,
    };
    let graph = importer.import(&req)?;
    let eos = eos_ids(&req.path, tokenizer.as_ref());
    Ok((graph, tokenizer, eos))
}

/// The graph as it stands after `stage`.
pub fn graph_after(cfg: &PipelineConfig, stage: Stage) -> Result<Graph> {
    let mut g = import(cfg)?;
    crate::transform::run_stages(&mut g, cfg, stage)?;
    Ok(g)
}

fn transformed(cfg: &PipelineConfig, stage: Stage) -> Result<(Graph, Option<Tokenizer>, Vec<i64>)> {
    let (mut g, t, eos) = import_all(cfg)?;
    crate::transform::run_stages(&mut g, cfg, stage)?;
    Ok((g, t, eos))
}

pub struct Engine {
    pub graph: Graph,
    pub model: Box<dyn CompiledModel>,
    /// Set when the graph has cached attention; `None` means full-sequence forwards.
    pub cache: Option<CacheSpec>,
    /// The model's tokenizer, when its importer provides one.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The token ids that end a generation (`eos_ids`): stop tokens unless `ignore_eos`.
    pub eos_ids: Vec<i64>,
    /// What stop strings are matched with: the tokenizer, or a stand-in a caller sets.
    pub detokenizer: Option<Arc<dyn crate::runtime::Detokenizer>>,
    pub build_time: Duration,
    /// KV-cache pages the runtime may hand out (all sequences together).
    pub kv_pages: usize,
    /// The KV cache's storage on the host, for models that do not keep it on their device
    /// (made by the first step; `runtime::ModelRunner::forward_step`).
    pub host_cache: Option<crate::kvcache::PagedKvCache>,
    /// This engine's rank in a sharded group of `world_size` (1: not sharded). Rank 0 leads:
    /// its runtime's steps go to the others, which `follow` (comm/steps.rs).
    pub rank: usize,
    pub world_size: usize,
    /// Why this sharded engine stopped (a step or collective failed); later steps are refused.
    pub group_failure: Option<String>,
}

impl Engine {
    /// Longest sequence one request may reach (prompt + generated).
    pub fn max_seq_len(&self, cfg: &PipelineConfig) -> usize {
        self.max_seq_len_within(cfg.max_seq_len)
    }

    /// Longest sequence the graph accepts, within `cap`.
    pub fn max_seq_len_within(&self, cap: usize) -> usize {
        max_len(&self.graph, cap)
    }

    /// Rows of the token embedding the graph reads `input_ids` with: token ids must lie in
    /// `0..vocab`. `None` when the graph has no static-size embedding.
    pub fn vocab_size(&self) -> Option<usize> {
        let g = &self.graph;
        // A rank's slice of a sharded table knows the whole table's rows.
        if let Some(v) = g.nodes.iter().find_map(|n| n.op.vocab_embedding_of()) {
            return Some(v.vocab);
        }
        let node = g.nodes.iter().find(|n| n.op.is(crate::ops::gather::EMBEDDING))?;
        g.meta(*node.inputs.first()?).shape.first()?.as_static()
    }
}

/// Longest sequence the graph accepts: the per-sequence bound the importer set (kept as
/// `seq_len` once cache insertion widened `seq` to the flattened token count), within
/// `max_seq_len`.
fn max_len(g: &Graph, cap: usize) -> usize {
    let r = g.symbols.get("seq_len").or_else(|| g.symbols.get("seq"));
    r.map(|r| r.max).unwrap_or(usize::MAX).min(cap)
}

/// Pages one sequence of the longest length needs.
fn pages_per_sequence(g: &Graph, cfg: &PipelineConfig) -> usize {
    max_len(g, cfg.max_seq_len).div_ceil(cfg.attn_page_size.max(1))
}

/// Pages of the KV cache: what `kv_cache_budget_mib` holds, else enough for `max_batch_size`
/// sequences of the longest length (a backend sizing from free memory may change it). Refused
/// when the budget does not hold one longest sequence, naming the key.
pub fn kv_pages(g: &Graph, cfg: &PipelineConfig) -> Result<usize> {
    let page = cfg.attn_page_size.max(1);
    let one = pages_per_sequence(g, cfg);
    // Page ids are 32-bit: a pool past that is refused, never truncated.
    let all = cfg.max_batch_size.checked_mul(one).filter(|&n| n <= u32::MAX as usize).ok_or_else(|| {
        crate::error::Error::config(
            "<config>",
            "max_batch_size",
            format!(
                "{} sequences of {} pages need more than 2^32 KV-cache pages; lower max_batch_size or max_seq_len, or set kv_cache_budget_mib",
                cfg.max_batch_size, one
            ),
        )
    });
    let Some(mib) = cfg.kv_cache_budget_mib else { return all };
    let Some(spec) = CacheSpec::of(g)? else { return all };
    // The CPU's cache holds f32; a device's, the graph's cache dtype (FP8 layers one byte).
    let per_page = match cfg.resolved_device() {
        crate::config::Device::Cpu => spec.bytes_per_page(page, 4),
        _ => spec.device_bytes_per_page(page, cache_dtype(g).size_in_bytes()),
    };
    let pages = ((mib << 20) / per_page.max(1)).min(u32::MAX as usize);
    if pages < one {
        return Err(crate::error::Error::config(
            "<config>",
            "kv_cache_budget_mib",
            format!(
                "{mib} MiB hold {pages} pages of {page} tokens ({per_page} bytes each), fewer than the {one} one sequence of max_seq_len = {} needs",
                max_len(g, cfg.max_seq_len)
            ),
        ));
    }
    Ok(pages)
}

/// The dtype the KV cache stores (the cached attention's key input), f32 when there is none.
pub fn cache_dtype(g: &Graph) -> crate::DType {
    g.nodes
        .iter()
        .find(|n| n.op.is(crate::ops::attention::CACHED_ATTENTION))
        .map(|n| g.meta(n.inputs[1]).dtype)
        .unwrap_or(crate::DType::F32)
}

pub fn build(cfg: &PipelineConfig) -> Result<Engine> {
    let t0 = Instant::now();
    // Every stage, compile included: the graph `autodeploy graph --stage compile` prints is the
    // graph that is compiled.
    let (graph, tokenizer, eos_ids) = transformed(cfg, Stage::Compile)?;
    let backend = registry::compile_backend(&cfg.compile_backend)?;
    tracing::info!(backend = %cfg.compile_backend, nodes = graph.nodes.len(), "compiling");
    let kv_pages = kv_pages(&graph, cfg)?;
    let mut opts = crate::backend::CompileOptions::from_config(cfg, kv_pages);
    opts.attention_options = registry::attention_backend_options(cfg, &cfg.attn_backend)?;
    opts.kv_pages = check_host_memory(&graph, cfg, &opts.kernels, kv_pages)?;
    opts.min_kv_pages = pages_per_sequence(&graph, cfg);
    let model = backend.compile(&graph, &opts)?;
    let mut kv_pages = model.kv_pages().unwrap_or(kv_pages);
    if cfg.world_size > 1 {
        // Rank 0's scheduler hands out pages every rank must hold: the fewest any rank has.
        kv_pages = crate::comm::steps::fewest_pages(kv_pages)?;
    }
    tracing::info!(kv_pages, page_size = cfg.attn_page_size, "KV cache");
    let cache = CacheSpec::of(&graph)?;
    let tokenizer = tokenizer.map(Arc::new);
    let detokenizer = tokenizer.clone().map(|t| t as Arc<dyn crate::runtime::Detokenizer>);
    Ok(Engine {
        graph,
        model,
        cache,
        tokenizer,
        eos_ids,
        detokenizer,
        build_time: t0.elapsed(),
        kv_pages,
        host_cache: None,
        rank: cfg.rank,
        world_size: cfg.world_size,
        group_failure: None,
    })
}

/// Bytes of the graph's weights as the graph holds them (block-quantized ones at their
/// blocks' size); `None` past 2^64.
pub fn weight_bytes(g: &Graph) -> Option<u64> {
    weight_bytes_where(g, |_| true)
}

/// Bytes of the weights whose dtype passes `keep`.
fn weight_bytes_where(g: &Graph, keep: impl Fn(crate::DType) -> bool) -> Option<u64> {
    g.params.iter().filter(|p| keep(g.meta(p.value).dtype)).try_fold(0u64, |acc, p| acc.checked_add(param_bytes(g, p)?))
}

/// Bytes of one weight as the graph holds it (blocks at their size); `None` for a dynamic
/// shape or past 2^64.
pub fn param_bytes(g: &Graph, p: &crate::ir::Param) -> Option<u64> {
    let m = g.meta(p.value);
    let elems = m.shape.iter().try_fold(1u64, |n, d| n.checked_mul(d.as_static()? as u64))?;
    match m.dtype {
        crate::DType::Block(ty) => {
            let (per, size) = ty.block();
            elems.div_ceil(per as u64).checked_mul(size as u64)
        }
        crate::DType::F4E2M1 => Some(elems.div_ceil(2)),
        d => elems.checked_mul(d.size_in_bytes() as u64),
    }
}

/// The memory the host has available (`MemAvailable` in /proc/meminfo), when it says.
fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// On the CPU, before anything is allocated: refuses an engine whose weights and one longest
/// sequence's KV cache need more memory than the host has available (with the numbers and what
/// to lower), and limits the page pool to what the rest of that memory holds (the host cache
/// grows on demand; with fewer pages, admission waits and preemption frees pages instead of the
/// process running out of memory). Returns the pages to use.
fn check_host_memory(
    g: &Graph,
    cfg: &PipelineConfig,
    kernels: &crate::cpu::KernelOptions,
    kv_pages: usize,
) -> Result<usize> {
    if cfg.resolved_device() != crate::config::Device::Cpu {
        return Ok(kv_pages);
    }
    let Some(avail) = host_memory_available() else { return Ok(kv_pages) };
    let mut weights = weight_bytes(g).unwrap_or(u64::MAX);
    if kernels.int8_activations && kernels.cpu >= autodeploy_kernels::isa::CpuKernels::AvxVnni {
        // The VNNI linears keep a row-interleaved copy of the block weights.
        let blocks = weight_bytes_where(g, |d| matches!(d, crate::DType::Block(_))).unwrap_or(u64::MAX);
        weights = weights.saturating_add(blocks);
    }
    // The CPU's cache holds f32.
    let per_page = match CacheSpec::of(g)? {
        Some(spec) => spec.bytes_per_page(cfg.attn_page_size, 4) as u64,
        None => 0,
    };
    let one = pages_per_sequence(g, cfg).min(kv_pages) as u64;
    let needs = weights.saturating_add(one.saturating_mul(per_page));
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if needs > avail {
        return Err(crate::error::Error::Msg(format!(
            "this engine needs {:.1} GiB (weights {:.1} GiB, the KV cache of one {}-token sequence {:.1} GiB) and the \
             host has {:.1} GiB available: lower max_seq_len, or use a smaller model or dtype",
            gib(needs),
            gib(weights),
            max_len(g, cfg.max_seq_len),
            gib(one.saturating_mul(per_page)),
            gib(avail)
        )));
    }
    if per_page == 0 {
        return Ok(kv_pages);
    }
    // Nine tenths of what the weights leave, for the cache.
    let fit = ((avail - weights) / 10 * 9 / per_page) as usize;
    if kv_pages > fit {
        tracing::warn!(
            pages = kv_pages,
            limited_to = fit.max(one as usize),
            available_gib = format!("{:.1}", gib(avail)),
            "the KV cache is limited by the host's available memory"
        );
        return Ok(fit.max(one as usize));
    }
    Ok(kv_pages)
}
