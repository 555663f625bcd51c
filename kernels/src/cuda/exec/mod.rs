//! Launchers over raw device addresses, for an executor that plans its own memory: one stream,
//! no per-buffer event tracking (so a whole step can be captured in a CUDA graph), every
//! failure an error that says what was being done.

use std::sync::Arc;

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{result as drv, sys as drv_sys, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig};

use super::{Device, Kernel, Unavailable};
use funcs::Funcs;

mod attention;
mod elementwise;
mod funcs;
mod linear;
mod lt;
mod moe;
mod norm;
mod plan;
mod quant;
mod settings;

pub use attention::{HeadRows, ScoreMods};
pub use elementwise::bad_index;
pub use moe::{MoeShape, RouterIn, ROUTER_FUSED_MAX_EXPERTS};
pub use plan::{
    decode_prefix_count, heads_a_block, kernel_head_dim, plan_tiles, prefill_heads_a_block, tile_slots, Split,
    StepMeta, ATTN_BUILDS, GENERAL_DIMS, HEAD_DIMS, PREFILL_TC_DIMS,
};
pub use quant::{LowBitLinear, LowBitScales, ScaleRuns, MAX_SCALE_RUNS};
pub use settings::KernelSettings;

/// A device address.
pub type Ptr = u64;

/// Element types as the executor's kernels number them (`codes.cuh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F32 = 0,
    BF16 = 1,
    F16 = 2,
    I64 = 3,
    Bool = 4,
}

impl Dt {
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::BF16 | Dt::F16 => 2,
            Dt::I64 => 8,
            Dt::Bool => 1,
        }
    }
}

/// How one row is sampled, laid out as `sample.cu`'s `RowSampling` (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowSampling {
    /// 0 (or less): argmax.
    pub temperature: f32,
    /// 0: no top-k.
    pub top_k: i32,
    /// 1: no top-p.
    pub top_p: f32,
    /// The uniform draw in [0, 1) that picks the token.
    pub u: f32,
}

impl RowSampling {
    pub fn to_le_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.temperature.to_le_bytes());
        b[4..8].copy_from_slice(&self.top_k.to_le_bytes());
        b[8..12].copy_from_slice(&self.top_p.to_le_bytes());
        b[12..].copy_from_slice(&self.u.to_le_bytes());
        b
    }
}

/// At most this many dims in a strided kernel.
pub const MAX_RANK: usize = 6;

/// Sizes of the output and the element strides two operands are read (or written) with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Strided {
    pub rank: i32,
    pub size: [i64; MAX_RANK],
    pub sa: [i64; MAX_RANK],
    pub sb: [i64; MAX_RANK],
}

// SAFETY: plain `repr(C)` data, laid out as `struct Strided` in graph.cu.
unsafe impl cudarc::driver::DeviceRepr for Strided {}

/// Element strides to read a contiguous tensor of `shape` broadcast to `out` (right-aligned;
/// 0 where a size-1 dim repeats).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<i64> {
    let mut cs = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        cs[i] = cs[i + 1] * shape[i + 1] as i64;
    }
    let off = out.len() - shape.len();
    (0..out.len()).map(|i| if i < off || shape[i - off] == 1 && out[i] != 1 { 0 } else { cs[i - off] }).collect()
}

impl Strided {
    /// Output `out`, operands `a` and `b` (contiguous) read broadcast to it.
    pub fn broadcast(out: &[usize], a: &[usize], b: &[usize]) -> Result<Strided, Unavailable> {
        Strided::new(out, &broadcast_strides(a, out), &broadcast_strides(b, out))
    }

    pub fn new(size: &[usize], sa: &[i64], sb: &[i64]) -> Result<Strided, Unavailable> {
        if size.len() > MAX_RANK {
            return Err(Unavailable(format!(
                "a rank-{} tensor is beyond the CUDA kernels' {MAX_RANK} dims",
                size.len()
            )));
        }
        let mut s = Strided { rank: size.len().max(1) as i32, ..Default::default() };
        s.size[0] = 1;
        for (i, &n) in size.iter().enumerate() {
            s.size[i] = n as i64;
            s.sa[i] = sa[i];
            s.sb[i] = sb[i];
        }
        Ok(s)
    }
}

