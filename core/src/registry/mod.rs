//! Every kind of plugin, in one place. Built-in plugins register themselves with `inventory`
//! (each kind's `*Plugin` struct below); libraries join the same tables when the plugin ABI loads
//! them (`plugin_abi`). The host looks plugins up here by kind and name, and
//! `autodeploy plugins` lists them from here. The traits a plugin implements live with what
//! they do (`backend`, `kvcache`, `runtime`, `transform`, `custom_op`).

mod ops;
mod transforms;

use std::marker::PhantomData;
use std::path::PathBuf;

use autodeploy_sdk::PluginKind;

pub use ops::{custom_op, custom_ops, register_op};
pub use transforms::{register_transform, transform, transforms, TransformPlugin, TransformRef};

use crate::backend::{CompileBackend, ModelImporter};
use crate::config::PipelineConfig;
use crate::error::{Error, Result};
use crate::kvcache::AttentionBackend;
use crate::runtime::Runtime;

/// What every built-in plugin's entry tells: its name, other names configs may use, its version.
pub trait Builtin: Sync + 'static {
    fn name(&self) -> &'static str;
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    fn version(&self) -> &'static str;
}

/// A plugin from a library: its listing and how to make an instance (`T` is the host trait it
/// implements, through its ABI wrapper).
pub struct External<T: ?Sized> {
    pub name: &'static str,
    pub version: &'static str,
    /// The library's path.
    pub origin: &'static str,
    pub make: Box<dyn Fn() -> Box<T> + Send + Sync>,
}

/// A plugin found by name: built in, or from a library.
pub enum Found<B: 'static, X: ?Sized + 'static> {
    Builtin(&'static B),
    External(&'static External<X>),
}

/// One kind of plugin: the built-in entries `B` (collected by `inventory`) and the libraries'
/// entries making `X`, in load order. Libraries are never unloaded, so entries live for the
/// process.
pub struct Kind<B: 'static, X: ?Sized + 'static> {
    pub kind: PluginKind,
    /// How a refusal names one (`a model importer`).
    what: &'static str,
    /// The config key that names one (`importer`).
    key: &'static str,
    external: std::sync::RwLock<Vec<&'static External<X>>>,
    builtin: PhantomData<fn() -> B>,
}

impl<B: Builtin + inventory::Collect, X: ?Sized + 'static> Kind<B, X> {
    const fn new(kind: PluginKind, what: &'static str, key: &'static str) -> Self {
        Kind { kind, what, key, external: std::sync::RwLock::new(Vec::new()), builtin: PhantomData }
    }

    pub fn builtins(&self) -> impl Iterator<Item = &'static B> {
        inventory::iter::<B>.into_iter()
    }

    /// The libraries' plugins of this kind, in load order.
    pub fn externals(&self) -> Vec<&'static External<X>> {
        self.external.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A built-in plugin by name or alias, then a library's by name.
    pub fn find(&self, name: &str) -> Option<Found<B, X>> {
        if let Some(b) = self.builtins().find(|p| p.name() == name || p.aliases().contains(&name)) {
            return Some(Found::Builtin(b));
        }
        self.externals().into_iter().find(|p| p.name == name).map(Found::External)
    }

    /// As `find`; not found is an error listing what there is (and the libraries refused).
    pub fn get(&self, name: &str) -> Result<Found<B, X>> {
        self.find(name).ok_or_else(|| {
            Error::Msg(format!(
                "unknown {} `{name}`; available: {}{}",
                self.key,
                self.names(),
                crate::plugin_abi::refusals_note()
            ))
        })
    }

    /// Every plugin's name, sorted: `a, b, c`, or `(none)`.
    pub fn names(&self) -> String {
        let mut v: Vec<&str> =
            self.builtins().map(|p| p.name()).chain(self.externals().iter().map(|p| p.name)).collect();
        v.sort();
        if v.is_empty() {
            "(none)".into()
        } else {
            v.join(", ")
        }
    }

