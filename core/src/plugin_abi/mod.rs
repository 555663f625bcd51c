//! The host side of the plugin ABI (`autodeploy_sdk::ffi`): loading the libraries listed in
//! `plugin-registry.toml`, and one wrapper per interface, so that the rest of the host only sees
//! its own types (`Transform`, `AttentionBackend`, `Graph`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use autodeploy_sdk::abi_stable::library::{lib_header_from_path, LibraryError};
use autodeploy_sdk::abi_stable::sabi_trait::TD_Opaque;
use autodeploy_sdk::abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec};
use autodeploy_sdk::ffi;
use autodeploy_sdk::Stage;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ir::{Graph, ValueId};
use crate::kvcache::{AttentionBackend, StepContext};
use crate::registry::TransformRef;
use crate::shape::static_shape;
use crate::tensor::Tensor;
use crate::transform::{OptionSpec, Transform, TransformContext};

mod device_attention;
mod graph_edit;
mod ops;
mod runtime;

use graph_edit::{node_info, value_info, HostGraph};

/// A library or plugin the host refused at start-up, and why.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub library: PathBuf,
    pub reason: String,
}

static REFUSED: RwLock<Vec<Refusal>> = RwLock::new(Vec::new());

/// Libraries (and single plugins) refused at start-up.
pub fn refusals() -> Vec<Refusal> {
    REFUSED.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A line for "unknown plugin" errors: what was refused at start-up, so a config that needs a
/// refused plugin says why it is missing.
pub fn refusals_note() -> String {
    let r = refusals();
    if r.is_empty() {
        return String::new();
    }
    let lines: Vec<String> = r.iter().map(|r| format!("{}: {}", r.library.display(), r.reason)).collect();
    format!("; refused at start-up: {}", lines.join("; "))
}

fn refuse(library: &Path, reason: String) {
    tracing::warn!("plugin library {} refused: {reason}", library.display());
    REFUSED.write().unwrap_or_else(|e| e.into_inner()).push(Refusal { library: library.to_path_buf(), reason });
}

/// The files a registry entry names: the file itself, or the shared libraries in a folder.
fn library_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == std::env::consts::DLL_EXTENSION))
        .collect();
    v.sort();
    Ok(v)
}

/// Loads every library the registry lists (paths relative to the registry's folder). A library
/// that cannot be used is refused with the reason, and the host runs on: a config that needs
/// one of its plugins fails later with that reason. Returns how many plugins were registered.
pub fn load_libraries(registry: &Path, entries: &[PathBuf]) -> usize {
    // Entries are relative to the registry's folder, made absolute: the loader searches the
    // system library path for a bare file name (`libfoo.so`) instead of opening the file beside
    // the registry.
    let base = match registry.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    let mut n = 0;
    for entry in entries {
        let path = base.join(entry);
        if !path.exists() {
            refuse(&path, format!("does not exist (listed in {})", registry.display()));
            continue;
        }
        match library_files(&path) {
            Ok(files) => {
                for f in files {
                    // A FIFO or device file would block the loader or read without end.
                    if !std::fs::metadata(&f).is_ok_and(|m| m.is_file()) {
                        refuse(&f, format!("is not a regular file (listed in {})", registry.display()));
                        continue;
                    }
                    n += load_library(&f);
                }
            }
            Err(e) => refuse(&path, format!("cannot list the folder: {e}")),
        }
    }
    n
}

