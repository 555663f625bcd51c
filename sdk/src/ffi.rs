//! The plugin ABI: what crosses the boundary between the host and a plugin library.
//!
//! Everything here is `#[repr(C)]` and checked by `abi_stable` when a library loads: the layout
//! of every type reachable from [`PluginModule`], and the SDK version (this crate's version; a
//! plugin built against another 0.x minor is refused). A plugin library exports one root module
//! with [`export_plugins!`](crate::export_plugins); the host turns each [`PluginDecl`] into its own
//! plugin types through one wrapper per interface, so host code never handles these types.
//!
//! Plugin code must not panic: a panic cannot unwind across the boundary and aborts the
//! process. Return an error instead; the host reports it with the plugin's name.
//!
//! Interfaces:
//! - [`Transform`]: rewrites the graph through [`GraphEdit`], a view and rewrite API the host
//!   implements over its IR (find nodes by op, read value metadata and weights, add weights,
//!   rewire inputs, drop dead nodes).
//! - [`AttentionBackend`]: cached attention for one layer over raw buffers: this step's q/k/v,
//!   the per-token sequence and position, the page table in CSR form, the layer's paged K/V
//!   cache, the output.
//! - Model importers ([`PluginDecl::model_importer`]): read a model format the host does not
//!   know and build its graph through [`GraphBuild`] (inputs, weights, nodes of built-in or
//!   plugin ops by name, outputs).
//! - Compile backends ([`PluginDecl::compile_backend`]): run a model's forward by choosing the
//!   order nodes run in and when storage is released, through [`RunGraph`] (the host's CPU
//!   kernels, one node at a time).
//! - [`Runtime`]: a scheduler the host's engine loop drives: requests are added and aborted
//!   between steps, and each [`Runtime::step`] runs forward steps on the engine through
//!   [`EngineOps`] (limits, one batched step that samples each sequence's next token), owning
//!   the batching policy and the KV-cache page assignment (including sharing pages of a common
//!   prefix, which the host verifies).

// abi_stable's derive and trait macros generate impls and names the lints dislike.
#![allow(non_local_definitions, non_camel_case_types)]

pub use crate::pattern::{PatternBinding, PatternDecl, PatternKind, PatternMatch, PatternNode};
use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, package_version_strings, sabi_trait, StableAbi};

/// One node of the graph as a plugin sees it.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct NodeInfo {
    /// The op's name: ATen names (`aten.linear`, `aten.mul.Tensor`) or canonical ops
    /// (`torch_rmsnorm`, `torch_attention`, ...).
    pub op: RString,
    /// The op's attributes as the graph dump prints them (`eps=1e-05`, `dim=-1`, ...).
    pub attrs: RString,
    /// Value ids read and written.
    pub inputs: RVec<u32>,
    pub outputs: RVec<u32>,
}

/// Metadata of one value.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ValueInfo {
    pub name: RString,
    /// `f32`, `bf16`, `f16`, `i64`, `bool`, or a block type such as `q4_1`.
    pub dtype: RString,
    /// Sizes; symbolic sizes (`seq`, `batch*seq`) are 0 here and spelled out in `shape_text`.
    pub shape: RVec<u64>,
    pub shape_text: RString,
    /// Set when the value is a weight: its name in the checkpoint or the name it was added under.
    pub weight: ROption<RString>,
}

/// A dense f32 tensor crossing the boundary (weights are converted to and from the graph's
/// dtype by the host).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: RVec<u64>,
    pub data: RVec<f32>,
}

