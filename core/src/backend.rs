//! What importers and compile backends implement: a model source turned into a graph, and a
//! graph made runnable. Plugins of both kinds register in `registry`.

use std::path::PathBuf;

use crate::dtype::DType;
use crate::error::Result;
use crate::ir::Graph;
use crate::kvcache::StepContext;
use crate::tensor::Tensor;

/// What an importer is asked to import.
#[derive(Clone, Debug)]
pub struct ImportRequest {
    /// A local folder or file the model lives in (hub ids are resolved before this).
    pub path: PathBuf,
    /// Requested compute dtype; `None` means the checkpoint's own.
    pub dtype: Option<DType>,
    pub max_batch_size: usize,
    pub max_seq_len: usize,
    /// Random weights from the config alone (`load_format = "dummy"`): for benchmarking shapes
    /// whose checkpoints are not at hand. Importers that cannot do this say so.
    pub dummy_weights: bool,
}

pub trait ModelImporter: Send + Sync {
    /// Whether this importer recognises what is at `path` (used when the config names none).
    fn accepts(&self, path: &std::path::Path) -> bool;
    fn import(&self, req: &ImportRequest) -> Result<Graph>;
    /// The model's tokenizer, if the files carry one.
    fn tokenizer(&self, _path: &std::path::Path) -> Result<Option<crate::tokenizer::Tokenizer>> {
        Ok(None)
    }
}

/// A graph made runnable: inputs in the graph's input order, outputs in its output order.
/// Graphs with cached attention need the step's context (plan and KV cache).
pub trait CompiledModel: Send {
    fn forward(&mut self, inputs: &[Tensor], step: Option<&mut StepContext>) -> Result<Vec<Tensor>>;

    /// The KV-cache pages the model made when it sized them itself (`free_mem_ratio`); `None`:
    /// the `kv_pages` it was compiled with.
    fn kv_pages(&self) -> Option<usize> {
        None
    }

    /// Whether the model keeps the KV cache itself (on its device), so the runtime only plans
    /// pages and never grows the host cache. Default: the runtime's `PagedKvCache` holds it.
    fn owns_kv_cache(&self) -> bool {
        false
    }

    /// `Some(n)`: the model's attention wants each sequence in one contiguous slot of `n` pages
    /// (the `triton` backend); the runtime reserves such a slot per sequence at admission.
    fn kv_pages_per_sequence(&self) -> Option<usize> {
        None
    }

    /// A forward step that returns the argmax token of each gathered row instead of logits
    /// (greedy sampling where the logits live). `None`: not supported, use `forward`.
    fn forward_greedy(&mut self, _inputs: &[Tensor], _step: Option<&mut StepContext>) -> Result<Option<Vec<i64>>> {
        Ok(None)
    }

    /// A forward step that returns one token per gathered row, picked as `draws[row]` says
    /// (`sampling::pick`'s semantics, with the runtime's uniform draw) where the logits live,
    /// so they are not copied to the host. `None`: not supported, use `forward`.
    fn forward_sampled(
        &mut self,
        _inputs: &[Tensor],
        _step: Option<&mut StepContext>,
        _draws: &[crate::sampling::RowDraw],
    ) -> Result<Option<Vec<i64>>> {
        Ok(None)
    }
}

/// What a compile backend is asked for besides the graph.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    pub kernels: crate::cpu::KernelOptions,
    /// Where the model runs.
    pub device: crate::config::Device,
    /// Tokens per KV-cache page, and how many pages the runtime may hand out (a backend that
    /// keeps the cache on its device allocates them all up front).
    pub page_size: usize,
    pub kv_pages: usize,
    /// Size the KV cache from the device memory left free instead (the backend reports the
    /// pages it made through `CompiledModel::kv_pages`).
    pub free_mem_ratio: Option<f64>,
    /// The fewest pages that hold one sequence of the longest length.
    pub min_kv_pages: usize,
    /// Decode batch sizes to capture as CUDA graphs (`cudagraph`, `opt`).
    pub cuda_graph_batch_sizes: Vec<usize>,
    /// The attention backend's options, resolved (`registry::attention_backend_options`).
    pub attention_options: toml::Table,
    /// `[kernels]`: the CUDA executor's kernel choices.
    pub cuda_kernels: autodeploy_kernels::cuda::exec::KernelSettings,
}

impl CompileOptions {
    /// The options a config asks for; `kv_pages` is the engine's page pool (see
    /// `pipeline::kv_pages`).
    pub fn from_config(cfg: &crate::config::PipelineConfig, kv_pages: usize) -> CompileOptions {
        let int8_activations = cfg.activation_quant == crate::config::ActivationQuant::Int8;
        CompileOptions {
            kernels: crate::cpu::KernelOptions {
                int8_activations,
                cpu: cfg.cpu_kernels.resolve(),
                debug_checks: cfg.debug_checks,
            },
            device: cfg.resolved_device(),
            page_size: cfg.attn_page_size,
            kv_pages,
            // A fixed budget wins over the free-memory fraction.
            free_mem_ratio: cfg.free_mem_ratio.filter(|_| cfg.kv_cache_budget_mib.is_none()),
            min_kv_pages: 0,
            cuda_graph_batch_sizes: cfg.cuda_graph_batch_sizes(),
            // Checked when the config was validated; an error here surfaces when the backend is made.
            attention_options: crate::registry::attention_backend_options(cfg, &cfg.attn_backend).unwrap_or_default(),
            cuda_kernels: cfg.kernels.clone(),
        }
    }
}

pub trait CompileBackend: Send + Sync {
    fn compile(&self, graph: &Graph, opts: &CompileOptions) -> Result<Box<dyn CompiledModel>>;
}