/// Unary ops of `graph.cu`'s `unary`.
#[derive(Clone, Copy, Debug)]
pub enum Unary {
    Neg = 0,
    Rsqrt = 1,
    Silu = 2,
    Cos = 3,
    Sin = 4,
    AddScalar = 5,
    MulScalar = 6,
    PowScalar = 7,
    Tanh = 8,
    DivScalar = 9,
    Gelu = 10,
    GeluTanh = 11,
    Floor = 12,
    Log1p = 13,
}

/// The activation of a gated MLP (`graph.cu`'s `silu_mul`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GateAct {
    #[default]
    Silu = 0,
    GeluTanh = 1,
    Gelu = 2,
}

/// Binary ops of `graph.cu`'s `binary`.
#[derive(Clone, Copy, Debug)]
pub enum Binary {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
}

/// One GPU, one stream, cuBLAS on it, and the executor's kernels.
pub struct Gpu {
    pub dev: Device,
    pub stream: Arc<CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    /// cuBLAS's workspace (address, bytes), lent to cuBLASLt too: both run on the one stream.
    blas_ws: (Ptr, usize),
    /// cuBLASLt's FP8 GEMM for FP8 linears past the GEMVs' 8 rows, bf16 activations
    /// (`[kernels] fp8_gemm_cublaslt`, sm_89+; `None`: off, or no libcublasLt).
    fp8_lt: Option<lt::LtFp8>,
    /// cuBLASLt applies an FP8 linear's scales and writes bf16 where it can
    /// (`[kernels] fp8_gemm_cublaslt_scales`).
    pub fp8_lt_scaled: bool,
    f: Funcs,
    /// Launch with programmatic stream serialization (sm_90+, unless `[kernels] pdl = false`): a
    /// kernel may start while the one before it drains; every executor kernel begins with
    /// `pdl_enter()` (common.cuh), which waits for its predecessors before touching memory.
    pub pdl: bool,
    /// Bytes of each weight row the decode GEMVs ask L2 for before waiting on the kernel ahead
    /// (`AUTODEPLOY_PREFETCH_ROW`, default 1024; on an H200, 0 to 1024 gave the same 8B step
    /// and 2048 slower GEMVs in `gemv_bench`, see BENCHMARKS.md).
    pub prefetch_row: usize,
    /// Prefill attention on tensor cores where it applies (bf16, head dim in
    /// `PREFILL_TC_DIMS`, sm_80+, a step with planned tiles); `AUTODEPLOY_PREFILL_TC=0`: the
    /// CUDA-core kernel everywhere.
    pub prefill_tc: bool,
    /// `[kernels] mixed_step_split_decodes` (`Gpu::mixed_split_decodes`).
    mixed_split: bool,
    /// `[kernels] decode_latency_build` (`Gpu::decode_latency_build`).
    decode_latency: bool,
    /// The FP8 decode GEMVs on tensor cores (`[kernels] fp8_gemv_tensor_cores`, sm_89+).
    pub fp8_tc: bool,
    /// The NVFP4 decode GEMVs on tensor cores (`[kernels] nvfp4_gemv_tensor_cores`, sm_80+).
    pub nvfp4_tc: bool,
    /// Warps a weight row in the one-row decode GEMV (`AUTODEPLOY_GEMV_SPLIT`: 1, 2, the
    /// default, or 4): more loads in flight for a short row. On an H200 two warps made the 8B
    /// decode step 21-28 µs shorter than one (BENCHMARKS.md, session 9).
    pub gemv_split: usize,
    /// Positions a warp takes a pass in the split-KV decode's latency build
    /// (`AUTODEPLOY_ATTN_U`: 4, the default, or 8): at 4, half the registers for K/V (held to
    /// 64 at head dims up to 128) and the latency build's chunks planned at 16 positions, so one
    /// pass covers one. On an H200 the 8B
    /// decode step was 0.16 ms shorter at 4 (BENCHMARKS.md, session 10). An atomic so a check
    /// can switch it behind a shared reference (`set_attn_early_u`).
    attn_early_u: std::sync::atomic::AtomicUsize,
    /// The split-KV decode's throughput build taking the query heads of a GQA group together
    /// (`AUTODEPLOY_ATTN_GROUP=0`: one head a block). On an H200 the 8B step at batch 64 took
    /// 7.16-7.19 ms against 8.78-8.84 one head a block, the 128-token prefill 8.0 against 10.3
    /// (BENCHMARKS.md, session 10). An atomic as `attn_early_u` (`set_attn_group`).
    attn_group: std::sync::atomic::AtomicBool,
    /// The split-KV decode's throughput build on tensor cores where it applies
    /// (`[kernels] decode_tensor_cores`, sm_80+; `Gpu::decode_tc_applies`). An atomic as
    /// `attn_group` (`set_decode_tc`).
    decode_tc: std::sync::atomic::AtomicBool,
    /// That build's fragment loads by `ldmatrix` (`[kernels] decode_ldmatrix`). An atomic as
    /// `decode_tc` (`set_decode_ldmatrix`).
    decode_ldsm: std::sync::atomic::AtomicBool,
    /// Over an FP8 cache, that build's fragments straight from the codes (`[kernels]
    /// decode_fp8_codes`). An atomic as `decode_tc` (`set_decode_fp8_codes`).
    decode_codes: std::sync::atomic::AtomicBool,
    /// The tensor-core prefill takes a GQA group's heads a block (`[kernels]
    /// prefill_group_heads`). An atomic as `decode_tc` (`set_prefill_group`).
    prefill_group: std::sync::atomic::AtomicBool,
    /// Warps an output in the fused gate/up + SwiGLU GEMV (`AUTODEPLOY_SWIGLU_SPLIT`: 1, 2 or
    /// 4, the default): a smaller last wave of blocks. On an H200 the 8B decode step was
    /// 0.11-0.14 ms shorter at 4 than at 1 (BENCHMARKS.md, session 10).
    pub swiglu_split: usize,
    /// `torch_moe` runs its grouped kernels from this many token-expert slots an expert
    /// (`MoeShape::grouped`, `AUTODEPLOY_MOE_GROUPED`).
    pub moe_grouped_min: usize,
    /// Zeroed counters for kernels whose last block to finish does the rest (`last_to_finish`:
    /// each re-arms its counters, and the step's kernels run in stream order, so every launch
    /// finds them zero): `moe_router_route`'s, a token each.
    counters: CudaSlice<i32>,
    /// Kernels of outside CUDA source (plugin ops), by a hash of source and entry point.
    source_kernels: std::sync::Mutex<std::collections::HashMap<u64, Kernel>>,
    /// How collectives reach the other ranks, once a sharded model's compile has set it.
    collectives: std::sync::OnceLock<super::nccl::Collectives>,
}