/// The graph view and rewrite API, implemented by the host. Node indices are positions in
/// topological order; they stay valid until [`GraphEdit::remove_dead_nodes`].
#[sabi_trait]
pub trait GraphEdit {
    fn num_nodes(&self) -> usize;
    /// `None` past the last node.
    fn node(&self, index: usize) -> ROption<NodeInfo>;
    /// Indices of the nodes whose op is `op`, in order.
    fn find_nodes(&self, op: RStr<'_>) -> RVec<usize>;
    /// `None` for an id that names no value.
    fn value(&self, value: u32) -> ROption<ValueInfo>;
    /// Indices of the nodes reading `value`; whether a graph output is `value` is
    /// [`GraphEdit::is_output`].
    fn users(&self, value: u32) -> RVec<usize>;
    fn is_output(&self, value: u32) -> bool;
    /// The values of a weight, as f32.
    fn read_weight(&self, value: u32) -> RResult<HostTensor, RString>;
    /// Adds a weight named `name` holding `tensor`, stored in `dtype` (`f32`, `bf16`, `f16`);
    /// returns its value id.
    fn add_weight(&mut self, name: RStr<'_>, dtype: RStr<'_>, tensor: HostTensor) -> RResult<u32, RString>;
    /// Makes input `slot` of node `node` read `value`; the host checks the op's shape rules.
    fn set_input(&mut self, node: usize, slot: usize, value: u32) -> RResult<(), RString>;
    /// Inserts a node before node `before`, reading `inputs`, and returns its output value: a
    /// built-in op by the name and attribute text a graph dump prints (`aten.mul.Scalar` with
    /// `0.5`, `aten.slice.Tensor` with `dim=-1, start=0, end=64`), or an op a plugin library
    /// declared with [`PluginDecl::op`] with its own attribute text. The host checks the op's
    /// shape rules; the inputs must be defined before that position.
    fn insert_node(
        &mut self,
        before: usize,
        op: RStr<'_>,
        inputs: RSlice<'_, u32>,
        attrs: RStr<'_>,
    ) -> RResult<u32, RString>;
    /// Makes every reader of `old` (nodes and graph outputs) read `new`; refused unless both
    /// have the same dtype and shape.
    fn replace_uses(&mut self, old: u32, new: u32) -> RResult<(), RString>;
    /// Removes nodes whose outputs nobody reads; returns how many.
    fn remove_dead_nodes(&mut self) -> usize;
    /// As [`GraphEdit::insert_node_named`] for an op with several outputs (a typed plugin op's,
    /// or `fused_add_rmsnorm`): returns every output's value id, in the op's order; the first
    /// is named after `name`, the others `name.1`, `name.2`, ...
    fn insert_node_outputs(
        &mut self,
        before: usize,
        name: RStr<'_>,
        op: RStr<'_>,
        inputs: RSlice<'_, u32>,
        attrs: RStr<'_>,
    ) -> RResult<RVec<u32>, RString>;
    /// As [`GraphEdit::insert_node`], with the output named after `name` (made unique) as
    /// graph dumps and errors show it.
    fn insert_node_named(
        &mut self,
        before: usize,
        name: RStr<'_>,
        op: RStr<'_>,
        inputs: RSlice<'_, u32>,
        attrs: RStr<'_>,
    ) -> RResult<u32, RString>;
    /// Inserts a node right after the node computing `value` (at the start for a graph input or
    /// weight), named after `name`, reading `inputs` (usually `value` itself), and moves every
    /// other reader of `value` (nodes and graph outputs) to the new node's output: the way to
    /// put an op between a value and its users. Refused unless the new output has `value`'s
    /// dtype and shape.
    fn insert_after(
        &mut self,
        value: u32,
        name: RStr<'_>,
        op: RStr<'_>,
        inputs: RSlice<'_, u32>,
        attrs: RStr<'_>,
    ) -> RResult<u32, RString>;
    /// The graph outputs' value ids, in order (a decoder's first is its logits).
    fn outputs(&self) -> RVec<u32>;
    /// Makes graph output `index` read `value` (`index` equal to the number of outputs adds
    /// one). Refused for a value that does not exist or an index past the end.
    fn set_output(&mut self, index: usize, value: u32) -> RResult<(), RString>;
    /// Every match of `pattern` in the graph, in graph order, by the host's pattern matcher
    /// (the one the built-in transforms use). Matches may overlap. Their node indices hold
    /// until the next edit; read what you need from every match before inserting anything
    /// (value ids stay valid).
    fn find_pattern(&self, pattern: &PatternDecl) -> RResult<RVec<PatternMatch>, RString>;
}

/// Builds a model's graph, implemented by the host for an importer plugin. Ops are named as a
/// graph dump prints them (see [`GraphEdit::insert_node`]); shapes are written as dumps print
/// them too (`[1, seq]`, with symbols declared by [`GraphBuild::symbol`]). The host runs every
/// op's shape rules as nodes are added, so a mistake fails at the node that makes it.
#[sabi_trait]
pub trait GraphBuild {
    /// Declares symbol `name` (a dynamic size such as `seq`) with its inclusive range.
    fn symbol(&mut self, name: RStr<'_>, min: u64, max: u64);
    /// Adds a graph input; returns its value id. The runtime feeds `input_ids` and
    /// `position_ids` (`i64 [1, seq]`) to a decoder.
    fn input(&mut self, name: RStr<'_>, dtype: RStr<'_>, shape: RStr<'_>) -> RResult<u32, RString>;
    /// Adds a weight named `name` holding `tensor`, stored in `dtype` (`f32`, `bf16`, `f16`).
    fn weight(&mut self, name: RStr<'_>, dtype: RStr<'_>, tensor: HostTensor) -> RResult<u32, RString>;
    /// Adds a node of op `op` with attribute text `attrs` reading `inputs`; its output is named
    /// after `name` (made unique). Returns the output's value id.
    fn node(&mut self, name: RStr<'_>, op: RStr<'_>, inputs: RSlice<'_, u32>, attrs: RStr<'_>)
        -> RResult<u32, RString>;
    /// Metadata of a value added so far.
    fn value(&self, value: u32) -> ROption<ValueInfo>;
    /// Marks `value` a graph output (a decoder's first output is its logits).
    fn output(&mut self, value: u32) -> RResult<(), RString>;
}

/// The graph an importer builds, for the duration of one call.
pub type GraphBuildRef<'a> = GraphBuild_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;

/// What an importer is asked for: the file or folder and the pipeline config's wishes, as TOML
/// text (`dtype = "bfloat16"` or absent for the checkpoint's own, `max_seq_len`,
/// `max_batch_size`, `dummy_weights`).
pub type ImportFn = extern "C" fn(RStr<'_>, RStr<'_>, GraphBuildRef<'_>) -> RResult<RString, RString>;

/// A tensor an op implementation reads: row-major f32 values.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct TensorView<'a> {
    pub shape: RSlice<'a, usize>,
    pub data: RSlice<'a, f32>,
}

/// A CPU implementation of a plugin op: the inputs, the node's attribute text, the output
/// buffer to fill (sized like the input the op's output copies).
pub type CpuKernel = extern "C" fn(RSlice<'_, TensorView<'_>>, RStr<'_>, RSliceMut<'_, f32>) -> RResult<(), RString>;

/// An element type of a tensor a plugin sees (on the GPU, or a typed op's on the host).
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceDtype {
    F32,
    BF16,
    F16,
    /// Integers (token ids, positions, indices); never an attention backend's operand.
    I64,
}

impl DeviceDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DeviceDtype::F32 => 4,
            DeviceDtype::BF16 | DeviceDtype::F16 => 2,
            DeviceDtype::I64 => 8,
        }
    }
}