/// Why a library could not be used, in a line or two: a library built against another SDK names
/// both versions and what to do (abi_stable's own report of a layout difference runs to
/// thousands of lines; it goes to the debug log). `lib_sdk` is the SDK version the library's
/// header declares, when it could be read.
fn describe(e: &LibraryError, lib_sdk: Option<&str>) -> String {
    let host = autodeploy_sdk::SDK_VERSION_STR;
    match e {
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => format!(
            "built against autodeploy-sdk {actual_version}, incompatible with this host's sdk {expected_version}; \
             rebuild the plugin against autodeploy-sdk {expected_version}"
        ),
        LibraryError::AbiInstability(_) => {
            tracing::debug!("plugin interface layout difference: {e}");
            match lib_sdk {
                Some(v) if v != host => format!(
                    "built against autodeploy-sdk {v}, whose plugin interface types differ from this host's sdk \
                     {host}; rebuild the plugin against autodeploy-sdk {host}"
                ),
                _ => format!(
                    "built against a different build of autodeploy-sdk {host} whose plugin interface types \
                     differ from this host's; rebuild the plugin against this host's autodeploy-sdk {host} \
                     (RUST_LOG=debug shows the difference)"
                ),
            }
        }
        LibraryError::GetSymbolError { .. } => {
            "has no autodeploy root module (not built with `autodeploy_sdk::export_plugins!`)".to_string()
        }
        // abi_stable's own messages run over several indented lines: one line here.
        _ => e.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

fn load_library(path: &Path) -> usize {
    let header = match lib_header_from_path(path) {
        Ok(h) => h,
        Err(e) => {
            refuse(path, describe(&e, None));
            return 0;
        }
    };
    let lib_sdk = header.version_strings().version.to_string();
    let module = match header.init_root_module::<ffi::PluginModule_Ref>() {
        Ok(m) => m,
        Err(e) => {
            refuse(path, describe(&e, Some(&lib_sdk)));
            return 0;
        }
    };
    let origin = path.display().to_string();
    let mut n = 0;
    for decl in (module.plugins())() {
        let name = decl.name.to_string();
        let version = decl.version.to_string();
        let res = match decl.body {
            ffi::PluginBody::Transform { stage, order, enabled_by_default, options, transform } => {
                match Stage::parse(stage.as_str()) {
                    None => Err(format!("transform `{name}` declares an unknown stage `{stage}`")),
                    Some(stage) => {
                        let options = leak_options(&options);
                        let t = Arc::new(transform);
                        let make = move || Box::new(ExternalTransform(t.clone())) as Box<dyn Transform>;
                        crate::registry::register_transform(TransformRef::external(
                            &name,
                            stage,
                            order,
                            enabled_by_default,
                            options,
                            &version,
                            &origin,
                            Box::new(make),
                        ))
                    }
                }
            }
            ffi::PluginBody::AttentionBackend { options, make, make_with_options, make_cuda } => {
                match (make.into_option(), make_with_options.into_option()) {
                    (Some(_), Some(_)) | (None, None) => Err(format!(
                        "attention backend `{name}` must give exactly one of `make` and `make_with_options`"
                    )),
                    (make, make_with) => {
                        let options: &'static [OptionSpec] = leak_options(&options);
                        let (n, o) = (name.clone(), origin.clone());
                        crate::registry::ATTENTION_BACKENDS.register(external(&name, &version, &origin, move || {
                            let make = move |opts: &toml::Table| -> Result<Box<dyn AttentionBackend>> {
                                let inner = match (make, make_with) {
                                    (Some(mk), _) => mk(),
                                    (None, Some(mk)) => {
                                        let text =
                                            toml::to_string(opts).map_err(|e| Error::Msg(format!("options: {e}")))?;
                                        mk(text.as_str().into())
                                            .into_result()
                                            .map_err(|e| Error::Msg(e.into_string()))?
                                    }
                                    (None, None) => unreachable!("checked at registration"),
                                };
                                Ok(Box::new(ExternalAttentionBackend { inner, csr: Default::default() }))
                            };
                            let cuda = make_cuda.into_option().map(|mk| device_attention::maker(mk, &n, &o));
                            Box::new(crate::registry::AttentionMaker { options, make: Box::new(make), cuda })
                        }))
                    }
                }
            }
            ffi::PluginBody::ModelImporter { accepts, import } => {
                let (n, o) = (name.clone(), origin.clone());
                crate::registry::IMPORTERS.register(external(&name, &version, &origin, move || {
                    Box::new(LibraryImporter { name: n.clone(), origin: o.clone(), accepts, import })
                        as Box<dyn crate::backend::ModelImporter>
                }))
            }
            ffi::PluginBody::CompileBackend { compile } => {
                let (n, o) = (name.clone(), origin.clone());
                crate::registry::COMPILE_BACKENDS.register(external(&name, &version, &origin, move || {
                    Box::new(LibraryCompileBackend { name: n.clone(), origin: o.clone(), compile })
                        as Box<dyn crate::backend::CompileBackend>
                }))
            }
            ffi::PluginBody::Runtime { make } => {
                let (n, o) = (name.clone(), origin.clone());
                crate::registry::RUNTIMES.register(external(&name, &version, &origin, move || {
                    let (n, o) = (n.clone(), o.clone());
                    Box::new(move |cfg: &crate::config::PipelineConfig| {
                        Box::new(runtime::LibraryRuntime::new(&n, &o, make(), cfg)) as Box<dyn crate::runtime::Runtime>
                    }) as Box<crate::registry::RuntimeMaker>
                }))
            }
            ffi::PluginBody::Op { inputs, output_like, cpu, cuda } => {
                crate::registry::register_op(ops::f32_op(&name, &version, &origin, inputs, output_like, cpu, cuda))
            }
            ffi::PluginBody::TypedOp { inputs, outputs, cpu, cuda } => {
                crate::registry::register_op(ops::typed_op(&name, &version, &origin, inputs, outputs, cpu, cuda))
            }
        };
        match res {
            Ok(()) => n += 1,
            Err(why) => refuse(path, format!("plugin `{name}`: {why}")),
        }
    }
    tracing::info!("loaded {n} plugins from {}", path.display());
    n
}

/// A registry entry for a library's plugin: its listing (kept for the process: libraries are
/// never unloaded) and how to make an instance.
/// A library's option declarations as the host's (leaked: libraries stay loaded).
fn leak_options(options: &[ffi::OptionDecl]) -> &'static [OptionSpec] {
    let leak = |s: &RString| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
    let v: Vec<OptionSpec> = options
        .iter()
        .map(|o| OptionSpec { name: leak(&o.name), default: leak(&o.default), help: leak(&o.help) })
        .collect();
    Box::leak(v.into_boxed_slice())
}

fn external<T: ?Sized>(
    name: &str,
    version: &str,
    origin: &str,
    make: impl Fn() -> Box<T> + Send + Sync + 'static,
) -> crate::registry::External<T> {
    let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
    crate::registry::External { name: leak(name), version: leak(version), origin: leak(origin), make: Box::new(make) }
}

type FfiTransform = ffi::Transform_TO<'static, RBox<()>>;

/// A library's transform as a host transform.
struct ExternalTransform(Arc<FfiTransform>);

impl Transform for ExternalTransform {
    fn apply(&self, graph: &mut Graph, cx: &TransformContext) -> Result<String> {
        let options = toml::to_string(&cx.options).map_err(|e| Error::Msg(format!("options: {e}")))?;
        let mut host = HostGraph { g: graph };
        let view = ffi::GraphEdit_TO::from_ptr(&mut host, TD_Opaque);
        match self.0.apply(view, options.as_str().into()) {
            RResult::ROk(s) => Ok(s.into_string()),
            RResult::RErr(e) => Err(Error::Msg(e.into_string())),
        }
    }
}

/// A weight a plugin hands over: its dtype (a float type), shape and values, checked.
pub(super) fn host_weight(
    name: &str,
    dtype: &str,
    tensor: ffi::HostTensor,
) -> std::result::Result<(DType, Vec<usize>, Tensor), String> {
    let Some(dt) = DType::parse(dtype).filter(|d| d.is_float()) else {
        return Err(format!("`{name}`: `{dtype}` is not f32, bf16 or f16"));
    };
    let shape: Vec<usize> = tensor.shape.iter().map(|&n| n as usize).collect();
    let n: usize = shape.iter().product();
    if n != tensor.data.len() {
        return Err(format!("`{name}`: shape {shape:?} holds {n} values, got {}", tensor.data.len()));
    }
    let t = Tensor::from_f32_as(dt, shape.clone(), tensor.data.into_vec()).map_err(|e| format!("`{name}`: {e}"))?;
    Ok((dt, shape, t))
}

/// A library's model importer as a host importer: the library builds the graph through
/// [`HostBuild`].
struct LibraryImporter {
    name: String,
    origin: String,
    accepts: extern "C" fn(RStr<'_>) -> bool,
    import: ffi::ImportFn,
}

impl crate::backend::ModelImporter for LibraryImporter {
    fn accepts(&self, path: &Path) -> bool {
        (self.accepts)(path.to_string_lossy().as_ref().into())
    }

    fn import(&self, req: &crate::backend::ImportRequest) -> Result<Graph> {
        let mut options = toml::Table::new();
        if let Some(d) = req.dtype {
            options.insert("dtype".into(), toml::Value::String(d.to_string()));
        }
        options.insert("max_seq_len".into(), toml::Value::Integer(req.max_seq_len as i64));
        options.insert("max_batch_size".into(), toml::Value::Integer(req.max_batch_size as i64));
        options.insert("dummy_weights".into(), toml::Value::Boolean(req.dummy_weights));
        let options = toml::to_string(&options).map_err(|e| Error::Msg(format!("importer options: {e}")))?;
        let store = crate::weights::WeightStore::new(format!("{} (importer {})", req.path.display(), self.name));
        let mut host = HostBuild { b: crate::ir::GraphBuilder::new(Arc::new(store)) };
        let path = req.path.to_string_lossy().into_owned();
        let build = ffi::GraphBuild_TO::from_ptr(&mut host, TD_Opaque);
        let summary = match (self.import)(path.as_str().into(), options.as_str().into(), build) {
            RResult::ROk(s) => s.into_string(),
            RResult::RErr(e) => {
                return Err(Error::Msg(format!("importer `{}` ({}): {}", self.name, self.origin, e.as_str())))
            }
        };
        let mut b = host.b;
        b.note(format!("import: {} importer ({}): {summary}", self.name, self.origin));
        b.finish()
            .map_err(|e| Error::Msg(format!("importer `{}` ({}) built an invalid graph: {e}", self.name, self.origin)))
    }
}

/// The host graph builder behind the plugin-facing `GraphBuild` interface.
struct HostBuild {
    b: crate::ir::GraphBuilder,
}

impl HostBuild {
    fn ids(&self, inputs: RSlice<'_, u32>) -> std::result::Result<Vec<ValueId>, String> {
        let n = self.b.graph().values.len();
        inputs
            .iter()
            .map(|&v| if (v as usize) < n { Ok(ValueId(v)) } else { Err(format!("value {v} does not exist")) })
            .collect()
    }
}

impl ffi::GraphBuild for HostBuild {
    fn symbol(&mut self, name: RStr<'_>, min: u64, max: u64) {
        self.b.symbol(name.as_str(), min as usize, max as usize);
    }

    fn input(&mut self, name: RStr<'_>, dtype: RStr<'_>, shape: RStr<'_>) -> RResult<u32, RString> {
        let Some(dt) = DType::parse(dtype.as_str()) else {
            return RResult::RErr(format!("input `{name}`: `{dtype}` is not a dtype").into());
        };
        let Some(shape) = crate::op_text::parse_shape(shape.as_str()) else {
            return RResult::RErr(format!("input `{name}`: `{shape}` is not a shape like [1, seq]").into());
        };
        RResult::ROk(self.b.input(name.as_str(), dt, shape).0)
    }

    fn weight(&mut self, name: RStr<'_>, dtype: RStr<'_>, tensor: ffi::HostTensor) -> RResult<u32, RString> {
        let (dt, shape, t) = match host_weight(name.as_str(), dtype.as_str(), tensor) {
            Ok(w) => w,
            Err(e) => return RResult::RErr(format!("weight {e}").into()),
        };
        let Some(store) = self.b.weights_mut() else {
            return RResult::RErr("weight: the weight store is shared".into());
        };
        if store.contains(name.as_str()) {
            return RResult::RErr(format!("weight: a weight named `{name}` exists").into());
        }
        store.add_tensor(name.as_str(), t);
        RResult::ROk(self.b.param(name.as_str(), dt, static_shape(&shape)).0)
    }

    fn node(
        &mut self,
        name: RStr<'_>,
        op: RStr<'_>,
        inputs: RSlice<'_, u32>,
        attrs: RStr<'_>,
    ) -> RResult<u32, RString> {
        let fail = |m: String| RResult::RErr(format!("node `{name}` ({op}): {m}").into());
        let the_op = match crate::op_text::parse_op(op.as_str(), attrs.as_str()) {
            Ok(o) => o,
            Err(e) => return fail(e.to_string()),
        };
        let ids = match self.ids(inputs) {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        match self.b.op(name.as_str(), the_op, &ids) {
            Ok(v) => RResult::ROk(v.0),
            Err(e) => fail(e.to_string()),
        }
    }

    fn value(&self, value: u32) -> ROption<ffi::ValueInfo> {
        value_info(self.b.graph(), value)
    }

    fn output(&mut self, value: u32) -> RResult<(), RString> {
        if value as usize >= self.b.graph().values.len() {
            return RResult::RErr(format!("output: value {value} does not exist").into());
        }
        self.b.output(ValueId(value));
        RResult::ROk(())
    }
}

/// A library's compile backend as a host one: the host loads the weights and keeps every value;
/// the library's compiled model decides which nodes run when and what is released, through
/// `HostRun` (ffi::RunGraph) over the CPU kernels.
struct LibraryCompileBackend {
    name: String,
    origin: String,
    compile: extern "C" fn(RStr<'_>) -> RResult<ffi::CompiledGraphBox, RString>,
}

impl crate::backend::CompileBackend for LibraryCompileBackend {
    fn compile(
        &self,
        graph: &Graph,
        opts: &crate::backend::CompileOptions,
    ) -> Result<Box<dyn crate::backend::CompiledModel>> {
        let who = format!("compile backend `{}` ({})", self.name, self.origin);
        if let crate::config::Device::Cuda(n) = opts.device {
            return Err(Error::Msg(format!(
                "{who} runs the host's CPU kernels; this config asks for cuda:{n} (set device = \"cpu\")"
            )));
        }
        graph.validate()?;
        let params = crate::interp::load_params(graph, |_| {})?;
        let attention = match crate::kvcache::CacheSpec::of(graph)? {
            Some(spec) => Some(crate::registry::attention_backend(&spec.backend, &opts.attention_options)?.1),
            None => None,
        };
        let options = format!("device = \"cpu\"\npage_size = {}\nkv_pages = {}\n", opts.page_size, opts.kv_pages);
        let inner = match (self.compile)(options.as_str().into()) {
            RResult::ROk(c) => c,
            RResult::RErr(e) => return Err(Error::Msg(format!("{who}: {e}"))),
        };
        Ok(Box::new(LibraryModel { who, graph: graph.clone(), params, attention, kernels: opts.kernels, inner }))
    }
}

struct LibraryModel {
    /// `compile backend `name` (library)`, for messages.
    who: String,
    graph: Graph,
    params: Vec<(usize, Tensor)>,
    attention: Option<Box<dyn AttentionBackend>>,
    kernels: crate::cpu::KernelOptions,
    inner: ffi::CompiledGraphBox,
}

impl crate::backend::CompiledModel for LibraryModel {
    fn forward(&mut self, inputs: &[Tensor], step: Option<&mut StepContext>) -> Result<Vec<Tensor>> {
        let g = &self.graph;
        let bind = crate::interp::bind_inputs(g, inputs)?;
        if let (Some(b), Some(cx)) = (self.attention.as_mut(), step.as_deref()) {
            b.begin_step(cx.plan)?;
        }
        let mut slots = crate::interp::initial_values(g, inputs, &self.params);
        let keep: Vec<bool> = slots.iter().map(Option::is_some).collect();
        let mut run = HostRun {
            g,
            slots: &mut slots,
            keep: &keep,
            bind: &bind,
            kernels: &self.kernels,
            attention: self.attention.as_deref(),
            step,
        };
        if let RResult::RErr(e) = self.inner.forward(ffi::RunGraph_TO::from_ptr(&mut run, TD_Opaque)) {
            return Err(Error::Msg(format!("{}: {e}", self.who)));
        }
        g.outputs
            .iter()
            .map(|v| {
                slots[v.0 as usize].take().ok_or_else(|| {
                    Error::Msg(format!("{} left graph output `{}` without a value", self.who, g.value(*v).name))
                })
            })
            .collect()
    }
}

/// One forward of a library-compiled model: the graph's values so far and the host's kernels.
struct HostRun<'a, 'c> {
    g: &'a Graph,
    slots: &'a mut Vec<Option<Tensor>>,
    /// Inputs and weights: never released.
    keep: &'a [bool],
    bind: &'a crate::shape::Bindings,
    kernels: &'a crate::cpu::KernelOptions,
    attention: Option<&'a dyn AttentionBackend>,
    step: Option<&'a mut StepContext<'c>>,
}

impl ffi::RunGraph for HostRun<'_, '_> {
    fn num_nodes(&self) -> usize {
        self.g.nodes.len()
    }
    fn node(&self, index: usize) -> ROption<ffi::NodeInfo> {
        node_info(self.g, index)
    }
    fn value(&self, value: u32) -> ROption<ffi::ValueInfo> {
        value_info(self.g, value)
    }
    fn outputs(&self) -> RVec<u32> {
        self.g.outputs.iter().map(|v| v.0).collect()
    }

    fn run_node(&mut self, index: usize) -> RResult<(), RString> {
        let Some(n) = self.g.nodes.get(index) else {
            return RResult::RErr(format!("no node {index}: the graph has {}", self.g.nodes.len()).into());
        };
        let mut ins = Vec::with_capacity(n.inputs.len());
        for v in &n.inputs {
            match &self.slots[v.0 as usize] {
                Some(t) => ins.push(t),
                None => {
                    return RResult::RErr(
                        format!(
                            "node {index} (`{}`, {}) reads `{}`, which holds no value (not computed yet, or released)",
                            self.g.value(n.outputs[0]).name,
                            n.op.name(),
                            self.g.value(*v).name
                        )
                        .into(),
                    )
                }
            }
        }
        let out = crate::interp::eval_node(
            self.g,
            index,
            &ins,
            self.bind,
            self.kernels,
            self.attention,
            self.step.as_deref_mut(),
        );
        match out {
            Ok(ts) => {
                for (o, t) in n.outputs.iter().zip(ts) {
                    self.slots[o.0 as usize] = Some(t);
                }
                RResult::ROk(())
            }
            Err(e) => RResult::RErr(e.to_string().into()),
        }
    }

    fn read(&self, value: u32) -> RResult<ffi::HostTensor, RString> {
        match self.slots.get(value as usize) {
            Some(Some(t)) => RResult::ROk(ffi::HostTensor {
                shape: t.shape().iter().map(|&d| d as u64).collect(),
                data: t.to_f32().into_owned().into(),
            }),
            _ => RResult::RErr(format!("value {value} holds no value").into()),
        }
    }

    fn release(&mut self, value: u32) {
        let v = value as usize;
        if v < self.slots.len() && !self.keep[v] {
            self.slots[v] = None;
        }
    }
}

/// A library's attention backend as a host attention backend.
struct ExternalAttentionBackend {
    inner: ffi::AttentionBackendBox,
    /// This step's page table in CSR form (built in `begin_step`, shared by every layer).
    csr: (Vec<usize>, Vec<u32>),
}

fn page_table_csr(tables: &[Vec<u32>]) -> (Vec<usize>, Vec<u32>) {
    let mut indptr = vec![0usize];
    let mut indices = Vec::new();
    for t in tables {
        indices.extend_from_slice(t);
        indptr.push(indices.len());
    }
    (indptr, indices)
}

impl AttentionBackend for ExternalAttentionBackend {
    fn begin_step(&mut self, plan: &crate::kvcache::StepPlan) -> Result<()> {
        self.csr = page_table_csr(&plan.page_tables);
        let step = ffi::StepInfo {
            tokens: plan.token_seq.len(),
            token_seq: plan.token_seq.as_slice().into(),
            token_pos: plan.token_pos.as_slice().into(),
            page_size: plan.page_size,
            page_indptr: self.csr.0.as_slice().into(),
            page_indices: self.csr.1.as_slice().into(),
        };
        match self.inner.begin_step(step) {
            RResult::ROk(()) => Ok(()),
            RResult::RErr(e) => Err(Error::op("attention_with_kv_cache", format!("planning the step: {e}"))),
        }
    }

    fn attend(
        &self,
        layer: usize,
        sc: autodeploy_kernels::cpu::Scores,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cx: &mut StepContext,
    ) -> Result<Tensor> {
        let bad = |msg: String| Error::op("attention_with_kv_cache", msg);
        // `cache_init` refuses such graphs for library backends; checked again here.
        if sc.window.is_some() || sc.softcap.is_some() {
            return Err(bad(format!("layer {layer}: a library backend cannot apply a sliding window or soft-cap")));
        }
        let scale = sc.scale;
        let (qs, ks) = (q.shape(), k.shape());
        if qs.len() != 4 || ks.len() != 4 || v.shape() != ks || qs[2] != ks[2] || qs[3] != ks[3] {
            return Err(bad(format!("q {qs:?}, k {ks:?}, v {:?}: expected [1, heads, tokens, dim]", v.shape())));
        }
        let (heads, kv_heads, tokens, dim) = (qs[1], ks[1], qs[2], qs[3]);
        let plan = cx.plan;
        let lc = cx.cache.spec.layers.get(layer).cloned().ok_or_else(|| bad(format!("layer {layer} has no cache")))?;
        if lc.kv_heads != kv_heads || lc.head_dim != dim || plan.token_seq.len() != tokens {
            return Err(bad(format!(
                "layer {layer}: k {ks:?} does not fit the cache ({} kv heads of {}) or the step ({} tokens)",
                lc.kv_heads,
                lc.head_dim,
                plan.token_seq.len()
            )));
        }
        // The CSR table from begin_step; built here for a caller that did not plan the step.
        let local;
        let (page_indptr, page_indices) = if self.csr.0.len() == plan.page_tables.len() + 1 {
            (&self.csr.0, &self.csr.1)
        } else {
            local = page_table_csr(&plan.page_tables);
            (&local.0, &local.1)
        };
        let (qv, kv, vv) = (q.to_f32(), k.to_f32(), v.to_f32());
        // Marked, so `debug_checks` can tell values the backend never wrote.
        let mut out = vec![crate::custom_op::UNWRITTEN; heads * tokens * dim];
        let (kc, vc) = cx.cache.layer_mut(layer);
        let call = ffi::AttentionCall {
            layer,
            scale,
            heads,
            kv_heads,
            tokens,
            head_dim: dim,
            q: qv.as_ref().into(),
            k: kv.as_ref().into(),
            v: vv.as_ref().into(),
            token_seq: plan.token_seq.as_slice().into(),
            token_pos: plan.token_pos.as_slice().into(),
            page_size: plan.page_size,
            page_indptr: page_indptr.as_slice().into(),
            page_indices: page_indices.as_slice().into(),
            k_cache: kc.into(),
            v_cache: vc.into(),
            out: out.as_mut_slice().into(),
        };
        match self.inner.attend(call) {
            RResult::ROk(()) => Tensor::from_f32_as(q.dtype(), vec![1, heads, tokens, dim], out),
            RResult::RErr(e) => Err(bad(format!("layer {layer}: {e}"))),
        }
    }
}
