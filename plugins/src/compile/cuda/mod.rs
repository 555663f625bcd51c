//! The graph executor on a CUDA GPU, behind every compile backend when `device = "cuda"`.
//!
//! At compile time it uploads the weights (at the graph's dtypes), allocates the paged KV cache
//! for the runtime's whole page pool, and plans activation memory once: every value gets a
//! region of one arena, sized for the largest shape its symbols allow and reused once the value
//! is dead (views keep what they alias alive). A step then only evaluates shapes, uploads the
//! step's inputs and metadata in one copy, and launches kernels at fixed addresses, which is
//! what lets `cudagraph` capture a decode step once per batch-size bucket and replay it.
//!
//! Modes: `fuse` (the `compile` backend) runs an add followed by the RMSNorm of its result as one
//! kernel; `graphs` (`cudagraph`) captures decode steps. `opt` is both.

use std::collections::HashMap;

use autodeploy_core::backend::{CompileOptions, CompiledModel};
use autodeploy_core::custom_op::{DeviceTensor, KernelArg, KernelLauncher, LaunchDims};
use autodeploy_core::error::{Error, Result};
use autodeploy_core::kvcache::StepContext;
use autodeploy_core::sampling::RowDraw;
use autodeploy_core::shape::{eval_shape, Bindings};
use autodeploy_core::{DType, Graph, Op, Tensor};
use autodeploy_kernels::cuda::cudarc::driver::sys::CUstreamCaptureMode;
use autodeploy_kernels::cuda::exec::{
    plan_tiles, Binary, Buffer, Dt, Gpu, HeadRows, Ptr, RowSampling, Split, StepMeta, Strided, Unary,
    SPLIT_EARLY_MAX_TOKENS, SPLIT_MIN_CHUNK,
};
use autodeploy_kernels::cuda::Unavailable;

mod memory;
mod strides;
mod weights;
use memory::{padded, Arena};
use strides::{broadcast_strides, contiguous_strides, head_rows, is_contiguous, norm_dim, view_strides};
use weights::host_bytes;

/// What the CUDA executor does beyond running nodes in order.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mode {
    pub fuse: bool,
    pub graphs: bool,
}

/// Fills `n` values of `dtype` at `p` with the debug checks' mark for values never written.
fn mark_unwritten(gpu: &Gpu, p: Ptr, dtype: DType, n: usize) -> Result<()> {
    let bits = autodeploy_core::custom_op::UNWRITTEN.to_bits();
    let (elem, pattern) = match dtype {
        DType::F32 => (4, bits),
        DType::BF16 => (2, bits >> 16),
        DType::F16 => (2, half::f16::from_f32(autodeploy_core::custom_op::UNWRITTEN).to_bits() as u32),
        d => return Err(Error::Msg(format!("debug_checks: no mark for {d} outputs"))),
    };
    gpu.memset_bits(p, elem, pattern, n).map_err(gpu_err)
}

/// `n` values of `dtype` at `p`, as f32 on the host (after the stream finishes).
fn read_back(gpu: &Gpu, p: Ptr, dtype: DType, n: usize) -> Result<Vec<f32>> {
    let mut bytes = vec![0u8; n * dtype.size_in_bytes()];
    gpu.download(p, &mut bytes).map_err(gpu_err)?;
    Ok(match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        d => return Err(Error::Msg(format!("debug_checks: cannot read {d} outputs"))),
    })
}

fn gpu_err(e: Unavailable) -> Error {
    Error::Msg(e.0)
}

fn dt(d: DType, what: &str) -> Result<Dt> {
    Ok(match d {
        DType::F32 => Dt::F32,
        DType::BF16 => Dt::BF16,
        DType::F16 => Dt::F16,
        DType::I64 => Dt::I64,
        DType::Bool => Dt::Bool,
        DType::Block(t) => {
            return Err(Error::Msg(format!(
                "{what}: {} block-quantized weights have no CUDA kernels yet; set dtype = \"bfloat16\" to dequantize them at load",
                t.dtype_name()
            )))
        }
    })
}

/// A strided view (`src` read through `strides`, shape `xs`) copied to contiguous memory at `to`.
fn copy_contiguous(
    gpu: &Gpu,
    src: Ptr,
    d: Dt,
    xs: &[usize],
    strides: &[i64],
    to: Ptr,
) -> std::result::Result<(), Unavailable> {
    let s = Strided::new(xs, strides, &vec![0; xs.len()])?;
    gpu.copy_strided(src, d, to, d, xs.iter().product(), s, false)
}

/// Ops whose output may share the input's memory (decided per step from the shapes).
fn may_alias(op: &Op) -> bool {
    matches!(
        op,
        Op::View(_) | Op::Reshape(_) | Op::Unsqueeze(_) | Op::Transpose(..) | Op::Slice { .. } | Op::ToDtype(_)
    )
}

/// A plugin op's CUDA implementation launching on the executor's GPU.
struct SourceLauncher<'a> {
    gpu: &'a Gpu,
    what: String,
}

impl KernelLauncher for SourceLauncher<'_> {
    fn launch(
        &mut self,
        source: &str,
        entry: &str,
        dims: LaunchDims,
        args: &[KernelArg],
    ) -> std::result::Result<(), String> {
        self.gpu.launch_source(&self.what, source, entry, dims, args).map_err(|e| e.0)
    }
}

/// Why this executor cannot run `op`, if it cannot.
fn unsupported(op: &Op) -> Option<&'static str> {
    match op {
        Op::Matmul | Op::Sdpa { .. } | Op::Attention { .. } | Op::Softmax { .. } => {
            Some("uncached attention has no CUDA kernels (the cache_init stage turns matched attention into cached attention)")
        }
        Op::Custom { name, .. } if autodeploy_core::registry::custom_op(name).is_none_or(|c| c.cuda.is_none()) => {
            Some("this plugin op has a CPU kernel only: its library registered no CUDA one")
        }
        Op::Gelu { .. } | Op::LogSoftmax { .. } => Some("this op has a CPU kernel only so far"),
        Op::Mean { dims, .. } if dims.as_slice() != [-1] => Some("mean has a CUDA kernel over the last dim only"),
        Op::Rope { interleaved: true } => Some("interleaved RoPE has no CUDA kernel yet"),
        _ => None,
    }
}

/// Per node: the regions its output and scratch use (arena offsets), planned once.
struct Planned {
    out: usize,
    scratch: Vec<usize>,
}

struct Layer {
    k: Buffer,
    v: Buffer,
    kv_heads: usize,
    head_dim: usize,
}

pub struct CudaModel {
    gpu: Gpu,
    graph: Graph,
    mode: Mode,
    _params: Vec<Buffer>,
    /// Device address of each param value.
    param_ptr: HashMap<usize, Ptr>,
    arena: Buffer,
    plan: Vec<Planned>,
    /// Node i's work is done by a later node (fusion): an add by its RMSNorm, q/k RoPEs by
    /// their cached attention.
    deferred_to: Vec<Option<usize>>,
    /// The nodes deferred into node i (the inverse of `deferred_to`).
    deferred_into: Vec<Vec<usize>>,
    /// Cached attention node i's output is only transposed to `[.., tokens, heads, d]`: its
    /// split-KV kernels write that layout, and the transpose is a view.
    attn_tokens_major: Vec<bool>,
    /// `triton` backend: pages per sequence slot (the runtime reserves a slot per sequence).
    slot_pages: Option<usize>,
    /// Split-KV decode: used for steps of up to `split_tokens` tokens; the latency build (steps
    /// of up to `SPLIT_EARLY_MAX_TOKENS`) with its own chunks in the same partials.
    split: Option<Split>,
    split_early: Option<Split>,
    split_tokens: usize,
    _split_buf: Option<Buffer>,
    cache: Vec<Layer>,
    page_size: usize,
    /// Pages the runtime may use; page `kv_pages` is the padding sequences' scratch page.
    kv_pages: usize,
    /// Step inputs and metadata, uploaded in one copy.
    staging: Buffer,
    /// Error flags the kernels set (a bad embedding id, a bad gather index), then argmax ids.
    flags: Buffer,
    argmax_scratch: Buffer,
    graphs: HashMap<usize, Captured>,
    buckets: Vec<usize>,
    /// Largest tokens per step the plan allows.
    max_tokens: usize,
    /// `AUTODEPLOY_PROFILE`: time per op name (calls, total), printed when the model drops.
    profile_on: bool,
    profile: std::sync::Mutex<std::collections::BTreeMap<&'static str, (u64, std::time::Duration)>>,
    /// `debug_checks`: plugin ops' outputs are marked before and checked after each launch.
    debug_checks: bool,
    /// `AUTODEPLOY_PROFILE_SKIP=op,op`: for timing only, nodes of these ops are not run (the
    /// outputs are wrong): how much a step's time drops without them is what they cost it.
    skip_ops: Vec<String>,
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        if self.profile_on {
            let p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
            super::simple::print_profile("CUDA, synchronised after every node", &p);
        }
    }
}