    /// Adds a library's plugin; refused if a built-in plugin of this kind (by name or alias) or
    /// an earlier library's has its name.
    pub fn register(&self, p: External<X>) -> std::result::Result<(), String> {
        if self.builtins().any(|b| b.name() == p.name || b.aliases().contains(&p.name)) {
            return Err(format!("{} named `{}` already exists (built-in)", self.what, p.name));
        }
        let mut ext = self.external.write().unwrap_or_else(|e| e.into_inner());
        if let Some(prev) = ext.iter().find(|q| q.name == p.name) {
            return Err(format!("{} named `{}` already exists ({})", self.what, p.name, prev.origin));
        }
        ext.push(Box::leak(Box::new(p)));
        Ok(())
    }

    fn listings(&self) -> Vec<PluginListing> {
        let builtin = self.builtins().map(|p| PluginListing {
            kind: self.kind,
            name: p.name(),
            version: p.version(),
            origin: "built-in".into(),
        });
        let ext = self.externals().into_iter().map(|p| PluginListing {
            kind: self.kind,
            name: p.name,
            version: p.version,
            origin: p.origin.into(),
        });
        builtin.chain(ext).collect()
    }
}

/// Implements `Builtin` for a kind's entry struct with `name`, `aliases` and `version` fields.
macro_rules! builtin_entry {
    ($t:ty) => {
        impl Builtin for $t {
            fn name(&self) -> &'static str {
                self.name
            }
            fn aliases(&self) -> &'static [&'static str] {
                self.aliases
            }
            fn version(&self) -> &'static str {
                self.version
            }
        }
    };
}

pub struct ImporterPlugin {
    pub name: &'static str,
    pub version: &'static str,
    pub make: fn() -> Box<dyn ModelImporter>,
}

impl Builtin for ImporterPlugin {
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> &'static str {
        self.version
    }
}

pub struct CompileBackendPlugin {
    pub name: &'static str,
    /// Other names accepted in configs (AutoDeploy's, such as `torch-simple`).
    pub aliases: &'static [&'static str],
    pub version: &'static str,
    pub make: fn() -> Box<dyn CompileBackend>,
    /// Whether the compile-stage fusion transforms rewrite the graph for it (AutoDeploy's
    /// `torch-compile` and `torch-opt` fuse; `simple` and `cudagraph` run the ops as matched).
    pub fuses: bool,
}
builtin_entry!(CompileBackendPlugin);

pub struct AttentionBackendPlugin {
    pub name: &'static str,
    /// Other names accepted in configs.
    pub aliases: &'static [&'static str],
    pub version: &'static str,
    /// The CPU implementation; `None` for a backend whose kernels run on CUDA only.
    pub make: Option<fn() -> Box<dyn AttentionBackend>>,
    /// The CUDA implementation, the CUDA executor's way to run it; `None`: CPU only.
    pub cuda: Option<crate::device_attention::DeviceAttentionMaker>,
    /// Whether its CUDA implementation takes q/k unrotated with the cos/sin tables (a
    /// RoPE-fused op): the `fuse_rope_attention` transform fuses only for such backends.
    pub fuses_rope: bool,
    /// Whether its CPU and its CUDA implementation honour sliding windows, chunked attention
    /// and soft-capping (`Scoring`); a graph that needs them is refused at `cache_init`
    /// otherwise.
    pub scoring: Devices,
    /// Whether they read K and V through an FP8 KV cache (`Scoring::kv_fp8`); refused at
    /// `cache_init` otherwise.
    pub kv_fp8: Devices,
}
builtin_entry!(AttentionBackendPlugin);

/// A capability on each device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Devices {
    pub cpu: bool,
    pub cuda: bool,
}

pub struct RuntimePlugin {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub version: &'static str,
    pub make: fn(&PipelineConfig) -> Box<dyn Runtime>,
}
builtin_entry!(RuntimePlugin);

inventory::collect!(ImporterPlugin);
inventory::collect!(CompileBackendPlugin);
inventory::collect!(AttentionBackendPlugin);
inventory::collect!(RuntimePlugin);

/// Makes a library's runtime for a config (what `External::make` gives for runtimes).
pub type RuntimeMaker = dyn Fn(&PipelineConfig) -> Box<dyn Runtime> + Send + Sync;