/// The split-KV decode's latency build serves steps of up to this many tokens: on an H200 it
/// made the 8B decode step faster at one token and slower at 64 (more registers, fewer resident
/// blocks); sizes between were not measured.
pub const SPLIT_EARLY_MAX_TOKENS: usize = 4;

/// The least positions a chunk of the split-KV decode's throughput build has. On an H200 (8B
/// shape, `max_seq_len` 512, BENCHMARKS.md session 10) the batch 64 decode step took 7.22 ms at
/// 16, 6.49 at 32, 6.28-6.32 at 64, 6.24-6.30 at 128, 6.31 at 256; the 128-token prefill 7.7,
/// 6.9, 6.5-6.6, 6.5 ms at 16, 32, 64, 128.
pub const SPLIT_MIN_CHUNK: usize = 64;

/// The same where the throughput build runs on tensor cores (`Gpu::split_throughput_min_chunk`):
/// each of its 4 warps takes 16 positions a pass, so a 64-position chunk is one pass and the
/// block's merge costs as much as its attention. On an H200 (8B shape, batch 64, `max_seq_len`
/// 512, BENCHMARKS.md session 30) the decode step took 5.94-5.96 ms at 64, 5.71-5.74 at 128,
/// 5.49-5.54 at 256 (the CUDA-core build 6.22-6.26 at 64); 1,000 × 128/128 offline 13,809
/// output tok/s at 64 and 14,989 at 256; batch 32 at 2,000 positions 9.05 and 7.63 ms a step.
pub const SPLIT_TC_MIN_CHUNK: usize = 256;

