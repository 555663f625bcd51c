//! The built-in attention backends on CUDA, through the same [`DeviceAttention`] interface a
//! library's backend implements (kernels in kernels/src/cuda/attention.cu):
//!
//! - `flashinfer` (FlashInfer's design): a CSR page table staged once per step; steps of up to
//!   256 tokens and decode steps of any size through split-KV kernels (the latency build for
//!   steps of at most `SPLIT_EARLY_MAX_TOKENS` tokens rotates, writes the cache and attends in one
//!   launch; decode steps past 256 tokens take fewer, longer chunks in the same partials), other
//!   steps through ragged paged attention (tensor-core tiles planned per step where the head dim
//!   allows; with `mixed_step_split_decodes` (the default), a mixed step's decodes through split-KV and its
//!   prompt chunks alone on tensor cores). Takes RoPE-fused ops, reads q/k/v where they lie,
//!   may write token-major. Layers with a sliding window or soft-cap skip the latency build and
//!   the tensor-core prefill: the throughput split-KV build and the ragged CUDA-core kernel apply
//!   them.
//! - `triton` (AutoDeploy's triton backend's design): each sequence in one run of consecutive
//!   pages, one fused kernel that writes this step's k/v and attends.

use autodeploy_core::device_attention::{DeviceAttention, DeviceAttentionCall, DeviceAttentionSetup, Gpu, HeadRows};
use autodeploy_core::error::{Error, Result};
use autodeploy_core::kvcache::StepPlan;
use autodeploy_kernels::cuda::exec::{Buffer, Dt, Split, SPLIT_EARLY_MAX_TOKENS};
use autodeploy_kernels::cuda::Unavailable;

use crate::compile::cuda::dt;

fn fail(c: &DeviceAttentionCall, backend: &str, e: Unavailable) -> Error {
    Error::op("attention_with_kv_cache", format!("{backend}, layer {}: {}", c.layer, e.0))
}

/// Split-KV decode buffers and limits, planned once per engine.
pub struct FlashInfer {
    /// Throughput build: steps of up to `split_tokens` tokens.
    split: Option<Split>,
    /// Latency build: steps of up to `SPLIT_EARLY_MAX_TOKENS` tokens, its own chunks in the
    /// same partials.
    split_early: Option<Split>,
    split_tokens: usize,
    /// Whether this step (`begin_step`) is one token a sequence.
    decode_only: bool,
    _buf: Option<Buffer>,
}

/// A layer whose head dim the CUDA kernels do not cover is refused when the engine is built,
/// naming the backend, the layer and the dims there are kernels for (not at the first step).
fn check_head_dims(setup: &DeviceAttentionSetup, backend: &str) -> Result<()> {
    use autodeploy_kernels::cuda::exec::{kernel_head_dim, HEAD_DIMS};
    match setup.layers.iter().enumerate().find(|(_, &(_, _, d))| kernel_head_dim(d).is_none()) {
        Some((l, &(_, _, d))) => Err(Error::op(
            "attention_with_kv_cache",
            format!(
                "attention backend `{backend}`: layer {l} has head_dim {d}; its CUDA kernels cover head_dim {HEAD_DIMS:?} and any multiple of 8 up to 256 (run this model with device = \"cpu\")"
            ),
        )),
        None => Ok(()),
    }
}

