//! The graph executor on a CUDA GPU, behind every compile backend when `device = "cuda"`.
//!
//! At compile time it uploads the weights (at the graph's dtypes), allocates the paged KV cache
//! for the runtime's whole page pool, and plans activation memory once: every value gets a
//! region of one arena, sized for the largest shape its symbols allow and reused once the value
//! is dead (views keep what they alias alive). A step then only evaluates shapes, uploads the
//! step's inputs and metadata in one copy, and launches kernels at fixed addresses, which is
//! what lets `cudagraph` capture a decode step once per batch-size bucket and replay it.
//!
//! Mode: `graphs` (`cudagraph`, `opt`) captures decode steps. The fusions `compile` and `opt`
//! run come from the graph (plugins/src/transforms/compile_fusion.rs); this executor only
//! lowers ops.

use std::collections::HashMap;
use std::sync::Arc;

use autodeploy_core::backend::{CompileOptions, CompiledModel};
use autodeploy_core::custom_op::{CustomOp, DeviceTensor, View, ViewIn};
use autodeploy_core::device_attention::{
    DeviceAttention, DeviceAttentionCall, DeviceAttentionSetup, Operand, SourceLauncher,
};
use autodeploy_core::error::{Error, Result};
use autodeploy_core::kvcache::StepContext;
use autodeploy_core::ops::attention::{CachedAttn, CACHED_ATTENTION};
use autodeploy_core::ops::collective::{ALL_GATHER, ALL_REDUCE};
use autodeploy_core::sampling::RowDraw;
use autodeploy_core::shape::{eval_shape, Bindings};
use autodeploy_core::{DType, Graph, Op, Tensor};
use autodeploy_kernels::cuda::cudarc::driver::sys::CUstreamCaptureMode;
use autodeploy_kernels::cuda::exec::{
    decode_prefix_count, plan_tiles, Buffer, Dt, Gpu, HeadRows, Ptr, RowSampling, StepMeta, Strided,
};
use autodeploy_kernels::cuda::Unavailable;

mod graphs;
mod lower;
mod memory;
mod step;
mod strides;
mod weights;
use graphs::Captured;
use memory::{padded, Arena};
use step::{total_rows, Staged};
use strides::{contiguous_strides, head_rows, is_contiguous, norm_dim};
use weights::host_bytes;

/// What the CUDA executor does beyond running nodes in order (fusions are the graph's: the
/// compile-stage transforms, for backends registered with `fuses`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Mode {
    pub graphs: bool,
}

fn gpu_err(e: Unavailable) -> Error {
    Error::Msg(e.0)
}

pub(crate) fn dt(d: DType, what: &str) -> Result<Dt> {
    autodeploy_core::ops::cuda_dt(d).map_err(|e| Error::Msg(format!("{what}: {e}")))
}

/// The op-table entry of each node.
fn table_entries(graph: &Graph) -> Vec<Option<Arc<CustomOp>>> {
    graph.nodes.iter().map(|n| autodeploy_core::registry::custom_op(n.op.name)).collect()
}

/// Why this executor cannot run `op`, if it cannot.
fn unsupported(op: &Op) -> Option<String> {
    use autodeploy_core::ops::attention::{ATTENTION, MATMUL, SDPA};
    let why = match op {
        // Its kernels are its attention backend's (`check_device_attention`).
        Op { name: CACHED_ATTENTION, .. } => return None,
        Op { name: MATMUL | SDPA | ATTENTION, .. } => {
            "uncached attention has no CUDA kernels (the cache_init stage turns matched attention into cached attention)"
        }
        Op { name, attrs } => match autodeploy_core::registry::custom_op(name) {
            Some(c) if c.cuda.is_some() || c.view.is_some() => return c.cuda_attrs.and_then(|check| check(attrs).err()),
            Some(c) if c.origin.starts_with("built-in") => "this op has a CPU kernel only so far",
            _ => "this plugin op has a CPU kernel only: its library registered no CUDA one",
        },
    };
    Some(why.to_string())
}