struct Captured {
    graph: autodeploy_kernels::cuda::cudarc::driver::CudaGraph,
    /// Where the captured launches leave the graph output, and its shape.
    out: (Ptr, Vec<usize>),
}

// SAFETY: a captured graph is launched only by the model that owns it, from one thread at a
// time (`CompiledModel` is `Send`, not `Sync`); CUDA allows graph execs on any thread.
unsafe impl Send for Captured {}

const FLAG_EMBEDDING: u64 = 0;
const FLAG_GATHER: u64 = 8;
/// Where in the flags buffer greedy ids are written.
const IDS_AT: u64 = 64;

impl CudaModel {
    pub fn compile(graph: &Graph, opts: &CompileOptions, ordinal: usize, mut mode: Mode) -> Result<CudaModel> {
        graph.validate()?;
        let debug_checks = opts.kernels.debug_checks;
        if debug_checks && mode.graphs {
            // The checks copy outputs back between kernels, which a captured graph cannot do.
            tracing::info!("debug_checks: CUDA graphs off");
            mode.graphs = false;
        }
        for n in &graph.nodes {
            if let Some(why) = unsupported(&n.op) {
                return Err(Error::Op {
                    op: n.op.name().into(),
                    msg: format!(
                        "node `{}`: {why}; run this model with device = \"cpu\"",
                        graph.value(n.outputs[0]).name
                    ),
                });
            }
            if let Op::CachedAttention { backend, .. } = &n.op {
                if !matches!(backend.as_str(), "flashinfer" | "torch" | "triton") {
                    return Err(Error::Msg(format!(
                        "attn_backend `{backend}` has no CUDA implementation; on CUDA use attn_backend = \"flashinfer\" or \"triton\""
                    )));
                }
            }
        }
        let gpu = Gpu::open_with(ordinal, &opts.cuda_kernels).map_err(gpu_err)?;
        tracing::info!(gpu = %gpu.dev.name, "compiling for CUDA");

        // The largest shapes: every symbol at the top of its range.
        let max_bind: Bindings = graph.symbols.iter().map(|(s, r)| (s.clone(), r.max)).collect();
        let max_tokens = max_bind.get("seq").copied().unwrap_or(1);
        let bytes_of = |v: autodeploy_core::ValueId| -> Result<usize> {
            let m = graph.meta(v);
            Ok(eval_shape(&m.shape, &max_bind)?.iter().product::<usize>() * m.dtype.size_in_bytes())
        };

        // Fusion (`compile`, `opt`): an add whose result the next node normalises runs inside
        // that RMSNorm; the RoPEs of a cached attention's q and k run with its KV write.
        let n = graph.nodes.len();
        let mut deferred_to: Vec<Option<usize>> = vec![None; n];
        if mode.fuse {
            for (i, pair) in graph.nodes.windows(2).enumerate() {
                let (a, b) = (&pair[0], &pair[1]);
                if let (Op::Add, Op::RmsNorm { .. }) = (&a.op, &b.op) {
                    let (x, r, o) = (graph.meta(a.inputs[0]), graph.meta(a.inputs[1]), graph.meta(a.outputs[0]));
                    if b.inputs[0] == a.outputs[0] && x.shape == r.shape && x == o && r.dtype == o.dtype {
                        deferred_to[i] = Some(i + 1);
                    }
                }
            }
            let producers = graph.producers();
            let uses = graph.use_counts();
            for (j, node) in graph.nodes.iter().enumerate() {
                // The triton backend reads this step's rotated k/v itself: no RoPE fusion there.
                if !matches!(&node.op, Op::CachedAttention { backend, .. } if backend != "triton") {
                    continue;
                }
                let rope = |v: autodeploy_core::ValueId| {
                    producers[v.0 as usize].filter(|&p| {
                        matches!(graph.nodes[p].op, Op::Rope { interleaved: false }) && uses[v.0 as usize] == 1
                    })
                };
                if let (Some(rq), Some(rk)) = (rope(node.inputs[0]), rope(node.inputs[1])) {
                    let (a, b) = (&graph.nodes[rq].inputs, &graph.nodes[rk].inputs);
                    if a[1..] == b[1..] && !graph.outputs.contains(&node.inputs[0]) {
                        deferred_to[rq] = Some(j);
                        deferred_to[rk] = Some(j);
                    }
                }
            }
        }
        let mut deferred_into: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, d) in deferred_to.iter().enumerate() {
            if let Some(j) = *d {
                deferred_into[j].push(i);
            }
        }
        let attn_tokens_major: Vec<bool> = {
            let mut readers: Vec<Vec<usize>> = vec![Vec::new(); graph.values.len()];
            for (j, node) in graph.nodes.iter().enumerate() {
                for v in &node.inputs {
                    readers[v.0 as usize].push(j);
                }
            }
            graph
                .nodes
                .iter()
                .map(|node| {
                    let o = node.outputs[0];
                    let rank = graph.meta(o).shape.len();
                    matches!(&node.op, Op::CachedAttention { backend, .. } if backend != "triton")
                        && rank == 4
                        && !graph.outputs.contains(&o)
                        && matches!(readers[o.0 as usize][..], [r] if matches!(graph.nodes[r].op,
                        Op::Transpose(a, b) if {
                            let (a, b) = (norm_dim(a, rank), norm_dim(b, rank));
                            (a.min(b), a.max(b)) == (1, 2)
                        }))
                })
                .collect()
        };
        // What each node reads: its inputs and those of the nodes deferred into it.
        let mut reads_at: Vec<Vec<usize>> =
            graph.nodes.iter().map(|nd| nd.inputs.iter().map(|v| v.0 as usize).collect()).collect();
        for (i, d) in deferred_to.iter().enumerate() {
            if let Some(j) = *d {
                let extra: Vec<usize> = graph.nodes[i].inputs.iter().map(|v| v.0 as usize).collect();
                reads_at[j].extend(extra);
            }
        }

        // Liveness: last node reading each value; views keep their source alive; fused adds
        // read their inputs one node later.
        let mut last_use = vec![0usize; graph.values.len()];
        for (i, reads) in reads_at.iter().enumerate() {
            for &v in reads {
                last_use[v] = last_use[v].max(i);
            }
        }
        for o in &graph.outputs {
            last_use[o.0 as usize] = usize::MAX;
        }
        for node in graph.nodes.iter().rev() {
            if may_alias(&node.op) {
                let (src, dst) = (node.inputs[0].0 as usize, node.outputs[0].0 as usize);
                last_use[src] = last_use[src].max(last_use[dst]);
            }
        }
        let mut arena = Arena::default();
        let mut region: Vec<Option<(usize, usize)>> = vec![None; graph.values.len()];
        let mut plan = Vec::with_capacity(n);
        for (i, node) in graph.nodes.iter().enumerate() {
            let bytes = bytes_of(node.outputs[0])?;
            let out = arena.alloc(bytes);
            region[node.outputs[0].0 as usize] = Some((out, bytes));
            let scratch_sizes = scratch_bytes(graph, node, &max_bind)?;
            let scratch: Vec<usize> = scratch_sizes.iter().map(|&b| arena.alloc(b)).collect();
            for (&at, &b) in scratch.iter().zip(&scratch_sizes) {
                arena.release(at, b);
            }
            plan.push(Planned { out, scratch });
            let mut dead = reads_at[i].clone();
            dead.push(node.outputs[0].0 as usize);
            dead.sort_unstable();
            dead.dedup();
            for v in dead {
                if last_use[v] <= i {
                    if let Some((at, b)) = region[v].take() {
                        arena.release(at, b);
                    }
                }
            }
        }
        // Before anything large is allocated: weights, activations and the KV cache against
        // what the device has free.
        memory::Footprint::of(graph, opts, arena.top)?.check(&gpu)?;

