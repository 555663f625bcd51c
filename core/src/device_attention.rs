//! Attention backends on the GPU: the one interface the CUDA executor runs cached attention
//! through, for the built-in backends (`flashinfer`, `triton`: plugins/src/attention/cuda.rs)
//! and a library's (core/src/plugin_abi/device_attention.rs) alike.
//!
//! The executor makes one instance per engine at compile time ([`DeviceAttentionSetup`]: the
//! device, the largest step, the layers), calls [`DeviceAttention::begin_step`] once per step on
//! the host with the step's batch (before any kernel of the step is queued), then
//! [`DeviceAttention::attend`] for each layer with device addresses: this step's q/k/v, the
//! output, the layer's KV cache and the step's metadata on the device (the CSR page table, each
//! token's sequence and position, each sequence's first token and cached length).

use crate::error::Result;
use crate::kvcache::StepPlan;
use crate::DType;
pub use autodeploy_kernels::cuda::exec::{Gpu, HeadRows, LaunchDims, StepMeta};

/// What the executor knows when it makes the backend (once per engine).
pub struct DeviceAttentionSetup<'a> {
    pub gpu: &'a Gpu,
    /// The most tokens one step carries.
    pub max_tokens: usize,
    /// The longest sequence, in positions.
    pub max_len: usize,
    pub page_size: usize,
    /// `(heads, head_dim)` of each layer's cached attention (q's; k/v have `kv_heads`).
    pub layers: Vec<(usize, usize, usize)>,
    /// The backend's options (`[attention_backends.<name>]`, declared ones resolved).
    pub options: &'a toml::Table,
}

/// A tensor of one step's tokens on the device: its address and where its head rows lie.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub rows: HeadRows,
}

/// One layer's cached attention for one step. Element type `dtype` throughout; the caches are
/// `[slot, kv_heads, head_dim]` where position `p` of sequence `s` lives in slot
/// `page_indices[page_indptr[s] + p / page_size] * page_size + p % page_size`.
pub struct DeviceAttentionCall<'a> {
    pub layer: usize,
    pub scale: f32,
    /// A sliding window and soft-cap: only for a backend whose registration says it applies
    /// them on CUDA (`AttentionBackendPlugin::scoring`).
    pub mods: autodeploy_kernels::cuda::exec::ScoreMods,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// q `[heads, tokens, d]`, this step's k and v `[kv_heads, tokens, d]` (unrotated when
    /// `rope` is set).
    pub q: Operand,
    pub k: Operand,
    pub v: Operand,
    /// A RoPE-fused op's cos and sin, one `[tokens, d]` table each (rotate-half): only for a
    /// backend whose registration says it fuses RoPE (`fuses_rope`).
    pub rope: Option<(u64, u64)>,
    /// With `rope`, a norm-fused op's q/k RMSNorms: the q and k weights (`[d]` each, the
    /// model's dtype) and eps. Each head row of q and k is normalised before its RoPE as
    /// `torch_rmsnorm` does with `norm_dtype` the model's dtype: `w · round(x · rsqrt(mean(x²) +
    /// eps))`, rounded to the dtype. Only with `rope` (so only for `fuses_rope` backends).
    pub qk_norm: Option<(u64, u64, f32)>,
    /// Room for one q (`heads × tokens × d` elements), the node's scratch, for a RoPE-fused op.
    pub scratch: u64,
    /// `[heads, tokens, d]`, or `[tokens, heads, d]` if the backend chooses that and
    /// `tokens_major_ok` allows it ([`DeviceAttention::attend`] returns which). Padding tokens
    /// of a captured step (one-token sequences on a scratch page) are part of `step.tokens`.
    pub out: u64,
    pub tokens_major_ok: bool,
    pub k_cache: u64,
    pub v_cache: u64,
    pub step: &'a StepMeta,
}

/// A cached-attention implementation on the GPU. The defaults describe the plain contract a
/// library backend gets: contiguous operands, a heads-major output, no CUDA graphs.
pub trait DeviceAttention: Send + Sync {
    /// Whether, for a step of `tokens` tokens, it reads q, k and v where they lie (strided:
    /// [`Operand::rows`]) for an op with RoPE fused (`rope`); else they arrive contiguous.
    fn reads_strided(&self, _tokens: usize, _rope: bool) -> bool {
        false
    }

    /// Whether it may write the output token-major when a call allows it.
    fn tokens_major_out(&self) -> bool {
        false
    }

    /// Whether its launches for a step depend only on the step's shape (tokens, sequences) and
    /// device memory, so a captured CUDA graph may replay them; else steps are not captured.
    fn capturable(&self) -> bool {
        false
    }

    /// Pages each sequence must own as one run (a backend that keeps a sequence in one slot of
    /// the cache); the runtime then reserves them.
    fn kv_pages_per_sequence(&self) -> Option<usize> {
        None
    }

    /// Once per step, on the host, before the step's kernels are queued: the step's batch
    /// (each token's sequence and position, each sequence's pages). Refuse what it cannot run.
    fn begin_step(&mut self, _plan: &StepPlan) -> Result<()> {
        Ok(())
    }

    /// Queues this layer's attention on the step's stream (it must not wait for it): writes
    /// this step's k/v into the caches, then attends each token to its sequence's positions up
    /// to its own. Returns where the output's head rows lie.
    fn attend(&self, call: &DeviceAttentionCall, gpu: &Gpu) -> Result<HeadRows>;
}

/// Makes a backend's device side for one engine.
pub type DeviceAttentionMaker = fn(&DeviceAttentionSetup) -> Result<Box<dyn DeviceAttention>>;

/// A [`crate::custom_op::KernelLauncher`] over [`Gpu::launch_source`]: what plugin ops' and
/// plugin attention backends' CUDA code launches through. `what` names the plugin in errors.
pub struct SourceLauncher<'a> {
    pub gpu: &'a Gpu,
    pub what: String,
    /// The executor's error flags buffer (0: none).
    pub flags: u64,
    /// The node's scratch regions (`CustomOp::cuda_scratch`).
    pub scratch: Vec<u64>,
}

impl crate::custom_op::KernelLauncher for SourceLauncher<'_> {
    fn launch(
        &mut self,
        source: &str,
        entry: &str,
        dims: LaunchDims,
        args: &[crate::custom_op::KernelArg],
    ) -> std::result::Result<(), String> {
        self.gpu.launch_source(&self.what, source, entry, dims, args).map_err(|e| e.0)
    }

    fn gpu(&self) -> Option<&Gpu> {
        Some(self.gpu)
    }

    fn error_flag(&self, f: crate::custom_op::ErrorFlag) -> Option<u64> {
        (self.flags != 0).then(|| self.flags + f.offset())
    }

    fn scratch(&self, k: usize) -> Option<u64> {
        self.scratch.get(k).copied()
    }
}