pub fn flashinfer(setup: &DeviceAttentionSetup) -> Result<Box<dyn DeviceAttention>> {
    check_head_dims(setup, "flashinfer")?;
    let gpu = setup.gpu;
    let split_tokens = setup.max_tokens.min(256);
    let hd = setup.layers.iter().map(|&(h, _, d)| h * d).max();
    let heads_max = setup.layers.iter().map(|&(h, _, _)| h).max().unwrap_or(0);
    let (split, split_early, buf) = match hd {
        Some(hd) => {
            let (chunk, splits) = Split::plan(setup.max_len, gpu.split_throughput_min_chunk(&setup.layers));
            let (early_chunk, early_splits) = Split::plan(setup.max_len, gpu.split_min_chunk());
            // Partials, then one counter per (token, head) of the largest step (zeroed at
            // allocation; the kernel leaves them zero).
            let parts = (split_tokens * splits).max(split_tokens.min(SPLIT_EARLY_MAX_TOKENS) * early_splits);
            let bytes = 4 * parts * (hd + 2 * heads_max);
            let buf = gpu
                .alloc(bytes + 4 * setup.max_tokens.max(split_tokens) * heads_max, "split-KV decode partials")
                .map_err(|e| Error::Msg(e.0))?;
            let (partial, counters) = (buf.ptr, buf.ptr + bytes as u64);
            (
                Some(Split { chunk, splits, partial, counters }),
                gpu.decode_latency_build().then_some(Split {
                    chunk: early_chunk,
                    splits: early_splits,
                    partial,
                    counters,
                }),
                Some(buf),
            )
        }
        None => (None, None, None),
    };
    Ok(Box::new(FlashInfer { split, split_early, split_tokens, decode_only: false, _buf: buf }))
}

impl FlashInfer {
    /// Whether a step of `tokens` tokens runs the latency build (one launch a layer).
    fn early(&self, tokens: usize) -> bool {
        self.split_early.is_some() && tokens <= self.split_tokens.min(SPLIT_EARLY_MAX_TOKENS)
    }
}

impl DeviceAttention for FlashInfer {
    /// The RoPE + KV write kernel reads q/k/v in place; the latency build reads them contiguous.
    fn reads_strided(&self, tokens: usize, rope: bool) -> bool {
        rope && !self.early(tokens)
    }

    fn tokens_major_out(&self) -> bool {
        true
    }

    fn capturable(&self) -> bool {
        true
    }

    fn begin_step(&mut self, plan: &StepPlan) -> Result<()> {
        self.decode_only = plan.token_seq.len() == plan.page_tables.len();
        Ok(())
    }