        // Weights at the graph's dtypes.
        let (params, param_ptr) = weights::upload(&gpu, graph)?;

        let arena_buf = gpu.alloc(arena.top, "activations (planned for the largest step)").map_err(gpu_err)?;
        tracing::info!(
            arena_mib = arena.top >> 20,
            max_tokens,
            "planned activation memory for {} nodes",
            graph.nodes.len()
        );

        // The KV cache: every page the runtime may hand out, plus one scratch page.
        let spec = autodeploy_core::kvcache::CacheSpec::of(graph)?;
        let page_size = opts.page_size.max(1);
        let mut kv_pages = opts.kv_pages;
        let mut cache = Vec::new();
        if let Some(spec) = &spec {
            let cache_dt = autodeploy_core::pipeline::cache_dtype(graph);
            if let Some(ratio) = opts.free_mem_ratio {
                // What is free now, less a reserve for what is still to come (step buffers,
                // cuBLAS's workspace, CUDA graphs): `ratio` of the rest, in whole pages.
                let (free, total) = gpu.mem_info();
                let per_page = spec.bytes_per_page(page_size, cache_dt.size_in_bytes());
                let usable = (free.saturating_sub(memory::RESERVE as usize) as f64 * ratio) as usize;
                let pages = (usable / per_page.max(1)).saturating_sub(1);
                if pages < opts.min_kv_pages.max(1) {
                    return Err(Error::Msg(format!(
                        "free_mem_ratio = {ratio}: {:.2} GiB of {:.2} GiB are free after the weights and activations, room for {pages} KV-cache pages of {page_size} tokens; one sequence of the longest length needs {} (raise free_mem_ratio, lower max_seq_len or max_num_tokens)",
                        free as f64 / (1u64 << 30) as f64,
                        total as f64 / (1u64 << 30) as f64,
                        opts.min_kv_pages
                    )));
                }
                tracing::info!(
                    free_gib = free as f64 / (1u64 << 30) as f64,
                    ratio,
                    pages,
                    "sizing the KV cache from free memory"
                );
                kv_pages = pages;
            }
            let total: usize = spec
                .layers
                .iter()
                .map(|l| 2 * (kv_pages + 1) * page_size * l.kv_heads * l.head_dim * cache_dt.size_in_bytes())
                .sum();
            tracing::info!(
                layers = spec.layers.len(),
                pages = kv_pages,
                page_size,
                gib = total as f64 / (1u64 << 30) as f64,
                "allocating the KV cache"
            );
            for (i, l) in spec.layers.iter().enumerate() {
                let bytes = (kv_pages + 1) * page_size * l.kv_heads * l.head_dim * cache_dt.size_in_bytes();
                let what = format!(
                    "the KV cache (layer {i} of {}; {} pages of {page_size} tokens, {:.2} GiB in all)",
                    spec.layers.len(),
                    kv_pages + 1,
                    total as f64 / (1u64 << 30) as f64
                );
                let k = gpu.alloc(bytes, &what).map_err(gpu_err)?;
                let v = gpu.alloc(bytes, &what).map_err(gpu_err)?;
                cache.push(Layer { k, v, kv_heads: l.kv_heads, head_dim: l.head_dim });
            }
        }
        let slots =
            graph.nodes.iter().any(|n| matches!(&n.op, Op::CachedAttention { backend, .. } if backend == "triton"));
        let slot_pages = slots.then(|| {
            let max_len = graph.symbols.get("seq_len").or_else(|| graph.symbols.get("seq")).map(|r| r.max).unwrap_or(1);
            max_len.div_ceil(page_size)
        });
        // Split-KV decode for steps of up to 256 tokens (decode batches, short prefills).
        let max_len = graph.symbols.get("seq_len").or_else(|| graph.symbols.get("seq")).map(|r| r.max).unwrap_or(1);
        let split_tokens = max_tokens.min(256);
        let attn_heads = graph
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::CachedAttention { .. }))
            .map(|n| {
                graph.meta(n.inputs[0]).shape[1].as_static().unwrap_or(0)
                    * graph.meta(n.inputs[0]).shape[3].as_static().unwrap_or(0)
            })
            .max();
        let (split, split_early, split_buf) = match attn_heads {
            Some(hd) => {
                let (chunk, splits) = Split::plan(max_len, SPLIT_MIN_CHUNK);
                let (early_chunk, early_splits) = Split::plan(max_len, gpu.split_min_chunk());
                let heads_max = graph
                    .nodes
                    .iter()
                    .filter(|n| matches!(n.op, Op::CachedAttention { .. }))
                    .map(|n| graph.meta(n.inputs[0]).shape[1].as_static().unwrap_or(0))
                    .max()
                    .unwrap_or(0);
                // Partials, then one counter per (token, head) (zeroed at allocation; the kernel
                // leaves them zero).
                let parts = (split_tokens * splits).max(split_tokens.min(SPLIT_EARLY_MAX_TOKENS) * early_splits);
                let bytes = 4 * parts * (hd + 2 * heads_max);
                let buf =
                    gpu.alloc(bytes + 4 * split_tokens * heads_max, "split-KV decode partials").map_err(gpu_err)?;
                let (partial, counters) = (buf.ptr, buf.ptr + bytes as u64);
                (
                    Some(Split { chunk, splits, partial, counters }),
                    Some(Split { chunk: early_chunk, splits: early_splits, partial, counters }),
                    Some(buf),
                )
            }
            None => (None, None, None),
        };
        // Staging: the graph inputs at their largest, then token_seq, token_pos, indptr,
        // seq_start, cached_len (i64, at most one per token + 1), the prefill tiles (two i64 a
        // tile, at most one tile per token), page indices (i32).
        let mut staging_bytes = 0;
        for &v in &graph.inputs {
            staging_bytes += padded(bytes_of(v)?);
        }
        let pad_pages = opts.cuda_graph_batch_sizes.iter().copied().max().unwrap_or(0);
        staging_bytes += 5 * padded(8 * (max_tokens + 1)) + padded(16 * max_tokens);
        staging_bytes += padded(4 * (kv_pages + pad_pages + 1));
        let staging = gpu.alloc(staging_bytes, "step inputs").map_err(gpu_err)?;
        let argmax_scratch = gpu
            .alloc(8 * (max_tokens + 1) * autodeploy_kernels::cuda::exec::ARGMAX_PARTS, "argmax partials")
            .map_err(gpu_err)?;
        let flags =
            gpu.alloc(IDS_AT as usize + 8 * (max_tokens + 1), "error flags and sampled ids").map_err(gpu_err)?;
        let mut buckets: Vec<usize> =
            opts.cuda_graph_batch_sizes.iter().copied().filter(|&b| b >= 1 && b <= max_tokens).collect();
        buckets.sort_unstable();
        buckets.dedup();
        Ok(CudaModel {
            gpu,
            graph: graph.clone(),
            mode,
            _params: params,
            param_ptr,
            arena: arena_buf,
            plan,
            deferred_to,
            deferred_into,
            attn_tokens_major,
            slot_pages,
            split,
            split_early,
            split_tokens,
            _split_buf: split_buf,
            cache,
            page_size,
            kv_pages,
            staging,
            flags,
            argmax_scratch,
            graphs: HashMap::new(),
            buckets,
            max_tokens,
            profile_on: std::env::var_os("AUTODEPLOY_PROFILE").is_some(),
            skip_ops: std::env::var("AUTODEPLOY_PROFILE_SKIP")
                .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
                .unwrap_or_default(),
            profile: Default::default(),
            debug_checks,
        })
    }

    /// Logits rows a cached step asks for: the size of its gather input.
    fn gather_rows(&self, inputs: &[Tensor]) -> usize {
        let gather = crate::transforms::kvcache::GATHER_INPUT;
        self.graph
            .inputs
            .iter()
            .zip(inputs)
            .find(|(&v, _)| self.graph.value(v).name == gather)
            .map_or(0, |(_, t)| t.numel())
    }

    pub fn device_name(&self) -> &str {
        &self.gpu.dev.name
    }
}