pub static IMPORTERS: Kind<ImporterPlugin, dyn ModelImporter> =
    Kind::new(PluginKind::ModelImporter, "a model importer", "importer");
pub static COMPILE_BACKENDS: Kind<CompileBackendPlugin, dyn CompileBackend> =
    Kind::new(PluginKind::CompileBackend, "a compile backend", "compile_backend");
/// Makes a library's attention backend from its resolved options (what `External::make` gives
/// for attention backends), with the options it declares.
pub struct AttentionMaker {
    pub options: &'static [crate::transform::OptionSpec],
    #[allow(clippy::type_complexity)]
    pub make: Box<dyn Fn(&toml::Table) -> Result<Box<dyn AttentionBackend>> + Send + Sync>,
    /// Its CUDA implementation, if the library has one.
    #[allow(clippy::type_complexity)]
    pub cuda: Option<
        Box<
            dyn Fn(
                    &crate::device_attention::DeviceAttentionSetup,
                ) -> Result<Box<dyn crate::device_attention::DeviceAttention>>
                + Send
                + Sync,
        >,
    >,
}

pub static ATTENTION_BACKENDS: Kind<AttentionBackendPlugin, AttentionMaker> =
    Kind::new(PluginKind::AttentionBackend, "an attention backend", "attn_backend");
pub static RUNTIMES: Kind<RuntimePlugin, RuntimeMaker> = Kind::new(PluginKind::Runtime, "a runtime", "runtime");

/// The importer `name` names.
pub fn importer(name: &str) -> Result<Box<dyn ModelImporter>> {
    Ok(match IMPORTERS.get(name)? {
        Found::Builtin(p) => (p.make)(),
        Found::External(p) => (p.make)(),
    })
}

/// The first importer that recognises `path`: the built-in ones first, then those of plugin
/// libraries in the order they loaded.
pub fn detect_importer(path: &std::path::Path) -> Result<(&'static str, Box<dyn ModelImporter>)> {
    let builtin = IMPORTERS.builtins().map(|p| (p.name, (p.make)()));
    let ext = IMPORTERS.externals().into_iter().map(|p| (p.name, (p.make)()));
    for (name, imp) in builtin.chain(ext) {
        if imp.accepts(path) {
            return Ok((name, imp));
        }
    }
    Err(Error::Msg(format!(
        "{}: no importer recognises this model (importers: {}); a Hugging Face folder needs config.json",
        path.display(),
        IMPORTERS.names()
    )))
}

/// The compile backend `name` names (or an alias).
pub fn compile_backend(name: &str) -> Result<Box<dyn CompileBackend>> {
    Ok(match COMPILE_BACKENDS.get(name)? {
        Found::Builtin(p) => (p.make)(),
        Found::External(p) => (p.make)(),
    })
}

/// Whether compile backend `name` (or an alias) wants the compile-stage fusions (a library's
/// runs the graph as given).
pub fn compile_backend_fuses(name: &str) -> Result<bool> {
    Ok(matches!(COMPILE_BACKENDS.get(name)?, Found::Builtin(p) if p.fuses))
}

/// The canonical name of compile backend `name` (or an alias).
pub fn compile_backend_name(name: &str) -> Result<&'static str> {
    Ok(match COMPILE_BACKENDS.get(name)? {
        Found::Builtin(p) => p.name,
        Found::External(p) => p.name,
    })
}

/// The CPU implementation of attention backend `name` (or an alias), with its canonical name,
/// made with `options` (its declared options resolved: [`attention_backend_options`]).
pub fn attention_backend(name: &str, options: &toml::Table) -> Result<(&'static str, Box<dyn AttentionBackend>)> {
    match ATTENTION_BACKENDS.get(name)? {
        Found::Builtin(p) => {
            let make = p.make.ok_or_else(|| {
                Error::Msg(format!(
                    "attn_backend `{}` runs on CUDA GPUs only (device = \"cuda\"); on the CPU use attn_backend = \"torch\"",
                    p.name
                ))
            })?;
            Ok((p.name, make()))
        }
        Found::External(p) => {
            let maker = (p.make)();
            let b = (maker.make)(options)
                .map_err(|e| Error::Msg(format!("attention backend `{}` ({}): {e}", p.name, p.origin)))?;
            Ok((p.name, b))
        }
    }
}