/// One input of a typed op as its shape rule sees it: element type and sizes, a size the graph
/// leaves symbolic until a step (the step's token count) as `RNone`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct InputMeta {
    pub dtype: DeviceDtype,
    pub dims: RVec<ROption<u64>>,
}

/// One size of a typed op's output: input `input`'s size `dim` (symbolic sizes carry over), or
/// a fixed number.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DimSpec {
    Of { input: u32, dim: u32 },
    Fixed(u64),
}

/// One output of a typed op: its element type and sizes.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct OutputSpec {
    pub dtype: DeviceDtype,
    pub dims: RVec<DimSpec>,
}

/// A typed op's shape rule: the inputs' metadata and the node's attribute text in, each
/// output's element type and sizes out (or why the inputs do not fit). The host runs it when a
/// node is added and checks every later graph against it.
pub type OutputsFn = extern "C" fn(RSlice<'_, InputMeta>, RStr<'_>) -> RResult<RVec<OutputSpec>, RString>;

/// A tensor a typed op's CPU kernel reads: element type, shape, values as little-endian bytes.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct TypedView<'a> {
    pub dtype: DeviceDtype,
    pub shape: RSlice<'a, usize>,
    pub bytes: RSlice<'a, u8>,
}

/// An output a typed op's CPU kernel writes (sized and typed by its shape rule; the host fills
/// float outputs with a NaN mark first, so `debug_checks` sees what was left unwritten).
#[repr(C)]
#[derive(StableAbi)]
pub struct TypedViewMut<'a> {
    pub dtype: DeviceDtype,
    pub shape: RSlice<'a, usize>,
    pub bytes: RSliceMut<'a, u8>,
}

/// A typed op's CPU kernel: its inputs, the node's attribute text, its outputs to fill.
pub type TypedCpuKernel =
    extern "C" fn(RSlice<'_, TypedView<'_>>, RStr<'_>, RSliceMut<'_, TypedViewMut<'_>>) -> RResult<(), RString>;

/// A typed op's CUDA kernel: inputs and outputs on the device, the attribute text, the
/// host's launcher (as [`CudaKernel`], with every output).
pub type TypedCudaKernel = extern "C" fn(
    RSlice<'_, DeviceTensorView<'_>>,
    RSlice<'_, DeviceTensorView<'_>>,
    RStr<'_>,
    CudaLauncherRef<'_>,
) -> RResult<(), RString>;

/// A tensor on the GPU as a CUDA implementation sees it: a device address (row-major, dense)
/// with its shape and element type.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct DeviceTensorView<'a> {
    pub ptr: u64,
    pub shape: RSlice<'a, usize>,
    pub dtype: DeviceDtype,
}

/// What a kernel argument is.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// A device address (`T*` in the kernel).
    Ptr,
    I32,
    I64,
    F32,
}

/// One kernel argument: its kind and its bits (little end first, as the kernel reads them).
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelArg {
    pub kind: ArgKind,
    pub bits: u64,
}

impl KernelArg {
    pub fn ptr(p: u64) -> KernelArg {
        KernelArg { kind: ArgKind::Ptr, bits: p }
    }
    pub fn i32(v: i32) -> KernelArg {
        KernelArg { kind: ArgKind::I32, bits: v as u32 as u64 }
    }
    pub fn i64(v: i64) -> KernelArg {
        KernelArg { kind: ArgKind::I64, bits: v as u64 }
    }
    pub fn f32(v: f32) -> KernelArg {
        KernelArg { kind: ArgKind::F32, bits: v.to_bits() as u64 }
    }
}

/// A grid or block size.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

/// The host's CUDA service for a plugin op's CUDA implementation: compiles CUDA C source with
/// NVRTC for the device's architecture (once; cached on disk like the host's own kernels, the
/// host's `common.cuh` helpers prepended: `bf16_t`, `bf16_to_f32`, `f32_to_bf16`, `block_sum`)
/// and queues kernel `entry` on the stream the step runs on (inside a CUDA graph when the step
/// is being captured). Kernels run in stream order: one starts after the kernels queued before
/// it have finished.
#[sabi_trait]
pub trait CudaLauncher {
    fn launch(
        &mut self,
        source: RStr<'_>,
        entry: RStr<'_>,
        grid: Dim3,
        block: Dim3,
        shared_mem_bytes: u32,
        args: RSlice<'_, KernelArg>,
    ) -> RResult<(), RString>;
}

pub type CudaLauncherRef<'a> = CudaLauncher_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;

/// A CUDA implementation of a plugin op: the inputs and the output on the device (the output
/// has the dtype and shape of input `output_like`), the node's attribute text, and the host's
/// launcher. It queues kernels and returns; it must not wait for them. An error fails the step
/// with the plugin's message.
pub type CudaKernel = extern "C" fn(
    RSlice<'_, DeviceTensorView<'_>>,
    DeviceTensorView<'_>,
    RStr<'_>,
    CudaLauncherRef<'_>,
) -> RResult<(), RString>;

/// The graph a transform receives for the duration of one call.
pub type GraphRef<'a> = GraphEdit_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;

/// A graph transform. Returns a one-line summary of what it changed (logged and kept in the
/// graph's history), or an error message that fails the build. `options` is the transform's
/// `[transforms.<name>]` table from the pipeline config as TOML text (declared options with their
/// defaults filled in; `enabled` left out).
#[sabi_trait]
pub trait Transform: Send + Sync {
    fn apply(&self, graph: GraphRef<'_>, options: RStr<'_>) -> RResult<RString, RString>;
}

/// A plugin object whose panics become its errors: a panic may not cross the FFI boundary
/// (abi_stable aborts the host when one tries), so a bug in a plugin's transform, attention
/// backend, runtime or compiled model fails what it was doing (the build, the step's requests)
/// with the panic's message instead of killing the process. The SDK wraps every object it boxes.
struct CatchPanic<T>(T);