/// A linear layer: the decode GEMV for one row of bf16 activations (measured on an H200 with
/// kernels/examples/exec_bench: faster than cuBLAS there, except for a very wide, shallow
/// matrix such as a small model's LM head), else cuBLAS.
#[allow(clippy::too_many_arguments)]
fn linear(
    gpu: &Gpu,
    d: Dt,
    m: usize,
    n: usize,
    k: usize,
    x: Ptr,
    w: Ptr,
    y: Ptr,
    acc: bool,
) -> std::result::Result<(), Unavailable> {
    if m == 1 && (k >= 2048 || n <= 32768) && gpu.gemv(d, m, n, k, x, w, y, acc)? {
        return Ok(());
    }
    gpu.linear(d, m, n, k, x, w, y, acc)
}

/// Scratch regions a node needs besides its output, at the largest shapes.
fn scratch_bytes(g: &Graph, node: &autodeploy_core::ir::Node, bind: &Bindings) -> Result<Vec<usize>> {
    Ok(match node.op {
        Op::SwiGluMlp { fused } => {
            let x = g.meta(node.inputs[0]);
            let xs = eval_shape(&x.shape, bind)?;
            let m: usize = xs[..xs.len() - 1].iter().product();
            let wd = g.meta(node.inputs[node.inputs.len() - 1]);
            let inter = wd.shape[1].as_static().unwrap_or(0);
            let e = x.dtype.size_in_bytes();
            if fused {
                vec![m * 2 * inter * e, m * inter * e]
            } else {
                vec![m * inter * e, m * inter * e, m * inter * e]
            }
        }
        _ => vec![],
    })
}

/// Where a step's inputs landed on the device.
struct Staged {
    meta: Option<StepMeta>,
    input_ptrs: Vec<Ptr>,
    /// Sequences in the step (rows of logits wanted), before padding.
    rows: usize,
}

