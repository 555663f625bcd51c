//! Built-in plugins register themselves here with `inventory`; the host looks them up by kind
//! and name. External libraries join the same tables when the plugin ABI loads them.

use std::path::PathBuf;

use autodeploy_sdk::PluginKind;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::kvcache::{AttentionBackendPlugin, StepContext};
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
}

impl CompileOptions {
    /// The options a config asks for; `kv_pages` is the engine's page pool (see
    /// `pipeline::kv_pages`).
    pub fn from_config(cfg: &crate::config::PipelineConfig, kv_pages: usize) -> CompileOptions {
        let int8_activations = cfg.activation_quant == crate::config::ActivationQuant::Int8;
        CompileOptions {
            kernels: crate::cpu::KernelOptions { int8_activations },
            device: cfg.resolved_device(),
            page_size: cfg.attn_page_size,
            kv_pages,
            // A fixed budget wins over the free-memory fraction.
            free_mem_ratio: cfg.free_mem_ratio.filter(|_| cfg.kv_cache_budget_mib.is_none()),
            min_kv_pages: 0,
            cuda_graph_batch_sizes: cfg.cuda_graph_batch_sizes(),
        }
    }
}

pub trait CompileBackend: Send + Sync {
    fn compile(&self, graph: &Graph, opts: &CompileOptions) -> Result<Box<dyn CompiledModel>>;
}

pub struct ImporterPlugin {
    pub name: &'static str,
    pub version: &'static str,
    pub make: fn() -> Box<dyn ModelImporter>,
}

pub struct CompileBackendPlugin {
    pub name: &'static str,
    /// Other names accepted in configs (AutoDeploy's, such as `torch-simple`).
    pub aliases: &'static [&'static str],
    pub version: &'static str,
    pub make: fn() -> Box<dyn CompileBackend>,
}

inventory::collect!(ImporterPlugin);
inventory::collect!(CompileBackendPlugin);

/// A plugin from a library: its listing and how to make an instance (`T` is the host trait it
/// implements, through its ABI wrapper).
pub struct External<T: ?Sized> {
    pub name: &'static str,
    pub version: &'static str,
    /// The library's path.
    pub origin: &'static str,
    pub make: Box<dyn Fn() -> Box<T> + Send + Sync>,
}

/// The plugins of one kind that libraries registered, in load order. Libraries are never
/// unloaded, so entries live for the process.
pub struct ExternalTable<T: ?Sized + 'static>(std::sync::RwLock<Vec<&'static External<T>>>);

impl<T: ?Sized + 'static> ExternalTable<T> {
    pub const fn new() -> Self {
        ExternalTable(std::sync::RwLock::new(Vec::new()))
    }

    /// Adds `p`; refused if a built-in plugin of this kind (`builtin_taken`) or an earlier
    /// library's has its name. `kind` words the refusal (`a model importer`).
    pub fn register(&self, p: External<T>, kind: &str, builtin_taken: bool) -> std::result::Result<(), String> {
        if builtin_taken {
            return Err(format!("{kind} named `{}` already exists (built-in)", p.name));
        }
        let mut ext = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some(prev) = ext.iter().find(|q| q.name == p.name) {
            return Err(format!("{kind} named `{}` already exists ({})", p.name, prev.origin));
        }
        ext.push(Box::leak(Box::new(p)));
        Ok(())
    }

    pub fn all(&self) -> Vec<&'static External<T>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl<T: ?Sized + 'static> Default for ExternalTable<T> {
    fn default() -> Self {
        Self::new()
    }
}

static EXTERNAL_IMPORTERS: ExternalTable<dyn ModelImporter> = ExternalTable::new();

/// Adds a model importer from a plugin library; refused if the name is taken.
pub fn register_external_importer(i: External<dyn ModelImporter>) -> std::result::Result<(), String> {
    let builtin = inventory::iter::<ImporterPlugin>.into_iter().any(|p| p.name == i.name);
    EXTERNAL_IMPORTERS.register(i, "a model importer", builtin)
}

fn external_importers() -> Vec<&'static External<dyn ModelImporter>> {
    EXTERNAL_IMPORTERS.all()
}

/// Every importer's name, built-in and from libraries.
fn importer_names() -> String {
    names(
        inventory::iter::<ImporterPlugin>
            .into_iter()
            .map(|p| p.name)
            .chain(external_importers().iter().map(|p| p.name)),
        |n| n,
    )
}

/// One row of `autodeploy plugins`.
#[derive(Clone, Debug)]
pub struct PluginListing {
    pub kind: PluginKind,
    pub name: &'static str,
    pub version: &'static str,
    pub origin: String,
}