/// `f()`, or `on_panic("<what> panicked: <message>")`.
fn caught<R>(what: &str, f: impl FnOnce() -> R, on_panic: impl FnOnce(RString) -> R) -> R {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| on_panic(panic_message(what, p).into()))
}

/// `f()`, or the error `<what> panicked: <message>`.
fn catching<R>(what: &str, f: impl FnOnce() -> RResult<R, RString>) -> RResult<R, RString> {
    caught(what, f, RResult::RErr)
}

impl<T: Transform> Transform for CatchPanic<T> {
    fn apply(&self, graph: GraphRef<'_>, options: RStr<'_>) -> RResult<RString, RString> {
        catching("transform", || self.0.apply(graph, options))
    }
}

impl<T: AttentionBackend> AttentionBackend for CatchPanic<T> {
    fn begin_step(&mut self, step: StepInfo<'_>) -> RResult<(), RString> {
        catching("attention backend", || self.0.begin_step(step))
    }
    fn attend(&self, call: AttentionCall<'_>) -> RResult<(), RString> {
        catching("attention backend", || self.0.attend(call))
    }
}

impl<T: CompiledGraph> CompiledGraph for CatchPanic<T> {
    fn forward(&mut self, run: RunGraphRef<'_>) -> RResult<(), RString> {
        catching("compiled model", || self.0.forward(run))
    }
}

impl<T: Runtime> Runtime for CatchPanic<T> {
    fn add_request(&mut self, id: u64, request: RuntimeRequest) {
        caught("runtime", || self.0.add_request(id, request), |_| ())
    }
    fn abort(&mut self, id: u64) -> bool {
        caught("runtime", || self.0.abort(id), |_| false)
    }
    fn has_unfinished(&self) -> bool {
        caught("runtime", || self.0.has_unfinished(), |_| false)
    }
    fn step(&mut self, engine: EngineRef<'_>) -> RVec<RuntimeFinished> {
        // A panic loses the runtime's state: the host fails every request it still has.
        caught("runtime", || self.0.step(engine), |_| RVec::new())
    }
}

/// The text of a caught panic, as "<what> panicked: <message>".
fn panic_message(what: &str, payload: Box<dyn std::any::Any + Send>) -> String {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    format!("{what} panicked: {msg}")
}

impl<T: CudaAttentionBackend> CudaAttentionBackend for CatchPanic<T> {
    fn begin_step(&mut self, step: StepInfo<'_>) -> RResult<(), RString> {
        catching("CUDA attention backend", || self.0.begin_step(step))
    }
    fn attend(&self, call: DeviceAttentionCall, launcher: CudaLauncherRef<'_>) -> RResult<(), RString> {
        catching("CUDA attention backend", || self.0.attend(call, launcher))
    }
}

/// An option a transform accepts; the host checks the config's value has the default's type.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct OptionDecl {
    pub name: RString,
    /// The default as a TOML value (`true`, `3`, `"text"`).
    pub default: RString,
    pub help: RString,
}

/// One layer's cached attention for one step. Layouts (row-major):
/// `q`/`out` `[heads, tokens, head_dim]`; `k`/`v` `[kv_heads, tokens, head_dim]`;
/// caches `[slot, kv_heads, head_dim]` where token position `p` of sequence `s` lives in slot
/// `page_indices[page_indptr[s] + p / page_size] * page_size + p % page_size`.
/// The backend writes this step's k/v into the caches, then attends each query token to its
/// sequence's positions `0..=token_pos[t]` (causal).
#[repr(C)]
#[derive(StableAbi)]
pub struct AttentionCall<'a> {
    pub layer: usize,
    pub scale: f32,
    pub heads: usize,
    pub kv_heads: usize,
    pub tokens: usize,
    pub head_dim: usize,
    pub q: RSlice<'a, f32>,
    pub k: RSlice<'a, f32>,
    pub v: RSlice<'a, f32>,
    /// Per token: its sequence, its position in that sequence.
    pub token_seq: RSlice<'a, usize>,
    pub token_pos: RSlice<'a, usize>,
    pub page_size: usize,
    /// The page table in CSR form: sequence `s` owns `page_indices[page_indptr[s]..page_indptr[s+1]]`.
    pub page_indptr: RSlice<'a, usize>,
    pub page_indices: RSlice<'a, u32>,
    pub k_cache: RSliceMut<'a, f32>,
    pub v_cache: RSliceMut<'a, f32>,
    pub out: RSliceMut<'a, f32>,
}

/// One step's batch as every layer will see it, given to [`AttentionBackend::begin_step`]
/// before the first layer (the same fields as in [`AttentionCall`]).
#[repr(C)]
#[derive(StableAbi)]
pub struct StepInfo<'a> {
    pub tokens: usize,
    pub token_seq: RSlice<'a, usize>,
    pub token_pos: RSlice<'a, usize>,
    pub page_size: usize,
    pub page_indptr: RSlice<'a, usize>,
    pub page_indices: RSlice<'a, u32>,
}