/// Zeroed counters a GPU keeps for last-block-finishes kernels (`Gpu::counters`).
const COUNTERS: usize = 4096;

/// One kernel launch: arguments by reference, then `launch`.
struct Launch<'a> {
    gpu: &'a Gpu,
    f: Kernel,
    args: Vec<*mut std::ffi::c_void>,
    /// Launch with programmatic dependent launch (when the GPU has it on): only for kernels
    /// that call `pdl_enter()` first.
    pdl: bool,
}

impl<'a> Launch<'a> {
    fn arg<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.args.push(v as *const T as *mut std::ffi::c_void);
        self
    }

    /// # Safety
    /// The arguments must match the kernel's parameters and the memory they address.
    unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), drv::DriverError> {
        self.gpu.dev.ctx.bind_to_thread()?;
        // SAFETY: all-zero is a valid launch attribute (its value is a plain union).
        let mut attr: drv_sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = drv_sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.gpu.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: (self.gpu.pdl && self.pdl) as u32,
        };
        // SAFETY: the caller vouches for the arguments; `args` outlives the call.
        unsafe { drv_sys::cuLaunchKernelEx(&config, self.f.0, self.args.as_mut_ptr(), std::ptr::null_mut()) }.result()
    }
}

fn grid(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(block).max(1), 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

fn launched(what: &'static str, r: Result<(), cudarc::driver::DriverError>) -> Result<(), Unavailable> {
    launched_as(what, what, r)
}

/// As `launched`, counted under `counter` (a plugin's kernels share one name).
fn launched_as(
    counter: &'static str,
    what: &str,
    r: Result<(), cudarc::driver::DriverError>,
) -> Result<(), Unavailable> {
    r.map_err(|e| Unavailable(format!("launching {what}: {e:?}")))?;
    count_launch(counter);
    Ok(())
}

/// Launches by kernel (a launch recorded into a CUDA graph counts once, when recorded), and
/// the executor's own events (`cuda_graph_capture`, `cuda_graph_replay`), for this process:
/// what lets a test confirm which path a step took. One uncontended lock a launch.
static LAUNCHES: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Counts one launch (or event) named `what`.
pub fn count_launch(what: &'static str) {
    *LAUNCHES.lock().unwrap_or_else(|e| e.into_inner()).entry(what).or_default() += 1;
}

/// The counts so far; compare two snapshots to see what a call launched.
pub fn launch_counts() -> std::collections::BTreeMap<&'static str, u64> {
    LAUNCHES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Device memory a caller owns; freed on drop.
pub struct Buffer {
    slice: CudaSlice<u8>,
    pub ptr: Ptr,
}

impl Buffer {
    pub fn bytes(&self) -> usize {
        self.slice.len()
    }
}

impl Gpu {
    /// GPU `ordinal` with the default kernel settings (and any `AUTODEPLOY_*` override).
    pub fn open(ordinal: usize) -> Result<Gpu, Unavailable> {
        Gpu::open_with(ordinal, &KernelSettings::default())
    }

    /// GPU `ordinal` with `settings` (a config's `[kernels]`), `AUTODEPLOY_*` overrides applied.
    pub fn open_with(ordinal: usize, settings: &KernelSettings) -> Result<Gpu, Unavailable> {
        let k = settings.with_env_overrides();
        let dev = Device::open(ordinal)?;
        // One stream and addresses we plan ourselves: cudarc's per-buffer events would only
        // add work (and would be recorded into captured graphs).
        // SAFETY: every buffer of this context is used from this one stream.
        unsafe { dev.ctx.disable_event_tracking() };
        let stream = dev.ctx.new_stream().map_err(|e| Unavailable(format!("creating a CUDA stream: {e:?}")))?;
        let blas = super::blas::handle(stream.clone())?;
        // cuBLAS takes its workspace from us, so nothing is allocated while a graph is captured.
        let ws_bytes = 32 << 20;
        let ws = stream
            .alloc_zeros::<u8>(ws_bytes)
            .map_err(|e| Unavailable(format!("allocating cuBLAS's {} MiB workspace: {e:?}", ws_bytes >> 20)))?;
        let (ws_ptr, _g) = ws.device_ptr(&stream);
        // SAFETY: the workspace lives as long as the handle (both in `Gpu`).
        unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), ws_ptr as *mut _, ws_bytes) }
            .result()
            .map_err(|e| Unavailable(format!("cublasSetWorkspace: {e:?}")))?;
        drop(_g);
        let blas_ws = (ws_ptr, ws_bytes);
        let fp8_lt = match (dev.cc >= (8, 9) && k.fp8_gemm_cublaslt).then(|| lt::LtFp8::new(k.fp8_gemm_fast_accum)) {
            Some(Ok(l)) => Some(l),
            Some(Err(e)) => {
                tracing::warn!("{}; FP8 linears dequantize their weights instead", e.0);
                None
            }
            None => None,
        };
        let f = Funcs::load(&dev)?;
        let counters = stream
            .alloc_zeros::<i32>(COUNTERS)
            .map_err(|e| Unavailable(format!("allocating {COUNTERS} kernel counters: {e:?}")))?;
        let pdl = dev.cc.0 >= 9 && k.pdl;
        let prefetch_row = k.prefetch_row;
        let prefill_tc = dev.cc.0 >= 8 && k.prefill_tensor_cores;
        let (mixed_split, decode_latency) = (k.mixed_step_split_decodes, k.decode_latency_build);
        let prefill_group = std::sync::atomic::AtomicBool::new(k.prefill_group_heads);
        let fp8_tc = dev.cc >= (8, 9) && k.fp8_gemv_tensor_cores;
        let nvfp4_tc = dev.cc.0 >= 8 && k.nvfp4_gemv_tensor_cores;
        let source_kernels = Default::default();
        let (gemv_split, swiglu_split) = (k.gemv_split, k.swiglu_split);
        let attn_early_u = std::sync::atomic::AtomicUsize::new(k.attn_positions_per_pass);
        let attn_group = std::sync::atomic::AtomicBool::new(k.attn_group_heads);
        let decode_tc = std::sync::atomic::AtomicBool::new(dev.cc.0 >= 8 && k.decode_tensor_cores);
        let decode_ldsm = std::sync::atomic::AtomicBool::new(k.decode_ldmatrix);
        let decode_codes = std::sync::atomic::AtomicBool::new(k.decode_fp8_codes);
        Ok(Gpu {
            dev,
            stream,
            blas,
            _blas_workspace: ws,
            blas_ws,
            fp8_lt,
            fp8_lt_scaled: k.fp8_gemm_cublaslt_scales,
            f,
            pdl,
            prefetch_row,
            prefill_tc,
            mixed_split,
            decode_latency,
            fp8_tc,
            nvfp4_tc,
            gemv_split,
            attn_early_u,
            attn_group,
            decode_tc,
            decode_ldsm,
            prefill_group,
            decode_codes,
            swiglu_split,
            moe_grouped_min: k.moe_grouped_min,
            counters,
            source_kernels,
            collectives: Default::default(),
        })
    }

    /// The zeroed counters' address (`Gpu::counters`, `COUNTERS` of them).
    fn counters_ptr(&self) -> Ptr {
        let (p, _g) = self.counters.device_ptr(&self.stream);
        p
    }

    fn launcher(&self, f: Kernel) -> Launch<'_> {
        Launch { gpu: self, f, args: Vec::with_capacity(16), pdl: true }
    }

    /// Queues kernel `entry` of outside CUDA C source (a plugin op's; `what` names it in
    /// errors) on the stream: compiled for this GPU at first use (the shared helpers prepended,
    /// cached on disk), then launched in plain stream order (no programmatic dependent launch:
    /// such a kernel need not call `pdl_enter()`). Launch sizes are checked; the arguments
    /// cannot be: the source's author vouches for them, as for any kernel.
    pub fn launch_source(
        &self,
        what: &str,
        src: &str,
        entry: &str,
        dims: LaunchDims,
        args: &[KernelArg],
    ) -> Result<(), Unavailable> {
        let key = super::fnv(&[src.as_bytes(), entry.as_bytes()]);
        let cached = self.source_kernels.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied();
        let f = match cached {
            Some(f) => f,
            None => {
                let label = format!("plugin-{key:016x}");
                let f = self.dev.load_source(&label, what, src, entry)?;
                self.source_kernels.lock().unwrap_or_else(|e| e.into_inner()).insert(key, f);
                f
            }
        };
        let LaunchDims { grid, block, shared_mem_bytes } = dims;
        if grid.contains(&0) || block.contains(&0) || block.iter().product::<u32>() > 1024 {
            return Err(Unavailable(format!(
                "{what}: launch of `{entry}` with grid {grid:?} and block {block:?} (each at least 1, at most 1024 threads a block)"
            )));
        }
        let mut l = self.launcher(f);
        l.pdl = false;
        for a in args {
            match a {
                KernelArg::Ptr(v) => l.arg(v),
                KernelArg::I32(v) => l.arg(v),
                KernelArg::I64(v) => l.arg(v),
                KernelArg::F32(v) => l.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid[0], grid[1], grid[2]),
            block_dim: (block[0], block[1], block[2]),
            shared_mem_bytes,
        };
        // SAFETY: the source's author vouches that the arguments match `entry`'s parameters
        // and that it stays within the buffers it is given.
        launched_as("plugin_source_kernel", what, unsafe { l.launch(cfg) }.map(|_| ()))
    }

    /// Free and total device memory in bytes.
    /// Makes this GPU's context current on the calling thread (for libraries that use the
    /// current device: NCCL).
    pub fn bind(&self) -> Result<(), Unavailable> {
        self.dev.ctx.bind_to_thread().map_err(|e| Unavailable(format!("binding the CUDA context: {e:?}")))
    }

    /// Sets how this GPU's collectives reach the other ranks (once).
    pub fn set_collectives(&self, c: super::nccl::Collectives) -> Result<(), Unavailable> {
        self.collectives.set(c).map_err(|_| Unavailable("this GPU's collectives are already set".into()))
    }

    /// How this GPU's collectives reach the other ranks, once set.
    pub fn collectives(&self) -> Option<&super::nccl::Collectives> {
        self.collectives.get()
    }

    /// The device's UUID (two ranks on one GPU have the same).
    pub fn uuid(&self) -> Result<[u8; 16], Unavailable> {
        let u = self.dev.ctx.uuid().map_err(|e| Unavailable(format!("reading the GPU's UUID: {e:?}")))?;
        Ok(u.bytes.map(|b| b as u8))
    }

    /// The raw handle of this GPU's stream (`cudaStream_t`), for libraries that queue on it.
    pub fn raw_stream(&self) -> *mut std::ffi::c_void {
        self.stream.cu_stream() as *mut std::ffi::c_void
    }

    pub fn mem_info(&self) -> (usize, usize) {
        let _ = self.dev.ctx.bind_to_thread();
        drv::mem_get_info().unwrap_or((0, 0))
    }

    /// `bytes` of zeroed device memory for `what`; out of memory says how much was asked and
    /// how much the device has free.
    pub fn alloc(&self, bytes: usize, what: &str) -> Result<Buffer, Unavailable> {
        let slice = self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| {
            let (free, total) = self.mem_info();
            Unavailable(format!(
                "out of GPU memory allocating {what}: {:.2} GiB asked, {:.2} GiB free of {:.2} GiB on {} ({e:?})",
                bytes as f64 / GIB,
                free as f64 / GIB,
                total as f64 / GIB,
                self.dev.name
            ))
        })?;
        let (ptr, g) = slice.device_ptr(&self.stream);
        drop(g);
        Ok(Buffer { slice, ptr })
    }

    pub fn upload(&self, dst: Ptr, bytes: &[u8]) -> Result<(), Unavailable> {
        // SAFETY: callers pass an address with room for `bytes` (planned regions and buffers).
        unsafe { drv::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) }
            .map_err(|e| Unavailable(format!("copying {} bytes to the GPU: {e:?}", bytes.len())))
    }

    /// Waits for the stream, then copies `out.len()` bytes from `src`.
    pub fn download(&self, src: Ptr, out: &mut [u8]) -> Result<(), Unavailable> {
        self.sync()?;
        // SAFETY: `src` holds at least `out.len()` bytes (callers read planned outputs).
        unsafe { drv::memcpy_dtoh_sync(out, src) }
            .map_err(|e| Unavailable(format!("copying {} bytes from the GPU: {e:?}", out.len())))
    }

    /// `n` elements of `elem` bytes (2 or 4) at `dst`, each the bit pattern `bits` (its low
    /// `8 * elem` bits): the debug checks' mark for values an op never wrote.
    pub fn memset_bits(&self, dst: Ptr, elem: usize, bits: u32, n: usize) -> Result<(), Unavailable> {
        let stream = self.stream.cu_stream();
        // SAFETY: `dst` holds `n` elements of `elem` bytes (callers pass their own buffers).
        let r = unsafe {
            match elem {
                4 => drv_sys::cuMemsetD32Async(dst, bits, n, stream),
                2 => drv_sys::cuMemsetD16Async(dst, bits as u16, n, stream),
                _ => return Err(Unavailable(format!("memset_bits: {elem}-byte elements"))),
            }
        };
        r.result().map_err(|e| Unavailable(format!("marking {n} elements: {e:?}")))
    }

    pub fn memset(&self, dst: Ptr, bytes: usize) -> Result<(), Unavailable> {
        // SAFETY: `dst` holds `bytes` (callers pass their own buffers).
        unsafe { drv::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| Unavailable(format!("clearing {bytes} bytes: {e:?}")))
    }

    pub fn copy(&self, dst: Ptr, src: Ptr, bytes: usize) -> Result<(), Unavailable> {
        // SAFETY: both hold `bytes`.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| Unavailable(format!("copying {bytes} bytes on the GPU: {e:?}")))
    }

    /// Device memory bandwidth in bytes/s: a `bytes` device-to-device copy (read + write) timed
    /// over `reps` copies after a warm-up, best of 3 rounds. The decode floor's reference.
    pub fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64, Unavailable> {
        let a = self.alloc(bytes, "the bandwidth probe's source")?;
        let b = self.alloc(bytes, "the bandwidth probe's destination")?;
        self.copy(b.ptr, a.ptr, bytes)?;
        self.sync()?;
        let mut best = 0.0f64;
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                self.copy(b.ptr, a.ptr, bytes)?;
            }
            self.sync()?;
            best = best.max(2.0 * bytes as f64 * reps as f64 / t0.elapsed().as_secs_f64());
        }
        Ok(best)
    }

    /// Waits for everything queued; a kernel that faulted is reported here.
    pub fn sync(&self) -> Result<(), Unavailable> {
        self.stream.synchronize().map_err(|e| Unavailable(format!("a GPU kernel failed: {e:?}")))
    }
}

/// Blocks per row in the argmax's first pass.
pub const ARGMAX_PARTS: usize = 64;

/// One argument of `Gpu::launch_source`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Grid and block sizes of one `Gpu::launch_source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
}

const GIB: f64 = (1u64 << 30) as f64;