pub fn list_plugins() -> Vec<PluginListing> {
    let mut v: Vec<PluginListing> = inventory::iter::<ImporterPlugin>
        .into_iter()
        .map(|p| PluginListing {
            kind: PluginKind::ModelImporter,
            name: p.name,
            version: p.version,
            origin: "built-in".into(),
        })
        .chain(inventory::iter::<CompileBackendPlugin>.into_iter().map(|p| PluginListing {
            kind: PluginKind::CompileBackend,
            name: p.name,
            version: p.version,
            origin: "built-in".into(),
        }))
        .chain(inventory::iter::<AttentionBackendPlugin>.into_iter().map(|p| PluginListing {
            kind: PluginKind::AttentionBackend,
            name: p.name,
            version: p.version,
            origin: "built-in".into(),
        }))
        .chain(inventory::iter::<crate::runtime::RuntimePlugin>.into_iter().map(|p| PluginListing {
            kind: PluginKind::Runtime,
            name: p.name,
            version: p.version,
            origin: "built-in".into(),
        }))
        .chain(external_importers().into_iter().map(|p| PluginListing {
            kind: PluginKind::ModelImporter,
            name: p.name,
            version: p.version,
            origin: p.origin.into(),
        }))
        .chain(crate::kvcache::external_attention_backends().into_iter().map(|p| PluginListing {
            kind: PluginKind::AttentionBackend,
            name: p.name,
            version: p.version,
            origin: p.origin.into(),
        }))
        .chain(EXTERNAL_COMPILE_BACKENDS.all().into_iter().map(|p| PluginListing {
            kind: PluginKind::CompileBackend,
            name: p.name,
            version: p.version,
            origin: p.origin.into(),
        }))
        .chain(crate::runtime::external_runtimes().into_iter().map(|p| PluginListing {
            kind: PluginKind::Runtime,
            name: p.name,
            version: p.version,
            origin: p.origin.into(),
        }))
        .chain(crate::custom_op::all().into_iter().map(|o| PluginListing {
            kind: PluginKind::Op,
            name: o.name,
            version: o.version,
            origin: o.origin.into(),
        }))
        .chain(crate::transform::all().into_iter().map(|t| PluginListing {
            kind: PluginKind::Transform,
            name: t.name,
            version: t.version,
            origin: t.origin.into(),
        }))
        .collect();
    v.sort_by(|a, b| (a.kind, a.name).cmp(&(b.kind, b.name)));
    v
}

fn names<T>(it: impl Iterator<Item = T>, f: impl Fn(T) -> &'static str) -> String {
    let mut v: Vec<&str> = it.map(f).collect();
    v.sort();
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

pub fn importer(name: &str) -> Result<Box<dyn ModelImporter>> {
    if let Some(p) = inventory::iter::<ImporterPlugin>.into_iter().find(|p| p.name == name) {
        return Ok((p.make)());
    }
    if let Some(p) = external_importers().into_iter().find(|p| p.name == name) {
        return Ok((p.make)());
    }
    Err(Error::Msg(format!("unknown importer `{name}`; available: {}", importer_names())))
}

/// The first importer that recognises `path`: the built-in ones first, then those of plugin
/// libraries in the order they loaded.
pub fn detect_importer(path: &std::path::Path) -> Result<(&'static str, Box<dyn ModelImporter>)> {
    for p in inventory::iter::<ImporterPlugin> {
        let imp = (p.make)();
        if imp.accepts(path) {
            return Ok((p.name, imp));
        }
    }
    for p in external_importers() {
        let imp = (p.make)();
        if imp.accepts(path) {
            return Ok((p.name, imp));
        }
    }
    Err(Error::Msg(format!(
        "{}: no importer recognises this model (importers: {}); a Hugging Face folder needs config.json",
        path.display(),
        importer_names()
    )))
}

static EXTERNAL_COMPILE_BACKENDS: ExternalTable<dyn CompileBackend> = ExternalTable::new();

/// Adds a compile backend from a plugin library; refused if the name is taken.
pub fn register_external_compile_backend(b: External<dyn CompileBackend>) -> std::result::Result<(), String> {
    let builtin =
        inventory::iter::<CompileBackendPlugin>.into_iter().any(|p| p.name == b.name || p.aliases.contains(&b.name));
    EXTERNAL_COMPILE_BACKENDS.register(b, "a compile backend", builtin)
}

/// The compile backend `name` names: built-in (by name or alias), then from libraries.
pub fn compile_backend(name: &str) -> Result<Box<dyn CompileBackend>> {
    if let Some(p) =
        inventory::iter::<CompileBackendPlugin>.into_iter().find(|p| p.name == name || p.aliases.contains(&name))
    {
        return Ok((p.make)());
    }
    let ext = EXTERNAL_COMPILE_BACKENDS.all();
    if let Some(p) = ext.iter().find(|p| p.name == name) {
        return Ok((p.make)());
    }
    Err(Error::Msg(format!(
        "unknown compile_backend `{name}`; available: {}{}",
        names(
            inventory::iter::<CompileBackendPlugin>.into_iter().map(|p| p.name).chain(ext.iter().map(|p| p.name)),
            |n| n
        ),
        crate::plugin_abi::refusals_note()
    )))
}

/// `plugin-registry.toml`: the external plugin libraries to load.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRegistryFile {
    #[serde(default)]
    pub library: Vec<LibraryEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibraryEntry {
    pub path: PathBuf,
}

/// Reads the registry file at `path` (absent: no external plugins) and loads the libraries it
/// lists. A malformed file is an error; a library that cannot be used is refused with its reason
/// (`plugin_abi::refusals`) and the host runs on.
pub fn read_plugin_registry(path: &std::path::Path) -> Result<PluginRegistryFile> {
    if !path.exists() {
        return Ok(PluginRegistryFile::default());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let reg: PluginRegistryFile =
        toml::from_str(&text).map_err(|e| Error::BadFile { file: path.into(), msg: e.to_string() })?;
    let paths: Vec<PathBuf> = reg.library.iter().map(|l| l.path.clone()).collect();
    crate::plugin_abi::load_libraries(path, &paths);
    Ok(reg)
}