/// The CUDA implementation of attention backend `name` (or an alias), made for one engine.
pub fn device_attention(
    name: &str,
    setup: &crate::device_attention::DeviceAttentionSetup,
) -> Result<Box<dyn crate::device_attention::DeviceAttention>> {
    let (canonical, origin) = (attention_backend_name(name)?, attention_backend_origin(name));
    let made = match ATTENTION_BACKENDS.get(name)? {
        Found::Builtin(p) => p.cuda.map(|make| make(setup)),
        Found::External(p) => (p.make)().cuda.as_ref().map(|make| make(setup)),
    }
    .ok_or_else(|| no_cuda(canonical, &origin))?;
    made.map_err(|e| Error::Msg(format!("attention backend `{canonical}` ({origin}) on CUDA: {e}")))
}

/// Refuses attention backend `name` on CUDA unless it has a CUDA implementation.
pub fn check_device_attention(name: &str) -> Result<()> {
    let has = match ATTENTION_BACKENDS.get(name)? {
        Found::Builtin(p) => p.cuda.is_some(),
        Found::External(p) => (p.make)().cuda.is_some(),
    };
    if has {
        return Ok(());
    }
    Err(no_cuda(attention_backend_name(name)?, &attention_backend_origin(name)))
}

fn no_cuda(name: &str, origin: &str) -> Error {
    Error::Msg(format!(
        "attn_backend `{name}` ({origin}) has no CUDA implementation; on CUDA use one that has (built-in: flashinfer, triton), or device = \"cpu\""
    ))
}

/// Which devices attention backend `name` runs on: (CPU, CUDA).
pub fn attention_backend_devices(name: &str) -> Result<(bool, bool)> {
    Ok(match ATTENTION_BACKENDS.get(name)? {
        Found::Builtin(p) => (p.make.is_some(), p.cuda.is_some()),
        // A library's CPU side is always given (`make` or `make_with_options`).
        Found::External(p) => (true, (p.make)().cuda.is_some()),
    })
}

/// What of `scoring` attention backend `name` does not apply on `device` (score masks or
/// soft-capping: a sliding window, chunked attention, soft-capping; or an FP8 KV cache), in
/// words for an error, or None when it applies all of it (libraries apply none: the sdk's
/// attention call carries only the scale).
pub fn attention_backend_lacks(
    name: &str,
    device: &str,
    scoring: &crate::ops::attention::Scoring,
) -> Option<&'static str> {
    let on = |d: Devices| if device == "cuda" { d.cuda } else { d.cpu };
    let (masks, fp8) = match ATTENTION_BACKENDS.get(name) {
        Ok(Found::Builtin(p)) => (on(p.scoring), on(p.kv_fp8)),
        _ => (false, false),
    };
    let needs_masks = scoring.window.is_some() || scoring.chunk.is_some() || scoring.softcap.is_some();
    if needs_masks && !masks {
        Some("score masks or soft-capping (a sliding window, chunked attention, soft-capping)")
    } else if scoring.kv_fp8.is_some() && !fp8 {
        Some("an FP8 KV cache")
    } else {
        None
    }
}

/// Whether attention backend `name`'s CUDA implementation takes RoPE-fused ops (libraries'
/// do not: the host rotates q and k before their calls).
pub fn attention_backend_fuses_rope(name: &str) -> bool {
    matches!(ATTENTION_BACKENDS.get(name), Ok(Found::Builtin(p)) if p.fuses_rope)
}

/// The options attention backend `name` declares (built-in backends declare none).
pub fn attention_backend_declared_options(name: &str) -> Result<&'static [crate::transform::OptionSpec]> {
    Ok(match ATTENTION_BACKENDS.get(name)? {
        Found::Builtin(_) => &[],
        Found::External(p) => (p.make)().options,
    })
}