/// Per node: the regions its output and scratch use (arena offsets), planned once.
struct Planned {
    /// The arena offset of each output, in the node's output order.
    outs: Vec<usize>,
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
    /// Cached attention node i's output is only transposed to `[.., tokens, heads, d]`: a
    /// backend that can write that layout may (the transpose is then a view).
    attn_tokens_major: Vec<bool>,
    /// The attention backends' CUDA sides (one instance per backend the graph names), and for
    /// each node the index of its backend (`usize::MAX`: not a cached attention).
    attn: Vec<(String, Box<dyn DeviceAttention>)>,
    attn_of: Vec<usize>,
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
    /// Each node's op-table entry (views among them may share their input's memory).
    table: Vec<Option<Arc<CustomOp>>>,
    /// Each cached attention node's attributes, read once.
    attn_attrs: Vec<Option<CachedAttn>>,
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
            if let Some(a) = n.op.cached_attention_of() {
                autodeploy_core::registry::check_device_attention(&a.backend)?;
            }
        }
        let gpu = Gpu::open_with(ordinal, &opts.cuda_kernels).map_err(gpu_err)?;
        tracing::info!(gpu = %gpu.dev.name, "compiling for CUDA");
        let collective = |n: &autodeploy_core::ir::Node| [ALL_REDUCE, ALL_GATHER].contains(&n.op.name);
        if graph.nodes.iter().any(collective) {
            let on_nccl = autodeploy_core::comm::gpu::join(&gpu)
                .map_err(|e| Error::Msg(format!("joining the ranks' GPUs: {e}")))?;
            if !on_nccl && mode.graphs {
                tracing::info!("collectives through the host: CUDA graphs off");
                mode.graphs = false;
            }
        }

        // The largest shapes: every symbol at the top of its range.
        let max_bind: Bindings = graph.symbols.iter().map(|(s, r)| (s.clone(), r.max)).collect();
        let max_tokens = max_bind.get("seq").copied().unwrap_or(1);
        let bytes_of = |v: autodeploy_core::ValueId| -> Result<usize> {
            let m = graph.meta(v);
            Ok(eval_shape(&m.shape, &max_bind)?.iter().product::<usize>() * m.dtype.size_in_bytes())
        };

        let n = graph.nodes.len();
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
                    node.op.is(CACHED_ATTENTION)
                        && rank == 4
                        && !graph.outputs.contains(&o)
                        && matches!(readers[o.0 as usize][..], [r] if graph.nodes[r].op.transpose_dims().is_some_and(|(a, b)| {
                            let (a, b) = (norm_dim(a, rank), norm_dim(b, rank));
                            (a.min(b), a.max(b)) == (1, 2)
                        }))
                })
                .collect()
        };
        let reads_at: Vec<Vec<usize>> =
            graph.nodes.iter().map(|nd| nd.inputs.iter().map(|v| v.0 as usize).collect()).collect();

        // Liveness: last node reading each value; views keep their source alive.
        let mut last_use = vec![0usize; graph.values.len()];
        for (i, reads) in reads_at.iter().enumerate() {
            for &v in reads {
                last_use[v] = last_use[v].max(i);
            }
        }
        for o in &graph.outputs {
            last_use[o.0 as usize] = usize::MAX;
        }
        let table = table_entries(graph);
        for (node, entry) in graph.nodes.iter().zip(&table).rev() {
            if entry.as_ref().is_some_and(|c| c.view.is_some()) {
                let (src, dst) = (node.inputs[0].0 as usize, node.outputs[0].0 as usize);
                last_use[src] = last_use[src].max(last_use[dst]);
            }
        }
        let mut arena = Arena::default();
        let mut region: Vec<Option<(usize, usize)>> = vec![None; graph.values.len()];
        let mut plan = Vec::with_capacity(n);
        for (i, node) in graph.nodes.iter().enumerate() {
            let mut outs = Vec::with_capacity(node.outputs.len());
            for &o in &node.outputs {
                let bytes = bytes_of(o)?;
                let at = arena.alloc(bytes);
                region[o.0 as usize] = Some((at, bytes));
                outs.push(at);
            }
            let scratch_sizes = scratch_bytes(graph, node, &max_bind)?;
            let scratch: Vec<usize> = scratch_sizes.iter().map(|&b| arena.alloc(b)).collect();
            for (&at, &b) in scratch.iter().zip(&scratch_sizes) {
                arena.release(at, b);
            }
            plan.push(Planned { outs, scratch });
            let mut dead = reads_at[i].clone();
            dead.extend(node.outputs.iter().map(|o| o.0 as usize));
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
                let per_page = spec.device_bytes_per_page(page_size, cache_dt.size_in_bytes());
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
                .map(|l| {
                    2 * (kv_pages + 1) * page_size * l.kv_heads * l.head_dim * l.device_elem(cache_dt.size_in_bytes())
                })
                .sum();
            tracing::info!(
                layers = spec.layers.len(),
                pages = kv_pages,
                page_size,
                gib = total as f64 / (1u64 << 30) as f64,
                "allocating the KV cache"
            );
            for (i, l) in spec.layers.iter().enumerate() {
                // An FP8 layer's cache: E4M3 codes, one byte a value.
                let bytes =
                    (kv_pages + 1) * page_size * l.kv_heads * l.head_dim * l.device_elem(cache_dt.size_in_bytes());
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
        // The attention backends' CUDA sides, made for this engine.
        let max_len = graph.symbols.get("seq_len").or_else(|| graph.symbols.get("seq")).map(|r| r.max).unwrap_or(1);
        let attn_layers: Vec<(usize, usize, usize)> = cache.iter().map(|l| (0, l.kv_heads, l.head_dim)).collect();
        let mut attn: Vec<(String, Box<dyn DeviceAttention>)> = Vec::new();
        let mut attn_of = vec![usize::MAX; graph.nodes.len()];
        for (i, n) in graph.nodes.iter().enumerate() {
            let Some(CachedAttn { backend, .. }) = n.op.cached_attention_of() else { continue };
            let backend = &backend;
            if let Some(k) = attn.iter().position(|(b, _)| b == backend) {
                attn_of[i] = k;
                continue;
            }
            let mut layers = attn_layers.clone();
            for (m, l) in graph.nodes.iter().filter_map(|m| match m.op.cached_attention_of() {
                Some(CachedAttn { backend: b, layer, .. }) if b == *backend => Some((m, layer)),
                _ => None,
            }) {
                if let Some(e) = layers.get_mut(l) {
                    e.0 = graph.meta(m.inputs[0]).shape[1].as_static().unwrap_or(0);
                }
            }
            let setup = DeviceAttentionSetup {
                gpu: &gpu,
                max_tokens,
                max_len,
                page_size,
                layers,
                options: &opts.attention_options,
            };
            let made = autodeploy_core::registry::device_attention(backend, &setup)?;
            if !made.capturable() && mode.graphs {
                tracing::info!(backend = %backend, "this attention backend's steps are not captured: CUDA graphs off");
                mode.graphs = false;
            }
            attn_of[i] = attn.len();
            attn.push((backend.clone(), made));
        }
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
            table,
            attn_attrs: graph.nodes.iter().map(|n| n.op.cached_attention_of()).collect(),
            mode,
            _params: params,
            param_ptr,
            arena: arena_buf,
            plan,
            attn_tokens_major,
            attn,
            attn_of,
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

/// Scratch regions a node needs besides its output, at the largest shapes.
fn scratch_bytes(g: &Graph, node: &autodeploy_core::ir::Node, bind: &Bindings) -> Result<Vec<usize>> {
    // A cached attention's: the rotated q of a RoPE-fused one; with `quant=fp8` a second
    // region (none if the first is not needed) for its values before their codes.
    if let Some(a) = node.op.cached_attention_of() {
        let q = g.meta(node.inputs[0]);
        let q_bytes = eval_shape(&q.shape, bind)?.iter().product::<usize>() * q.dtype.size_in_bytes();
        return Ok(match (a.rope, a.fp8_out) {
            (true, false) => vec![q_bytes],
            (false, false) => vec![],
            (rope, true) => vec![if rope { q_bytes } else { 0 }, q_bytes],
        });
    }
    let Some(scratch) = autodeploy_core::registry::custom_op(node.op.name).and_then(|c| c.cuda_scratch) else {
        return Ok(vec![]);
    };
    let ins = node
        .inputs
        .iter()
        .map(|&v| Ok((g.meta(v).dtype, eval_shape(&g.meta(v).shape, bind)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(scratch(&ins, &node.op.attrs))
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
        self.attn.iter().find_map(|(_, a)| a.kv_pages_per_sequence())
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

#[cfg(test)]
mod tests {
    use super::*;
    use autodeploy_core::ir::GraphBuilder;
    use autodeploy_core::shape::static_shape;

    /// The planner gives a RoPE-fused cached attention one scratch region for its rotated q (the
    /// size of q at the largest shapes), and an unfused one none.
    #[test]
    fn a_rope_fused_attention_plans_room_for_its_rotated_q() {
        let mut b = GraphBuilder::new(std::sync::Arc::new(autodeploy_core::weights::WeightStore::new("test")));
        let q = b.input("q", DType::BF16, static_shape(&[1, 8, 5, 64]));
        let k = b.input("k", DType::BF16, static_shape(&[1, 2, 5, 64]));
        let v = b.input("v", DType::BF16, static_shape(&[1, 2, 5, 64]));
        let cos = b.input("cos", DType::BF16, static_shape(&[1, 1, 5, 64]));
        let sin = b.input("sin", DType::BF16, static_shape(&[1, 1, 5, 64]));
        let attn = |rope| {
            Op::cached_attention(&CachedAttn {
                backend: "flashinfer".into(),
                layer: 0,
                scale: 0.125,
                rope,
                qk_norm: None,
                scoring: Default::default(),
                fp8_out: false,
            })
        };
        let fused = b.op("fused", attn(true), &[q, k, v, cos, sin]).unwrap();
        let plain = b.op("plain", attn(false), &[q, k, v]).unwrap();
        b.output(fused);
        b.output(plain);
        let g = b.finish().unwrap();
        let bind = Bindings::new();
        assert_eq!(scratch_bytes(&g, &g.nodes[0], &bind).unwrap(), vec![8 * 5 * 64 * 2]);
        assert_eq!(scratch_bytes(&g, &g.nodes[1], &bind).unwrap(), Vec::<usize>::new());
        // A fused op whose cos/sin cannot rotate q is refused by its shape rules.
        let mut b = GraphBuilder::new(std::sync::Arc::new(autodeploy_core::weights::WeightStore::new("test")));
        let q = b.input("q", DType::BF16, static_shape(&[1, 8, 5, 64]));
        let k = b.input("k", DType::BF16, static_shape(&[1, 2, 5, 64]));
        let v = b.input("v", DType::BF16, static_shape(&[1, 2, 5, 64]));
        let short = b.input("cos", DType::BF16, static_shape(&[1, 1, 5, 32]));
        let e = b.op("bad", attn(true), &[q, k, v, short, short]).unwrap_err().to_string();
        assert!(e.contains("RoPE of q"), "{e}");
    }

    /// What the CUDA build refuses before it opens a GPU, from the op table: an entry's
    /// `cuda_attrs` (interleaved RoPE, a mean over another dim than the last), an entry without
    /// a CUDA side, and uncached attention naming the stage that caches it.
    #[test]
    fn ops_without_a_cuda_lowering_are_refused_saying_why() {
        use autodeploy_core::ops::attention::SdpaAttrs;
        let why = |op: Op| unsupported(&op).unwrap_or_default();
        assert!(why(Op::rope(true)).contains("interleaved RoPE"), "{}", why(Op::rope(true)));
        assert_eq!(unsupported(&Op::rope(false)), None);
        assert!(why(Op::mean(vec![1], true)).contains("last dim"), "{}", why(Op::mean(vec![1], true)));
        assert_eq!(unsupported(&Op::mean(vec![-1], true)), None);
        assert!(why(Op::softmax(-1)).contains("CPU kernel only"));
        let sdpa = Op::sdpa(SdpaAttrs { is_causal: true, scale: None, enable_gqa: false, scoring: Default::default() });
        assert!(why(sdpa).contains("cache_init"));
        assert!(why(Op::matmul()).contains("cache_init"));
        assert_eq!(unsupported(&Op::binary(autodeploy_core::ops::binary::ADD)), None);
    }
}