impl CudaModel {
    /// Packs the graph inputs and the step's metadata (CSR page table) into one upload.
    /// `pad_to` adds one-token sequences on the scratch page up to that many sequences.
    fn stage(
        &self,
        inputs: &[Tensor],
        step: Option<&StepContext>,
        pad_to: Option<usize>,
    ) -> Result<(Staged, Vec<Tensor>)> {
        let mut inputs: Vec<Tensor> = inputs.to_vec();
        let rows = self.gather_rows(&inputs);
        let mut host = Vec::new();
        let mut offsets = Vec::new();
        let push = |host: &mut Vec<u8>, b: &[u8]| -> usize {
            let at = host.len();
            host.extend_from_slice(b);
            host.resize(at + padded(b.len()), 0);
            at
        };
        let mut meta_host = None;
        if let Some(cx) = step {
            let plan = cx.plan;
            let (mut seq, mut pos) = (
                plan.token_seq.iter().map(|&s| s as i64).collect::<Vec<_>>(),
                plan.token_pos.iter().map(|&p| p as i64).collect::<Vec<_>>(),
            );
            let mut indptr = vec![0i64];
            let mut indices: Vec<i32> = Vec::new();
            if let Some(n) = self.slot_pages {
                for (i, pt) in plan.page_tables.iter().enumerate() {
                    let run = pt.len() >= n
                        && (pt[0] as usize).is_multiple_of(n)
                        && pt.iter().enumerate().all(|(j, &p)| p == pt[0] + j as u32);
                    if !run {
                        return Err(Error::Msg(format!(
                            "attn_backend `triton` keeps each sequence in one slot of {n} consecutive pages, but sequence {i}'s pages are {pt:?} (the runtime must reserve slots: kv_pages_per_sequence)"
                        )));
                    }
                }
            }
            for pt in &plan.page_tables {
                indices.extend(pt.iter().map(|&p| p as i32));
                indptr.push(indices.len() as i64);
            }
            if let Some(b) = pad_to {
                let (s0, t0) = (plan.page_tables.len(), seq.len());
                for k in 0..b.saturating_sub(s0) {
                    seq.push((s0 + k) as i64);
                    pos.push(0);
                    indices.push(self.kv_pages as i32);
                    indptr.push(indices.len() as i64);
                }
                // The graph inputs grow the same way: token 0 at position 0, its own logits row.
                let extra = b.saturating_sub(t0);
                for (i, &v) in self.graph.inputs.iter().enumerate() {
                    let name = &self.graph.value(v).name;
                    let mut vals = inputs[i].to_i64().into_owned();
                    match name.as_str() {
                        "input_ids" | "position_ids" => vals.extend(std::iter::repeat_n(0, extra)),
                        _ => vals.extend((t0..t0 + extra).map(|t| t as i64)),
                    }
                    let mut shape = inputs[i].shape().to_vec();
                    *shape.last_mut().expect("rank >= 1") += extra;
                    inputs[i] = Tensor::from_i64(shape, vals)?;
                }
            }
            meta_host = Some((seq, pos, indptr, indices));
        }
        for t in &inputs {
            offsets.push(push(&mut host, host_bytes(t)?));
        }
        let mut meta = None;
        if let Some((seq, pos, indptr, indices)) = meta_host {
            // Per sequence: its first token in the step and that token's position.
            let nseq = indptr.len() - 1;
            let (mut start, mut cached) = (vec![-1i64; nseq], vec![0i64; nseq]);
            for (t, (&sq, &ps)) in seq.iter().zip(&pos).enumerate() {
                if start[sq as usize] < 0 {
                    start[sq as usize] = t as i64;
                    cached[sq as usize] = ps;
                }
            }
            let b = |v: &[i64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
            let (a, p, ip) = (push(&mut host, &b(&seq)), push(&mut host, &b(&pos)), push(&mut host, &b(&indptr)));
            let (ss, cl) = (push(&mut host, &b(&start)), push(&mut host, &b(&cached)));
            let tiles = plan_tiles(&seq, &pos, nseq);
            let tl = push(&mut host, &b(&tiles));
            // Last: the only array whose length varies between steps of one batch size.
            let ix: Vec<u8> = indices.iter().flat_map(|x| x.to_le_bytes()).collect();
            let ii = push(&mut host, &ix);
            let base = self.staging.ptr;
            meta = Some(StepMeta {
                tokens: seq.len(),
                page_size: self.page_size,
                token_seq: base + a as u64,
                token_pos: base + p as u64,
                page_indptr: base + ip as u64,
                page_indices: base + ii as u64,
                seq_start: base + ss as u64,
                cached_len: base + cl as u64,
                tiles: base + tl as u64,
                tile_slots: tiles.len() / 2,
            });
        }
        if host.len() > self.staging.bytes() {
            return Err(Error::Msg(format!(
                "this step's inputs take {} bytes, more than the {} planned for the largest step",
                host.len(),
                self.staging.bytes()
            )));
        }
        self.gpu.upload(self.staging.ptr, &host).map_err(gpu_err)?;
        let input_ptrs = offsets.iter().map(|&o| self.staging.ptr + o as u64).collect();
        Ok((Staged { meta, input_ptrs, rows }, inputs))
    }

    /// Queues every node's kernels for inputs of these shapes (nothing is read back).
    fn enqueue(&self, bind: &Bindings, staged: &Staged, capturing: bool) -> Result<(Ptr, Vec<usize>)> {
        let g = &self.graph;
        let gpu = &self.gpu;
        let mut ptr: Vec<Ptr> = vec![0; g.values.len()];
        // Strided views: a view op's output is its input's memory read through `lay` strides
        // (None: contiguous), copied to `home` (the view op's planned memory) by the first node
        // that reads it as contiguous memory.
        let mut lay: Vec<Option<Vec<i64>>> = vec![None; g.values.len()];
        let mut home: Vec<Ptr> = vec![0; g.values.len()];
        for (&v, &p) in g.inputs.iter().zip(&staged.input_ptrs) {
            ptr[v.0 as usize] = p;
        }
        for (&v, &p) in &self.param_ptr {
            ptr[v] = p;
        }
        gpu.memset(self.flags.ptr, 64).map_err(gpu_err)?;
        let shape_of = |v: autodeploy_core::ValueId| eval_shape(&g.meta(v).shape, bind);
        let dt_of = |v: autodeploy_core::ValueId| dt(g.meta(v).dtype, &g.value(v).name);
        let base = self.arena.ptr;
        // Per-op times (synchronising after every node) when profiling and not capturing.
        let profiling = self.profile_on && !capturing;
        for (i, node) in g.nodes.iter().enumerate() {
            if self.deferred_to[i].is_some() {
                continue;
            }
            if !self.skip_ops.is_empty() && self.skip_ops.iter().any(|s| s == node.op.name()) {
                // Timing only: the node (and what was deferred into it) is not run; its output
                // is whatever its planned memory holds.
                for j in (0..i).filter(|&j| self.deferred_to[j] == Some(i)).chain([i]) {
                    ptr[g.nodes[j].outputs[0].0 as usize] = base + self.plan[j].out as u64;
                }
                continue;
            }
            let outv = node.outputs[0];
            let name = &g.value(outv).name;
            let out_shape = shape_of(outv)?;
            let odt = dt_of(outv)?;
            let n_out: usize = out_shape.iter().product();
            let planned = base + self.plan[i].out as u64;
            // What may stay strided: a view op's input; the q, k (through their deferred RoPEs)
            // and v of a cached attention whose RoPE + KV write kernel reads them in place.
            let attn_strided = matches!(node.op, Op::CachedAttention { .. }) && self.attn_reads_strided(i, staged);
            let strided_ok = |v: autodeploy_core::ValueId| match &node.op {
                Op::View(_) | Op::Reshape(_) | Op::Unsqueeze(_) | Op::Transpose(..) | Op::Slice { .. } => true,
                Op::ToDtype(_) => g.meta(v).dtype == g.meta(outv).dtype,
                Op::CachedAttention { .. } if attn_strided => {
                    v == node.inputs[2] || self.deferred_into[i].iter().any(|&r| g.nodes[r].inputs[0] == v)
                }
                _ => false,
            };
            let reads = node.inputs.iter().chain(self.deferred_into[i].iter().flat_map(|&r| &g.nodes[r].inputs));
            for &v in reads {
                let vi = v.0 as usize;
                if lay[vi].is_none() || strided_ok(v) {
                    continue;
                }
                let (xs, xdt) = (shape_of(v)?, dt_of(v)?);
                let st = lay[vi].take().unwrap_or_default();
                let to = home[vi];
                if to == 0 {
                    return Err(Error::Op {
                        op: node.op.name().into(),
                        msg: format!(
                            "node `{name}`: input `{}` is strided with no memory to copy it to",
                            g.value(v).name
                        ),
                    });
                }
                copy_contiguous(gpu, ptr[vi], xdt, &xs, &st, to).map_err(|e| Error::Op {
                    op: node.op.name().into(),
                    msg: format!("node `{name}`: copying input `{}` to contiguous memory: {}", g.value(v).name, e.0),
                })?;
                ptr[vi] = to;
            }
            let mut out_lay: Option<Vec<i64>> = None;
            let scratch = |k: usize| base + self.plan[i].scratch[k] as u64;
            let inp = |k: usize| ptr[node.inputs[k].0 as usize];
            let in_lay = |k: usize| lay[node.inputs[k].0 as usize].as_deref();
            let in_shape = |k: usize| shape_of(node.inputs[k]);
            let in_dt = |k: usize| dt_of(node.inputs[k]);
            let fail = |e: Unavailable| Error::Op { op: node.op.name().into(), msg: format!("node `{name}`: {}", e.0) };
            let mut out = planned;
            let mut also: Option<(usize, Ptr)> = None;
            let t0 = profiling.then(std::time::Instant::now);
            match &node.op {
                Op::Embedding => {
                    let ws = in_shape(0)?;
                    let row_bytes = ws[1] * in_dt(0)?.size();
                    gpu.embedding(
                        inp(0),
                        inp(1),
                        planned,
                        n_out / ws[1].max(1),
                        row_bytes,
                        ws[0],
                        self.flags.ptr + FLAG_EMBEDDING,
                    )
                    .map_err(fail)?;
                }
                Op::Linear => {
                    let ws = in_shape(1)?;
                    let (nn, k) = (ws[0], ws[1]);
                    let m = n_out / nn.max(1);
                    let wdt = in_dt(1)?;
                    if in_dt(0)? != wdt || odt != wdt {
                        return Err(fail(Unavailable(format!(
                            "x, weight and output dtypes differ ({:?}, {wdt:?}, {odt:?})",
                            in_dt(0)?
                        ))));
                    }
                    if node.inputs.len() > 2 {
                        // y starts as the bias on every row; the GEMM adds x·wᵀ in f32 and rounds once.
                        let s = Strided::new(&[m, nn], &[0, 1], &[0, 0]).map_err(fail)?;
                        gpu.copy_strided(inp(2), in_dt(2)?, planned, odt, m * nn, s, false).map_err(fail)?;
                    }
                    linear(gpu, odt, m, nn, k, inp(0), inp(1), planned, node.inputs.len() > 2).map_err(fail)?;
                }
                Op::Add | Op::Sub | Op::Mul | Op::Div => {
                    let op = match node.op {
                        Op::Add => Binary::Add,
                        Op::Sub => Binary::Sub,
                        Op::Mul => Binary::Mul,
                        _ => Binary::Div,
                    };
                    let (a, b) = (in_shape(0)?, in_shape(1)?);
                    let s = Strided::new(
                        &out_shape,
                        &broadcast_strides(&a, &out_shape),
                        &broadcast_strides(&b, &out_shape),
                    )
                    .map_err(fail)?;
                    gpu.binary(op, (inp(0), in_dt(0)?), (inp(1), in_dt(1)?), (planned, odt), n_out, s).map_err(fail)?;
                }
                Op::AddScalar(s) | Op::MulScalar(s) | Op::PowScalar(s) => {
                    let op = match node.op {
                        Op::AddScalar(_) => Unary::AddScalar,
                        Op::MulScalar(_) => Unary::MulScalar,
                        _ => Unary::PowScalar,
                    };
                    gpu.unary(op, inp(0), planned, odt, n_out, *s).map_err(fail)?;
                }
                Op::Neg | Op::Rsqrt | Op::Silu | Op::Cos | Op::Sin => {
                    let op = match node.op {
                        Op::Neg => Unary::Neg,
                        Op::Rsqrt => Unary::Rsqrt,
                        Op::Silu => Unary::Silu,
                        Op::Cos => Unary::Cos,
                        _ => Unary::Sin,
                    };
                    gpu.unary(op, inp(0), planned, odt, n_out, 0.0).map_err(fail)?;
                }
                Op::Mean { .. } => {
                    let xs = in_shape(0)?;
                    let last = *xs.last().unwrap_or(&1);
                    gpu.mean_last(inp(0), in_dt(0)?, planned, odt, n_out, last).map_err(fail)?;
                }
                Op::ToDtype(_) => {
                    if in_dt(0)? == odt {
                        out = inp(0);
                        out_lay = in_lay(0).map(<[i64]>::to_vec);
                    } else {
                        let s = Strided::new(&[n_out], &[1], &[0]).map_err(fail)?;
                        gpu.copy_strided(inp(0), in_dt(0)?, planned, odt, n_out, s, false).map_err(fail)?;
                    }
                }
                Op::View(_) | Op::Reshape(_) | Op::Unsqueeze(_) => {
                    out = inp(0);
                    if let Some(st) = in_lay(0) {
                        let xs = in_shape(0)?;
                        match view_strides(&xs, st, &out_shape) {
                            Some(os) => out_lay = (!is_contiguous(&out_shape, &os)).then_some(os),
                            None => {
                                // No strides say it: the input copied here, contiguous.
                                copy_contiguous(gpu, inp(0), odt, &xs, st, planned).map_err(fail)?;
                                out = planned;
                            }
                        }
                    }
                }
                Op::Expand(_) => {
                    let xs = in_shape(0)?;
                    let s = Strided::new(&out_shape, &broadcast_strides(&xs, &out_shape), &vec![0; out_shape.len()])
                        .map_err(fail)?;
                    gpu.copy_strided(inp(0), in_dt(0)?, planned, odt, n_out, s, false).map_err(fail)?;
                }
                Op::Transpose(a, b) => {
                    let xs = in_shape(0)?;
                    let (a, b) = (norm_dim(*a, xs.len()), norm_dim(*b, xs.len()));
                    let mut st = in_lay(0).map_or_else(|| contiguous_strides(&xs), <[i64]>::to_vec);
                    st.swap(a, b);
                    out = inp(0);
                    out_lay = (!is_contiguous(&out_shape, &st)).then_some(st);
                }
                Op::Slice { dim, start, step, .. } => {
                    let xs = in_shape(0)?;
                    let d = norm_dim(*dim, xs.len());
                    let s0 =
                        if *start < 0 { (*start + xs[d] as i64).max(0) } else { (*start).min(xs[d] as i64) } as usize;
                    let mut st = in_lay(0).map_or_else(|| contiguous_strides(&xs), <[i64]>::to_vec);
                    let off = s0 as i64 * st[d];
                    st[d] *= *step;
                    out = inp(0) + (off * odt.size() as i64) as u64;
                    out_lay = (!is_contiguous(&out_shape, &st)).then_some(st);
                }
                Op::Cat { dim } => {
                    let d = norm_dim(*dim, out_shape.len());
                    let ost = contiguous_strides(&out_shape);
                    let mut at = 0usize;
                    for k in 0..node.inputs.len() {
                        let xs = in_shape(k)?;
                        let s = Strided::new(&xs, &contiguous_strides(&xs), &ost).map_err(fail)?;
                        let dst = planned + (at as i64 * ost[d]) as u64 * odt.size() as u64;
                        gpu.copy_strided(inp(k), in_dt(k)?, dst, odt, xs.iter().product(), s, true).map_err(fail)?;
                        at += xs[d];
                    }
                }
                Op::RmsNorm { eps, norm_dtype } => {
                    let xs = in_shape(0)?;
                    let last = *xs.last().unwrap_or(&1);
                    let norm_dt = dt(*norm_dtype, name)?;
                    let (x, residual) = if i > 0 && self.deferred_to[i - 1] == Some(i) {
                        let add = &g.nodes[i - 1];
                        let res_out = base + self.plan[i - 1].out as u64;
                        also = Some((add.outputs[0].0 as usize, res_out));
                        (ptr[add.inputs[0].0 as usize], Some((ptr[add.inputs[1].0 as usize], res_out)))
                    } else {
                        (inp(0), None)
                    };
                    gpu.rmsnorm(
                        (x, in_dt(0)?),
                        residual,
                        (inp(1), in_dt(1)?),
                        (planned, odt),
                        norm_dt,
                        n_out / last.max(1),
                        last,
                        *eps as f32,
                    )
                    .map_err(fail)?;
                }
                Op::Rope { .. } => {
                    let xs = in_shape(0)?;
                    let (cs, ss) = (in_shape(1)?, in_shape(2)?);
                    let d = *xs.last().unwrap_or(&1);
                    let t = if xs.len() >= 2 { xs[xs.len() - 2] } else { 1 };
                    let table = |s: &[usize]| {
                        s.len() >= 2 && s[s.len() - 2..] == [t, d] && s[..s.len() - 2].iter().all(|&n| n == 1)
                    };
                    if !table(&cs) || !table(&ss) || in_dt(1)? != odt || in_dt(2)? != odt || d % 2 != 0 {
                        return Err(fail(Unavailable(format!(
                            "cos/sin of shapes {cs:?}/{ss:?} are not one [tokens, head_dim] table for x {xs:?}"
                        ))));
                    }
                    gpu.rope(inp(0), odt, inp(1), inp(2), planned, n_out / d, t, d).map_err(fail)?;
                }
                Op::SwiGluMlp { fused } => {
                    let xs = in_shape(0)?;
                    let k = *xs.last().unwrap_or(&1);
                    let m = n_out / out_shape.last().copied().unwrap_or(1).max(1);
                    let wd = in_shape(node.inputs.len() - 1)?;
                    let (hidden, inter) = (wd[0], wd[1]);
                    if in_dt(0)? != odt || (1..node.inputs.len()).any(|j| in_dt(j).ok() != Some(odt)) {
                        return Err(fail(Unavailable("x and the weights must share one dtype".into())));
                    }
                    if *fused {
                        // With fusion on, a single row's activation is the gate/up GEMV's epilogue.
                        let fused_act = self.mode.fuse
                            && gpu.gemv_swiglu(odt, m, inter, k, inp(0), inp(1), scratch(1)).map_err(fail)?;
                        if !fused_act {
                            linear(gpu, odt, m, 2 * inter, k, inp(0), inp(1), scratch(0), false).map_err(fail)?;
                            gpu.silu_mul(scratch(0), None, odt, scratch(1), m, inter).map_err(fail)?;
                        }
                        linear(gpu, odt, m, hidden, inter, scratch(1), inp(2), planned, false).map_err(fail)?;
                    } else {
                        linear(gpu, odt, m, inter, k, inp(0), inp(1), scratch(0), false).map_err(fail)?;
                        linear(gpu, odt, m, inter, k, inp(0), inp(2), scratch(1), false).map_err(fail)?;
                        gpu.silu_mul(scratch(0), Some(scratch(1)), odt, scratch(2), m, inter).map_err(fail)?;
                        linear(gpu, odt, m, hidden, inter, scratch(2), inp(3), planned, false).map_err(fail)?;
                    }
                }
                Op::IndexSelect { dim } => {
                    let xs = in_shape(0)?;
                    let d = norm_dim(*dim, xs.len());
                    let outer: usize = xs[..d].iter().product();
                    let inner: usize = xs[d + 1..].iter().product();
                    let nidx = in_shape(1)?.iter().product();
                    gpu.index_select(
                        inp(0),
                        inp(1),
                        planned,
                        outer,
                        nidx,
                        xs[d],
                        inner * odt.size(),
                        self.flags.ptr + FLAG_GATHER,
                    )
                    .map_err(fail)?;
                }
                Op::CachedAttention { layer, scale, .. } => {
                    let meta = staged.meta.as_ref().ok_or_else(|| {
                        Error::Msg("this graph has cached attention: forward needs a step context".into())
                    })?;
                    let l = &self.cache[*layer];
                    let qs = in_shape(0)?;
                    let heads = qs[1];
                    if self.slot_pages.is_some() {
                        gpu.slot_attention(
                            odt,
                            (inp(0), inp(1), inp(2)),
                            (l.k.ptr, l.v.ptr),
                            planned,
                            meta,
                            heads,
                            l.kv_heads,
                            l.head_dim,
                            *scale as f32,
                        )
                        .map_err(fail)?;
                    } else {
                        let ropes = &self.deferred_into[i];
                        let p = |v: autodeploy_core::ValueId| ptr[v.0 as usize];
                        // Where the step's token rows of an operand lie (strided: `attn_strided`).
                        let rows = |v: autodeploy_core::ValueId| -> Result<HeadRows> {
                            head_rows(&shape_of(v)?, lay[v.0 as usize].as_deref()).ok_or_else(|| {
                                fail(Unavailable(format!("`{}` has no contiguous head rows", g.value(v).name)))
                            })
                        };
                        // The split-KV kernels write [tokens, heads, d] when the output is only
                        // transposed to that (the o projection's input then needs no copy).
                        let split_path = self.split.is_some() && meta.tokens <= self.split_tokens;
                        let out_rows = if self.attn_tokens_major[i] && split_path {
                            let st = vec![n_out as i64, l.head_dim as i64, (heads * l.head_dim) as i64, 1];
                            out_lay = (!is_contiguous(&out_shape, &st)).then_some(st);
                            HeadRows::tokens_major(heads, l.head_dim)
                        } else {
                            HeadRows::heads_major(qs[2], l.head_dim)
                        };
                        // q and k may still need their RoPE (deferred to this node): the raw q
                        // and k, and the cos/sin table.
                        let rope = if let [rq, rk] = ropes[..] {
                            let (nq, nk) = (&g.nodes[rq], &g.nodes[rk]);
                            let cs = shape_of(nq.inputs[1])?;
                            let t = qs[2];
                            if cs.len() < 2
                                || cs[cs.len() - 2..] != [t, l.head_dim]
                                || cs[..cs.len() - 2].iter().any(|&x| x != 1)
                            {
                                return Err(fail(Unavailable(format!(
                                    "cos/sin {cs:?} are not one [tokens, head_dim] table"
                                ))));
                            }
                            let qkv_rows = [rows(nq.inputs[0])?, rows(nk.inputs[0])?, rows(node.inputs[2])?];
                            Some((rq, p(nq.inputs[0]), p(nk.inputs[0]), (p(nq.inputs[1]), p(nq.inputs[2])), qkv_rows))
                        } else {
                            None
                        };
                        match (self.split, self.split_early) {
                            // A few decode tokens: one kernel rotates, writes the cache and attends.
                            (_, Some(split)) if meta.tokens <= self.split_tokens.min(SPLIT_EARLY_MAX_TOKENS) => {
                                let (q, k) = rope.map_or((inp(0), inp(1)), |(_, q, k, _, _)| (q, k));
                                gpu.paged_decode_split_fused(
                                    odt,
                                    (q, k, inp(2)),
                                    rope.map(|r| r.3),
                                    (l.k.ptr, l.v.ptr),
                                    (planned, out_rows),
                                    meta,
                                    heads,
                                    l.kv_heads,
                                    l.head_dim,
                                    *scale as f32,
                                    split,
                                )
                                .map_err(fail)?
                            }
                            (split, _) => {
                                let q = if let Some((rq, q, k, (cos, sin), qkv_rows)) = rope {
                                    // One kernel rotates q into rq's region and writes rotated k
                                    // and v into the cache, reading q/k/v where they lie.
                                    let q_out = base + self.plan[rq].out as u64;
                                    gpu.rope_write_kv(
                                        odt,
                                        (q, k, inp(2)),
                                        qkv_rows,
                                        cos,
                                        sin,
                                        q_out,
                                        (l.k.ptr, l.v.ptr),
                                        meta,
                                        heads,
                                        l.kv_heads,
                                        l.head_dim,
                                    )
                                    .map_err(fail)?;
                                    q_out
                                } else {
                                    gpu.write_kv(odt, inp(1), inp(2), l.k.ptr, l.v.ptr, meta, l.kv_heads, l.head_dim)
                                        .map_err(fail)?;
                                    inp(0)
                                };
                                let cache = (l.k.ptr, l.v.ptr);
                                let (kvh, d, sc) = (l.kv_heads, l.head_dim, *scale as f32);
                                match split {
                                    Some(split) if meta.tokens <= self.split_tokens => gpu
                                        .paged_decode_split(
                                            odt,
                                            q,
                                            cache,
                                            (planned, out_rows),
                                            meta,
                                            heads,
                                            kvh,
                                            d,
                                            sc,
                                            split,
                                        )
                                        .map_err(fail)?,
                                    _ => gpu
                                        .paged_attention(odt, q, cache.0, cache.1, planned, meta, heads, kvh, d, sc)
                                        .map_err(fail)?,
                                }
                            }
                        }
                    }
                }
                Op::Custom { name: op_name, attrs, .. } => {
                    let c = autodeploy_core::registry::custom_op(op_name)
                        .ok_or_else(|| fail(Unavailable("no op of this name is registered".into())))?;
                    let cuda = c.cuda.clone().ok_or_else(|| fail(Unavailable("no CUDA kernel registered".into())))?;
                    let device = |v: autodeploy_core::ValueId| -> Result<DeviceTensor> {
                        Ok(DeviceTensor { ptr: ptr[v.0 as usize], shape: shape_of(v)?, dtype: g.meta(v).dtype })
                    };
                    let ins = node.inputs.iter().map(|&v| device(v)).collect::<Result<Vec<_>>>()?;
                    let out_t = DeviceTensor { ptr: planned, shape: out_shape.clone(), dtype: g.meta(outv).dtype };
                    let mut launcher = SourceLauncher { gpu, what: format!("plugin op `{op_name}` ({})", c.origin) };
                    let n_out: usize = out_shape.iter().product();
                    if self.debug_checks {
                        mark_unwritten(gpu, planned, g.meta(outv).dtype, n_out)?;
                    }
                    cuda(&ins, &out_t, attrs, &mut launcher).map_err(|e| Error::Op {
                        op: op_name.to_string(),
                        msg: format!("node `{name}`: {e} (from {})", c.origin),
                    })?;
                    if self.debug_checks {
                        let vals = read_back(gpu, planned, g.meta(outv).dtype, n_out)?;
                        autodeploy_core::custom_op::check_output(
                            &format!("op `{op_name}` ({}) at node `{name}`", c.origin),
                            &vals,
                        )?;
                    }
                }
                op => {
                    return Err(Error::Op {
                        op: op.name().into(),
                        msg: format!("node `{name}`: no CUDA implementation"),
                    })
                }
            }
            if let Some(t0) = t0 {
                gpu.sync().map_err(gpu_err)?;
                let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
                let e = p.entry(node.op.name()).or_default();
                e.0 += 1;
                e.1 += t0.elapsed();
            }
            ptr[outv.0 as usize] = out;
            // (A strided output in the node's own memory, the attention's, has nowhere to go.)
            home[outv.0 as usize] = if out_lay.is_some() && out != planned { planned } else { 0 };
            lay[outv.0 as usize] = out_lay;
            if let Some((v, p)) = also {
                ptr[v] = p;
            }
        }
        let o = g.outputs[0];
        if let Some(st) = &lay[o.0 as usize] {
            // A strided view as the output: made contiguous in its view op's memory.
            let xs = shape_of(o)?;
            copy_contiguous(gpu, ptr[o.0 as usize], dt_of(o)?, &xs, st, home[o.0 as usize]).map_err(gpu_err)?;
            return Ok((home[o.0 as usize], xs));
        }
        Ok((ptr[o.0 as usize], shape_of(o)?))
    }

    /// Whether cached attention node `i` reads this step's q, k, v in place (strided): its
    /// RoPEs were deferred into it and its kernels are the RoPE + KV write kernel's (not the
    /// `triton` slots' nor the split-KV latency build's, which read `[heads, tokens, d]`).
    fn attn_reads_strided(&self, i: usize, staged: &Staged) -> bool {
        let tokens = staged.meta.as_ref().map_or(usize::MAX, |m| m.tokens);
        let early = self.split_early.is_some() && tokens <= self.split_tokens.min(SPLIT_EARLY_MAX_TOKENS);
        self.slot_pages.is_none() && self.deferred_into[i].len() == 2 && !early
    }

    fn note(&self, what: &'static str, d: std::time::Duration) {
        let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(what).or_default();
        e.0 += 1;
        e.1 += d;
    }

    fn check_flags(&self) -> Result<()> {
        let mut f = [0u8; 16];
        self.gpu.download(self.flags.ptr, &mut f).map_err(gpu_err)?;
        self.flags_ok(&f)
    }

    /// The kernels' error flags (the first 16 bytes of the flags buffer) as an error.
    fn flags_ok(&self, f: &[u8]) -> Result<()> {
        let emb = i64::from_le_bytes(f[0..8].try_into().expect("8 bytes"));
        let gat = i64::from_le_bytes(f[8..16].try_into().expect("8 bytes"));
        if emb != 0 {
            return Err(Error::op(
                "aten.embedding",
                format!("token id {} is out of range for the vocabulary", emb - 1),
            ));
        }
        if gat != 0 {
            return Err(Error::op("aten.index_select", format!("index {} is out of range", gat - 1)));
        }
        Ok(())
    }

    /// The bucket a decode step of `rows` sequences replays, if graphs are on and it fits.
    fn bucket(&self, step: Option<&StepContext>, rows: usize) -> Option<usize> {
        let cx = step?;
        if !self.mode.graphs || cx.plan.token_seq.len() != cx.plan.page_tables.len() {
            return None;
        }
        self.buckets.iter().copied().find(|&b| b >= rows)
    }

    /// Runs a step; the result's device address, shape and dtype are those of the graph output.
    fn run(&mut self, inputs: &[Tensor], step: Option<&StepContext>) -> Result<(Ptr, Vec<usize>, usize)> {
        let rows = self.gather_rows(inputs);
        let bucket = self.bucket(step, rows);
        let (staged, inputs) = self.stage(inputs, step, bucket)?;
        let bind = super::simple::bind_inputs(&self.graph, &inputs)?;
        if bind.get("seq").is_some_and(|&t| t > self.max_tokens) {
            return Err(Error::Msg(format!("{} tokens in one step; the plan holds {}", bind["seq"], self.max_tokens)));
        }
        let Some(b) = bucket else {
            let (p, s) = self.enqueue(&bind, &staged, false)?;
            return Ok((p, s, staged.rows));
        };
        if let Some(c) = self.graphs.get(&b) {
            c.graph.launch().map_err(|e| Error::Msg(format!("replaying the CUDA graph of batch {b}: {e:?}")))?;
            autodeploy_kernels::cuda::exec::count_launch("cuda_graph_replay");
            return Ok((c.out.0, c.out.1.clone(), staged.rows));
        }
        // First step of this bucket: run it eagerly (its results are this step's), then capture
        // the same launches for the next ones.
        let (p, s) = self.enqueue(&bind, &staged, false)?;
        self.gpu.sync().map_err(gpu_err)?;
        let stream = self.gpu.stream.clone();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| Error::Msg(format!("starting CUDA graph capture for batch {b}: {e:?}")))?;
        let res = self.enqueue(&bind, &staged, true);
        let graph = stream.end_capture(
            autodeploy_kernels::cuda::cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        let out = res?;
        match graph {
            Ok(Some(graph)) => {
                tracing::info!(batch = b, "captured a CUDA graph for decode");
                autodeploy_kernels::cuda::exec::count_launch("cuda_graph_capture");
                self.graphs.insert(b, Captured { graph, out });
            }
            Ok(None) => return Err(Error::Msg(format!("CUDA graph capture for batch {b} recorded nothing"))),
            Err(e) => return Err(Error::Msg(format!("capturing the CUDA graph of batch {b}: {e:?}"))),
        }
        Ok((p, s, staged.rows))
    }

    /// The first `rows` rows of the output (rows: everything but the last dim; a CUDA-graph
    /// step computes padding rows after them), shaped like the graph's output.
    fn download_rows(&self, p: Ptr, shape: &[usize], rows: usize) -> Result<Tensor> {
        let o = self.graph.outputs[0];
        let dtype = self.graph.meta(o).dtype;
        let width = shape.last().copied().unwrap_or(1);
        let take = rows.min(total_rows(shape));
        let mut bytes = vec![0u8; take * width * dtype.size_in_bytes()];
        self.gpu.download(p, &mut bytes).map_err(gpu_err)?;
        self.check_flags()?;
        let s = if take == total_rows(shape) {
            shape.to_vec()
        } else {
            // Padding rows dropped: [1, .., 1, rows, width].
            let mut s = vec![1; shape.len().saturating_sub(2)];
            s.extend([take, width]);
            s
        };
        Tensor::from_le_bytes(dtype, s, &bytes)
    }
}

/// Rows of an output of this shape: all but its last dim.
fn total_rows(shape: &[usize]) -> usize {
    shape[..shape.len().saturating_sub(1)].iter().product()
}

impl CompiledModel for CudaModel {
    fn forward(&mut self, inputs: &[Tensor], step: Option<&mut StepContext>) -> Result<Vec<Tensor>> {
        let step = step.map(|s| &*s);
        let cached = step.is_some();
        let (p, shape, rows) = self.run(inputs, step)?;
        // Cached graphs give one logits row per gathered token; uncached ones the whole output.
        let rows = if cached { rows } else { total_rows(&shape) };
        Ok(vec![self.download_rows(p, &shape, rows)?])
    }