/// The options the config gives attention backend `name` (`[attention_backends.<name>]`, by
/// its canonical name or the one the config used), checked against what it declares, with every
/// declared option's default filled in. Errors name the config key.
pub fn attention_backend_options(cfg: &PipelineConfig, name: &str) -> Result<toml::Table> {
    let canonical = attention_backend_name(name)?;
    let user = cfg.attention_backends.get(canonical).or_else(|| cfg.attention_backends.get(name));
    let key = if cfg.attention_backends.contains_key(canonical) { canonical } else { name };
    let declared = attention_backend_declared_options(name)?;
    let owner = format!("attention backend `{canonical}`");
    if let Some(t) = user {
        crate::transform::check_options(&format!("attention_backends.{key}"), &owner, declared, t)
            .map_err(|(k, msg)| Error::Msg(format!("{k}: {msg}")))?;
    }
    crate::transform::resolve_options(&owner, declared, user)
}

/// Where attention backend `name` comes from: `built-in` or its library's path.
pub fn attention_backend_origin(name: &str) -> String {
    match ATTENTION_BACKENDS.get(name) {
        Ok(Found::Builtin(_)) => "built-in".into(),
        Ok(Found::External(p)) => p.origin.to_string(),
        Err(_) => "unknown origin".into(),
    }
}

/// The canonical name of attention backend `name` (or an alias), whatever device it runs on.
pub fn attention_backend_name(name: &str) -> Result<&'static str> {
    Ok(match ATTENTION_BACKENDS.get(name)? {
        Found::Builtin(p) => p.name,
        Found::External(p) => p.name,
    })
}

/// The runtime `cfg.runtime` names (or an alias), made for `cfg`.
pub fn runtime(cfg: &PipelineConfig) -> Result<Box<dyn Runtime>> {
    Ok(match RUNTIMES.get(&cfg.runtime)? {
        Found::Builtin(p) => (p.make)(cfg),
        Found::External(p) => (p.make)()(cfg),
    })
}

/// One row of `autodeploy plugins`.
#[derive(Clone, Debug)]
pub struct PluginListing {
    pub kind: PluginKind,
    pub name: &'static str,
    pub version: &'static str,
    pub origin: String,
}

/// Every plugin of every kind, sorted by kind and name.
pub fn list_plugins() -> Vec<PluginListing> {
    let mut v = IMPORTERS.listings();
    v.extend(COMPILE_BACKENDS.listings());
    v.extend(ATTENTION_BACKENDS.listings());
    v.extend(RUNTIMES.listings());
    v.extend(custom_ops().into_iter().map(|o| PluginListing {
        kind: PluginKind::Op,
        name: o.name,
        version: o.version,
        origin: o.origin.into(),
    }));
    v.extend(transforms().into_iter().map(|t| PluginListing {
        kind: PluginKind::Transform,
        name: t.name,
        version: t.version,
        origin: t.origin.into(),
    }));
    v.sort_by(|a, b| (a.kind, a.name).cmp(&(b.kind, b.name)));
    v
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

/// Reads the registry file at `path`: a regular file (a FIFO or device would block or never
/// end), TOML with `[[library]] path = ...` entries.
pub fn parse_plugin_registry(path: &std::path::Path) -> Result<PluginRegistryFile> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::BadFile { file: path.into(), msg: "is not a regular file".into() });
    }
    // A registry names a few libraries; a large file is not one.
    if meta.len() > 1 << 20 {
        return Err(Error::BadFile {
            file: path.into(),
            msg: format!("{} bytes; a registry is at most 1 MiB", meta.len()),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    toml::from_str(&text).map_err(|e| Error::BadFile { file: path.into(), msg: e.to_string() })
}

/// Loads the libraries the registry file at `path` lists (relative paths are relative to it).
/// Plugins are code that runs in this process: call this only for a registry the user chose. A
/// malformed file is an error; a library that cannot be used is refused with its reason
/// (`plugin_abi::refusals`) and the host runs on.
pub fn read_plugin_registry(path: &std::path::Path) -> Result<PluginRegistryFile> {
    let reg = parse_plugin_registry(path)?;
    let paths: Vec<PathBuf> = reg.library.iter().map(|l| l.path.clone()).collect();
    crate::plugin_abi::load_libraries(path, &paths);
    Ok(reg)
}