/// An attention backend (selected with `attn_backend` in the pipeline config). The host creates
/// one instance per engine, calls `begin_step` once per step (plan what all layers share), then
/// `attend` for each layer.
#[sabi_trait]
pub trait AttentionBackend: Send + Sync {
    fn begin_step(&mut self, step: StepInfo<'_>) -> RResult<(), RString>;
    fn attend(&self, call: AttentionCall<'_>) -> RResult<(), RString>;
}

/// An owned attention backend instance.
pub type AttentionBackendBox = AttentionBackend_TO<'static, RBox<()>>;

/// Boxes a backend for [`PluginDecl::attention_backend`]'s `make`.
pub fn attention_backend_box(b: impl AttentionBackend + 'static) -> AttentionBackendBox {
    AttentionBackend_TO::from_value(CatchPanic(b), abi_stable::sabi_trait::TD_Opaque)
}

/// One layer's cached attention for one step on the GPU, as device addresses (all on the
/// device the engine runs on; element type `dtype`). Layouts as in [`AttentionCall`]: `q`/`out`
/// `[heads, tokens, head_dim]`, this step's `k`/`v` `[kv_heads, tokens, head_dim]`, contiguous;
/// the caches `[slot, kv_heads, head_dim]`. The step's metadata, on the device: `token_seq` and
/// `token_pos` (i64 per token), `page_indptr` (i64 per sequence + 1), `page_indices` (i32 per
/// page), `seq_start` (i64 per sequence: its first token in this step) and `cached_len` (i64 per
/// sequence: positions already in the cache). The backend writes this step's k/v into the
/// caches, then attends each query token to its sequence's positions `0..=token_pos[t]`.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct DeviceAttentionCall {
    pub layer: usize,
    pub scale: f32,
    pub heads: usize,
    pub kv_heads: usize,
    pub tokens: usize,
    pub head_dim: usize,
    pub dtype: DeviceDtype,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub seqs: usize,
    pub page_size: usize,
    pub token_seq: u64,
    pub token_pos: u64,
    pub page_indptr: u64,
    pub page_indices: u64,
    pub seq_start: u64,
    pub cached_len: u64,
}

/// An attention backend's CUDA side (selected with `attn_backend` on `device = "cuda"`). The
/// host creates one instance per engine, calls `begin_step` once per step on the host (the
/// step's batch, as [`AttentionBackend::begin_step`] gets it: plan what all layers share), then
/// `attend` for each layer, which queues kernels through the host's launcher (NVRTC-compiled
/// source, the step's stream) and returns without waiting for them. Steps with such a backend
/// are not captured into CUDA graphs.
#[sabi_trait]
pub trait CudaAttentionBackend: Send + Sync {
    fn begin_step(&mut self, step: StepInfo<'_>) -> RResult<(), RString>;
    fn attend(&self, call: DeviceAttentionCall, launcher: CudaLauncherRef<'_>) -> RResult<(), RString>;
}

/// An owned CUDA attention backend instance.
pub type CudaAttentionBackendBox = CudaAttentionBackend_TO<'static, RBox<()>>;

/// Boxes a CUDA attention backend for [`PluginDecl::with_cuda_attention`]'s `make`.
pub fn cuda_attention_backend_box(b: impl CudaAttentionBackend + 'static) -> CudaAttentionBackendBox {
    CudaAttentionBackend_TO::from_value(CatchPanic(b), abi_stable::sabi_trait::TD_Opaque)
}

/// One sequence's share of a forward step (see [`EngineOps::step`]).
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct SeqStep<'a> {
    /// Its tokens not yet in the KV cache (at least one): exactly the request's tokens (its
    /// prompt, then the tokens the engine sampled for it) from position `cached` on.
    pub new_tokens: RSlice<'a, i64>,
    /// How many of its tokens the KV cache holds already (0 for a new sequence).
    pub cached: usize,
    /// Its KV-cache pages in order, enough for `cached + new_tokens.len()` positions; page ids
    /// are below [`EngineOps::num_pages`]. A page may hold positions another request wrote only
    /// if they are the same tokens after the same prefix (a shared prefix: the host verifies it
    /// and refuses the step otherwise), and no two sequences of a step write one page.
    pub pages: RSlice<'a, u32>,
    /// Which request it is (the id given to [`Runtime::add_request`]): the next token is
    /// sampled with that request's parameters and seed.
    pub request: u64,
}

/// A request as a runtime receives it. The host has checked it (a non-empty prompt shorter
/// than [`EngineOps::max_seq_len`], sampling parameters in range) and keeps its sampling
/// parameters and stop strings: [`EngineOps::step`] samples, and the host ends a request whose
/// text reaches a stop string (through [`Runtime::abort`]).
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct RuntimeRequest {
    pub prompt: RVec<i64>,
    pub max_new_tokens: usize,
    /// Generation ends after any of these.
    pub stop_token_ids: RVec<i64>,
}

/// A request the runtime has finished: `Ok(true)` when a stop token ended it, `Ok(false)` when
/// its length did (`max_new_tokens` or `max_seq_len`), or why it failed. Its tokens are those
/// the engine sampled for it.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct RuntimeFinished {
    pub request: u64,
    pub result: RResult<bool, RString>,
}

/// The engine as a runtime drives it, implemented by the host: limits and one batched forward
/// step with sampling. The runtime owns scheduling and the KV-cache page assignment; the host
/// checks every step (limits, each sequence's tokens, what its pages hold) and refuses a bad one
/// with a message, without running it.
#[sabi_trait]
pub trait EngineOps {
    /// Most sequences in one step.
    fn max_batch_size(&self) -> usize;
    /// Most positions of one sequence (prompt + generated).
    fn max_seq_len(&self) -> usize;
    /// Most tokens in one step, over all its sequences.
    fn max_num_tokens(&self) -> usize;
    /// Positions per KV-cache page.
    fn page_size(&self) -> usize;
    /// Page ids go from 0 to this, exclusive.
    fn num_pages(&self) -> usize;
    /// `n > 0`: the model's attention wants each sequence's pages to be one run of `n`
    /// consecutive ids, assigned when it starts; 0: any pages.
    fn pages_per_sequence(&self) -> usize;
    /// One forward over `seqs`: their new tokens enter the KV cache, and each sequence whose new
    /// tokens reach the end of its tokens gets its next token, sampled as its request asks (and
    /// streamed to the user); a prefill chunk that stops short gets -1.
    fn step(&mut self, seqs: RSlice<'_, SeqStep<'_>>) -> RResult<RVec<i64>, RString>;
}

/// The engine a runtime drives, for the duration of one [`Runtime::step`] call.
pub type EngineRef<'a> = EngineOps_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;

/// A runtime (selected with `runtime` in the pipeline config): a scheduler the host's engine
/// loop drives for as long as the engine serves. Requests come and go between steps.
#[sabi_trait]
pub trait Runtime: Send {
    /// A new request (already checked by the host), to schedule from the next step on.
    fn add_request(&mut self, id: u64, request: RuntimeRequest);
    /// Drops a request, waiting or running (its pages are the runtime's to reuse at once);
    /// false when it has no such request.
    fn abort(&mut self, id: u64) -> bool;
    /// Whether any request is waiting or running.
    fn has_unfinished(&self) -> bool;
    /// One scheduling step: usually one [`EngineOps::step`] over the batch it chooses. Returns
    /// the requests it finished in this step.
    fn step(&mut self, engine: EngineRef<'_>) -> RVec<RuntimeFinished>;
}

/// An owned runtime instance.
pub type RuntimeBox = Runtime_TO<'static, RBox<()>>;

/// Boxes a runtime for [`PluginDecl::runtime`]'s `make`.
pub fn runtime_box(r: impl Runtime + 'static) -> RuntimeBox {
    Runtime_TO::from_value(CatchPanic(r), abi_stable::sabi_trait::TD_Opaque)
}

/// One forward call of a compiled model as the host runs it for a library compile backend: the
/// graph (read-only), and the host's kernels, one node at a time. Values are named by their ids;
/// graph inputs and weights hold their values when the call starts, every other value once the
/// node that writes it has run. The call succeeds when every graph output holds a value.
#[sabi_trait]
pub trait RunGraph {
    fn num_nodes(&self) -> usize;
    /// `None` past the last node.
    fn node(&self, index: usize) -> ROption<NodeInfo>;
    fn value(&self, value: u32) -> ROption<ValueInfo>;
    /// The graph's outputs, in order.
    fn outputs(&self) -> RVec<u32>;
    /// Runs node `index` with the host's kernel for its op (cached attention: the engine's
    /// attention backend over this step's KV cache): its inputs must hold values; its output
    /// gets one. Errors name the node.
    fn run_node(&mut self, index: usize) -> RResult<(), RString>;
    /// A copy of a value, as f32 (`None`-like error if it holds none).
    fn read(&self, value: u32) -> RResult<HostTensor, RString>;
    /// Drops a value's storage (a later read or use of it is an error until a node writes it
    /// again). Graph inputs and weights are kept whatever this says.
    fn release(&mut self, value: u32);
}

/// The graph a compiled model runs, for the duration of one forward call.
pub type RunGraphRef<'a> = RunGraph_TO<'a, abi_stable::sabi_types::RMut<'a, ()>>;

/// A compiled model: runs one forward by choosing which nodes run, in what order, and when
/// storage is released.
#[sabi_trait]
pub trait CompiledGraph: Send {
    fn forward(&mut self, run: RunGraphRef<'_>) -> RResult<(), RString>;
}

/// An owned compiled model.
pub type CompiledGraphBox = CompiledGraph_TO<'static, RBox<()>>;

/// Boxes a compiled model for a compile backend's `compile` to return.
pub fn compiled_graph_box(c: impl CompiledGraph + 'static) -> CompiledGraphBox {
    CompiledGraph_TO::from_value(CatchPanic(c), abi_stable::sabi_trait::TD_Opaque)
}

/// What a plugin declares.
#[repr(u8)]
#[derive(StableAbi)]
pub enum PluginBody {
    Transform {
        /// The pipeline stage it runs at (`post_load_fusion`, ...; see [`crate::Stage`]).
        stage: RString,
        /// Order within the stage (lower first; ties by name).
        order: i32,
        enabled_by_default: bool,
        options: RVec<OptionDecl>,
        transform: Transform_TO<'static, RBox<()>>,
    },
    AttentionBackend {
        /// The options it takes from `[attention_backends.<name>]` in the pipeline config, as
        /// `(name, default TOML value, help)`.
        options: RVec<OptionDecl>,
        /// Creates one backend instance (each engine gets its own: `begin_step` keeps state).
        /// Set for a backend without options.
        make: ROption<extern "C" fn() -> AttentionBackendBox>,
        /// Creates one backend instance from its options, a TOML table's text holding every
        /// declared option (the config's value or the default); an error names what is wrong.
        /// Set for a backend with options.
        make_with_options: ROption<extern "C" fn(RStr<'_>) -> RResult<AttentionBackendBox, RString>>,
        /// Creates its CUDA side for one engine from the same options text (`{}` when it
        /// declares none); `RNone`: CPU only ([`PluginDecl::with_cuda_attention`]).
        make_cuda: ROption<extern "C" fn(RStr<'_>) -> RResult<CudaAttentionBackendBox, RString>>,
    },
    /// A model importer, selectable as `importer = "<name>"` and asked (through `accepts`)
    /// about models whose config names no importer.
    ModelImporter {
        /// Whether this importer reads what is at the path.
        accepts: extern "C" fn(RStr<'_>) -> bool,
        /// Builds the graph; returns a one-line description of what was read (for the graph's
        /// history) or an error message naming the file and what is wrong with it.
        /// An [`ImportFn`] (spelled out: the layout checker reads fn pointer types inline).
        import: extern "C" fn(RStr<'_>, RStr<'_>, GraphBuildRef<'_>) -> RResult<RString, RString>,
    },
    /// A compile backend, selectable as `compile_backend = "<name>"`: it runs the graph on the
    /// host's CPU kernels, node by node, through [`RunGraph`].
    CompileBackend {
        /// Compiles for one engine; `options` is TOML text (`device`, `page_size`, `kv_pages`).
        compile: extern "C" fn(RStr<'_>) -> RResult<CompiledGraphBox, RString>,
    },
    /// A runtime, selectable as `runtime = "<name>"`.
    Runtime {
        /// Creates one runtime instance (one per engine run).
        make: extern "C" fn() -> RuntimeBox,
    },
    /// A new op: `inputs` tensors in, one out with the dtype and shape of input `output_like`.
    /// The CPU kernel is the op's reference and always given; the CUDA one is optional (without
    /// it, a CUDA engine with this op in its graph is refused, naming the op).
    Op {
        inputs: u32,
        output_like: u32,
        /// A [`CpuKernel`] (spelled out: the layout checker reads fn pointer types inline).
        cpu: extern "C" fn(RSlice<'_, TensorView<'_>>, RStr<'_>, RSliceMut<'_, f32>) -> RResult<(), RString>,
        /// A [`CudaKernel`].
        cuda: ROption<
            extern "C" fn(
                RSlice<'_, DeviceTensorView<'_>>,
                DeviceTensorView<'_>,
                RStr<'_>,
                CudaLauncherRef<'_>,
            ) -> RResult<(), RString>,
        >,
    },
    /// A new op with element types and several outputs: `inputs` tensors in (any of f32,
    /// bf16, f16, i64), the outputs its shape rule gives. The CPU kernel is the reference and
    /// always given; the CUDA one is optional.
    TypedOp {
        inputs: u32,
        /// An [`OutputsFn`] (spelled out: the layout checker reads fn pointer types inline).
        outputs: extern "C" fn(RSlice<'_, InputMeta>, RStr<'_>) -> RResult<RVec<OutputSpec>, RString>,
        /// A [`TypedCpuKernel`].
        cpu:
            extern "C" fn(RSlice<'_, TypedView<'_>>, RStr<'_>, RSliceMut<'_, TypedViewMut<'_>>) -> RResult<(), RString>,
        /// A [`TypedCudaKernel`].
        cuda: ROption<
            extern "C" fn(
                RSlice<'_, DeviceTensorView<'_>>,
                RSlice<'_, DeviceTensorView<'_>>,
                RStr<'_>,
                CudaLauncherRef<'_>,
            ) -> RResult<(), RString>,
        >,
    },
}

#[repr(C)]
#[derive(StableAbi)]
pub struct PluginDecl {
    pub name: RString,
    pub version: RString,
    pub body: PluginBody,
}

impl PluginDecl {
    /// A transform running at `stage` (before the built-in transforms of that stage), enabled
    /// unless the config disables it, with `options` as `(name, default TOML value, help)`.
    pub fn transform(
        name: &str,
        version: &str,
        stage: crate::Stage,
        options: &[(&str, &str, &str)],
        t: impl Transform + 'static,
    ) -> PluginDecl {
        PluginDecl {
            name: name.into(),
            version: version.into(),
            body: PluginBody::Transform {
                stage: stage.as_str().into(),
                order: 0,
                enabled_by_default: true,
                options: options
                    .iter()
                    .map(|(n, d, h)| OptionDecl { name: (*n).into(), default: (*d).into(), help: (*h).into() })
                    .collect(),
                transform: Transform_TO::from_value(CatchPanic(t), abi_stable::sabi_trait::TD_Opaque),
            },
        }
    }

    /// A new op transforms can insert by name (`GraphEdit::insert_node`), with its CPU kernel
    /// (CPU engines only; see [`PluginDecl::op_with_cuda`]).
    pub fn op(name: &str, version: &str, inputs: u32, output_like: u32, cpu: CpuKernel) -> PluginDecl {
        let body = PluginBody::Op { inputs, output_like, cpu, cuda: ROption::RNone };
        PluginDecl { name: name.into(), version: version.into(), body }
    }

    /// A new op with a CPU kernel (the reference) and a CUDA one, so engines on either device
    /// can run graphs that hold it.
    pub fn op_with_cuda(
        name: &str,
        version: &str,
        inputs: u32,
        output_like: u32,
        cpu: CpuKernel,
        cuda: CudaKernel,
    ) -> PluginDecl {
        let body = PluginBody::Op { inputs, output_like, cpu, cuda: ROption::RSome(cuda) };
        PluginDecl { name: name.into(), version: version.into(), body }
    }

    /// A new op whose tensors may be f32, bf16, f16 or i64 and which may have several outputs:
    /// `outputs` is its shape rule (see [`OutputsFn`]), `cpu` its reference kernel on the host's
    /// tensors as they are stored. CPU engines only unless given a CUDA kernel
    /// ([`PluginDecl::with_cuda_kernel`]).
    pub fn typed_op(name: &str, version: &str, inputs: u32, outputs: OutputsFn, cpu: TypedCpuKernel) -> PluginDecl {
        let body = PluginBody::TypedOp { inputs, outputs, cpu, cuda: ROption::RNone };
        PluginDecl { name: name.into(), version: version.into(), body }
    }

    /// Gives a typed op a CUDA kernel; does nothing to a declaration of another kind.
    pub fn with_cuda_kernel(mut self, kernel: TypedCudaKernel) -> PluginDecl {
        if let PluginBody::TypedOp { cuda, .. } = &mut self.body {
            *cuda = ROption::RSome(kernel);
        }
        self
    }

    /// A model importer: `accepts(path)` says whether it reads what is at `path`; `import(path,
    /// options, graph)` builds the graph (see [`ImportFn`]).
    pub fn model_importer(
        name: &str,
        version: &str,
        accepts: extern "C" fn(RStr<'_>) -> bool,
        import: ImportFn,
    ) -> PluginDecl {
        PluginDecl { name: name.into(), version: version.into(), body: PluginBody::ModelImporter { accepts, import } }
    }

    /// For a transform: leave it off unless the config enables it (`[transforms.<name>]
    /// enabled = true`).
    pub fn disabled_by_default(mut self) -> PluginDecl {
        if let PluginBody::Transform { enabled_by_default, .. } = &mut self.body {
            *enabled_by_default = false;
        }
        self
    }

    /// A compile backend, selectable as `compile_backend = "<name>"`; `compile(options)` makes
    /// one compiled model per engine.
    pub fn compile_backend(
        name: &str,
        version: &str,
        compile: extern "C" fn(RStr<'_>) -> RResult<CompiledGraphBox, RString>,
    ) -> PluginDecl {
        PluginDecl { name: name.into(), version: version.into(), body: PluginBody::CompileBackend { compile } }
    }

    /// A runtime, selectable as `runtime = "<name>"`; `make` creates one instance per run.
    pub fn runtime(name: &str, version: &str, make: extern "C" fn() -> RuntimeBox) -> PluginDecl {
        PluginDecl { name: name.into(), version: version.into(), body: PluginBody::Runtime { make } }
    }

    /// An attention backend, selectable as `attn_backend = "<name>"`; `make` creates one
    /// instance per engine.
    pub fn attention_backend(name: &str, version: &str, make: extern "C" fn() -> AttentionBackendBox) -> PluginDecl {
        let body = PluginBody::AttentionBackend {
            options: RVec::new(),
            make: ROption::RSome(make),
            make_with_options: ROption::RNone,
            make_cuda: ROption::RNone,
        };
        PluginDecl { name: name.into(), version: version.into(), body }
    }

    /// An attention backend taking `options` (`(name, default TOML value, help)`) from the
    /// config's `[attention_backends.<name>]` table; `make(options)` gets them as TOML text
    /// (every declared option, the config's value or the default) and creates one instance per
    /// engine, or says what is wrong with them.
    pub fn attention_backend_with_options(
        name: &str,
        version: &str,
        options: &[(&str, &str, &str)],
        make: extern "C" fn(RStr<'_>) -> RResult<AttentionBackendBox, RString>,
    ) -> PluginDecl {
        let body = PluginBody::AttentionBackend {
            options: options
                .iter()
                .map(|(n, d, h)| OptionDecl { name: (*n).into(), default: (*d).into(), help: (*h).into() })
                .collect(),
            make: ROption::RNone,
            make_with_options: ROption::RSome(make),
            make_cuda: ROption::RNone,
        };
        PluginDecl { name: name.into(), version: version.into(), body }
    }

    /// Gives an attention backend a CUDA side: `make(options)` (the backend's options as TOML
    /// text, as its CPU side gets them) creates one instance per engine on `device = "cuda"`.
    /// Without it, a CUDA engine with this backend is refused at build. Does nothing to a
    /// declaration of another kind.
    pub fn with_cuda_attention(
        mut self,
        make: extern "C" fn(RStr<'_>) -> RResult<CudaAttentionBackendBox, RString>,
    ) -> PluginDecl {
        if let PluginBody::AttentionBackend { make_cuda, .. } = &mut self.body {
            *make_cuda = ROption::RSome(make);
        }
        self
    }
}

/// The root module every plugin library exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModule_Ref)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The SDK version the library was built against, for messages.
    pub sdk_version: RStr<'static>,
    #[sabi(last_prefix_field)]
    pub plugins: extern "C" fn() -> RVec<PluginDecl>,
}

impl RootModule for PluginModule_Ref {
    declare_root_module_statics! {PluginModule_Ref}
    const BASE_NAME: &'static str = "autodeploy_plugin";
    const NAME: &'static str = "autodeploy plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The exported symbol's name for the abi_stable version the SDK pins; checked by a test.
#[doc(hidden)]
pub const ROOT_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// Exports a plugin library's root module. `$plugins` is a `fn() -> Vec<PluginDecl>` listing
/// the library's plugins. Use once, at the crate root of a `cdylib`.
///
/// ```ignore
/// fn plugins() -> Vec<PluginDecl> { vec![PluginDecl::attention_backend("mine", "0.1.0", Mine)] }
/// autodeploy_sdk::export_plugins!(plugins);
/// ```
#[macro_export]
macro_rules! export_plugins {
    ($plugins:path) => {
        #[doc(hidden)]
        extern "C" fn __autodeploy_plugins() -> $crate::abi_stable::std_types::RVec<$crate::ffi::PluginDecl> {
            let v: ::std::vec::Vec<$crate::ffi::PluginDecl> = $plugins();
            v.into()
        }

        #[doc(hidden)]
        fn __autodeploy_root_module() -> $crate::ffi::PluginModule_Ref {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::ffi::PluginModule {
                sdk_version: $crate::abi_stable::std_types::RStr::from_str($crate::SDK_VERSION_STR),
                plugins: __autodeploy_plugins,
            }
            .leak_into_prefix()
        }

        // What `#[abi_stable::export_root_module]` generates, spelled with `$crate` paths so the
        // plugin crate needs no dependency besides the SDK (the symbol name is pinned by a test).
        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::abi_stable::library::LibHeader = {
            extern "C" fn erased() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(__autodeploy_root_module)
            }
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::ffi::PluginModule_Ref>(
                    erased,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}