    fn owns_kv_cache(&self) -> bool {
        true
    }

    fn kv_pages_per_sequence(&self) -> Option<usize> {
        self.slot_pages
    }

    fn kv_pages(&self) -> Option<usize> {
        Some(self.kv_pages)
    }

    fn forward_greedy(&mut self, inputs: &[Tensor], step: Option<&mut StepContext>) -> Result<Option<Vec<i64>>> {
        self.forward_ids(inputs, step, None)
    }

    fn forward_sampled(
        &mut self,
        inputs: &[Tensor],
        step: Option<&mut StepContext>,
        draws: &[RowDraw],
    ) -> Result<Option<Vec<i64>>> {
        self.forward_ids(inputs, step, Some(draws))
    }
}

impl CudaModel {
    /// A step whose tokens are picked on the GPU: the argmax of each gathered row, or with
    /// `draws` each row sampled as its draw says. The ids land right after the error flags, so
    /// one copy back brings both.
    fn forward_ids(
        &mut self,
        inputs: &[Tensor],
        step: Option<&mut StepContext>,
        draws: Option<&[RowDraw]>,
    ) -> Result<Option<Vec<i64>>> {
        let step = step.map(|s| &*s);
        let Some(_) = step else { return Ok(None) };
        let t0 = std::time::Instant::now();
        let (p, shape, rows) = self.run(inputs, step)?;
        let t1 = std::time::Instant::now();
        let o = self.graph.outputs[0];
        let odt = dt(self.graph.meta(o).dtype, "logits")?;
        let vocab = *shape.last().unwrap_or(&1);
        let n = rows.min(total_rows(&shape));
        let ids_at = self.flags.ptr + IDS_AT;
        match draws {
            None => self.gpu.argmax_rows(p, odt, ids_at, n, vocab, self.argmax_scratch.ptr).map_err(gpu_err)?,
            Some(d) => {
                if d.len() != n {
                    return Err(Error::Msg(format!("{} sampling draws for a step of {n} rows", d.len())));
                }
                // The rows' parameters go where the argmax keeps its partials (unused here).
                let params: Vec<u8> = d
                    .iter()
                    .flat_map(|d| {
                        RowSampling {
                            temperature: d.temperature,
                            top_k: d.top_k.min(i32::MAX as usize) as i32,
                            top_p: d.top_p,
                            u: d.u,
                        }
                        .to_le_bytes()
                    })
                    .collect();
                self.gpu.upload(self.argmax_scratch.ptr, &params).map_err(gpu_err)?;
                self.gpu.sample_rows(p, odt, self.argmax_scratch.ptr, ids_at, n, vocab).map_err(gpu_err)?;
            }
        }
        let mut b = vec![0u8; IDS_AT as usize + 8 * n];
        self.gpu.download(self.flags.ptr, &mut b).map_err(gpu_err)?;
        self.flags_ok(&b)?;
        if self.profile_on {
            self.note("step: stage, upload, launch (host)", t1 - t0);
            self.note("step: wait for the GPU, pick tokens, copy ids back", t1.elapsed());
        }
        let ids = &b[IDS_AT as usize..];
        Ok(Some(ids.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()))
    }
}