    fn attend(&self, c: &DeviceAttentionCall, gpu: &Gpu) -> Result<HeadRows> {
        let fail = |e| fail(c, "flashinfer", e);
        let odt: Dt = dt(c.dtype, "attention")?;
        let meta = c.step;
        let (heads, kvh, d, sc) = (c.heads, c.kv_heads, c.head_dim, c.scale);
        let cache = (c.k_cache, c.v_cache);
        // Every kernel here writes [tokens, heads, d] when the call allows (the o projection's
        // input then needs no copy).
        // Sliding windows and soft-caps: the throughput split-KV build and the ragged CUDA-core
        // kernel apply them (not the latency build or the tensor-core prefill).
        let scored = c.mods.shapes_scores();
        let kv_fp8 = c.mods.kv_fp8;
        // A decode step past `split_tokens` tokens (a CUDA graph's bucket pads it with rows of
        // its own) takes the split kernels in fewer chunks: the ragged prefill kernel would
        // read each sequence's positions once for every query head.
        let split = self
            .split
            .filter(|_| meta.tokens <= self.split_tokens || self.decode_only)
            .map(|s| s.for_tokens(meta.tokens, self.split_tokens));
        let out_rows =
            if c.tokens_major_ok { HeadRows::tokens_major(heads, d) } else { HeadRows::heads_major(meta.tokens, d) };
        if let (Some(split), true, false) = (self.split_early, self.early(meta.tokens), scored) {
            // A few decode tokens: one kernel rotates, writes the cache and attends.
            gpu.paged_decode_split_fused(
                odt,
                (c.q.ptr, c.k.ptr, c.v.ptr),
                c.rope,
                c.qk_norm,
                cache,
                (c.out, out_rows),
                meta,
                heads,
                kvh,
                d,
                sc,
                split,
                kv_fp8,
            )
            .map_err(fail)?;
            return Ok(out_rows);
        }
        let q = if let Some(tables) = c.rope {
            // One kernel rotates q into the node's scratch and writes rotated k and v into the
            // cache, reading q/k/v where they lie (normalising q and k first where the q/k
            // norms are fused too).
            gpu.rope_write_kv(
                odt,
                (c.q.ptr, c.k.ptr, c.v.ptr),
                [c.q.rows, c.k.rows, c.v.rows],
                tables,
                c.qk_norm,
                c.scratch,
                cache,
                meta,
                heads,
                kvh,
                d,
                kv_fp8,
            )
            .map_err(fail)?;
            c.scratch
        } else {
            gpu.write_kv(odt, c.k.ptr, c.v.ptr, cache.0, cache.1, meta, kvh, d, kv_fp8).map_err(fail)?;
            c.q.ptr
        };
        // A mixed step (`mixed_step_split_decodes`): its decodes, queued first, through the
        // split-KV decode, its prompt chunks' tiles after them on tensor cores (a decode would
        // be a tile of one row there, reading its sequence once for every query head).
        let prefix = meta.decode_prefix;
        let mixed = self.split.filter(|_| {
            gpu.mixed_split_decodes()
                && prefix > 0
                && prefix < meta.tokens
                && gpu.prefill_tc_applies(odt, d, c.mods, meta)
        });
        let out = (c.out, out_rows);
        match (split, mixed) {
            (Some(split), _) => {
                gpu.paged_decode_split(odt, q, cache, out, meta, heads, kvh, d, sc, split, c.mods).map_err(fail)?
            }
            (None, Some(s)) => {
                let s = s.for_tokens(prefix, self.split_tokens);
                gpu.paged_decode_split_prefix(odt, q, cache, out, meta, heads, kvh, d, sc, s, c.mods).map_err(fail)?;
                let rest = meta.after_decode_prefix();
                gpu.paged_attention(odt, q, cache.0, cache.1, out, &rest, heads, kvh, d, sc, c.mods).map_err(fail)?
            }
            (None, None) => {
                gpu.paged_attention(odt, q, cache.0, cache.1, out, meta, heads, kvh, d, sc, c.mods).map_err(fail)?
            }
        }
        Ok(out_rows)
    }
}

/// Each sequence in one slot of `slot_pages` consecutive pages.
pub struct Triton {
    slot_pages: usize,
}

pub fn triton(setup: &DeviceAttentionSetup) -> Result<Box<dyn DeviceAttention>> {
    check_head_dims(setup, "triton")?;
    Ok(Box::new(Triton { slot_pages: setup.max_len.div_ceil(setup.page_size.max(1)) }))
}

impl DeviceAttention for Triton {
    fn capturable(&self) -> bool {
        true
    }

    fn kv_pages_per_sequence(&self) -> Option<usize> {
        Some(self.slot_pages)
    }

    fn begin_step(&mut self, plan: &StepPlan) -> Result<()> {
        let n = self.slot_pages;
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
        Ok(())
    }

    fn attend(&self, c: &DeviceAttentionCall, gpu: &Gpu) -> Result<HeadRows> {
        if c.rope.is_some() || c.qk_norm.is_some() {
            return Err(fail(
                c,
                "triton",
                Unavailable("its kernel takes rotated q and k (fuse_rope_attention skips it)".into()),
            ));
        }
        let odt: Dt = dt(c.dtype, "attention")?;
        gpu.slot_attention(
            odt,
            (c.q.ptr, c.k.ptr, c.v.ptr),
            (c.k_cache, c.v_cache),
            c.out,
            c.step,
            c.heads,
            c.kv_heads,
            c.head_dim,
            c.scale,
            c.mods.kv_fp8,
        )
        .map_err(|e| fail(c, "triton", e))?;
        Ok(HeadRows::heads_major(c.step.tokens, c.head_dim))
    }
}
