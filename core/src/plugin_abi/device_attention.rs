//! A library's CUDA attention backend as a host [`DeviceAttention`]: the step's batch to its
//! `begin_step`, each layer's device addresses to its `attend` with the host's launcher. It
//! keeps the trait's defaults: contiguous operands, a heads-major output, no CUDA graphs (its
//! launches are its own choice each step).

use autodeploy_sdk::abi_stable::sabi_trait::TD_Opaque;
use autodeploy_sdk::abi_stable::std_types::{RResult, RStr, RString};
use autodeploy_sdk::ffi;

use super::ops::{device_dtype, HostLauncher};
use super::page_table_csr;
use crate::device_attention::{
    DeviceAttention, DeviceAttentionCall, DeviceAttentionSetup, Gpu, HeadRows, SourceLauncher,
};
use crate::error::{Error, Result};
use crate::kvcache::StepPlan;

type MakeCuda = extern "C" fn(RStr<'_>) -> RResult<ffi::CudaAttentionBackendBox, RString>;

/// The registry's maker for a library's CUDA side: the backend's options as TOML text in.
#[allow(clippy::type_complexity)]
pub(super) fn maker(
    make: MakeCuda,
    name: &str,
    origin: &str,
) -> Box<dyn Fn(&DeviceAttentionSetup) -> Result<Box<dyn DeviceAttention>> + Send + Sync> {
    let what = format!("attention backend `{name}` ({origin})");
    Box::new(move |setup: &DeviceAttentionSetup| -> Result<Box<dyn DeviceAttention>> {
        let text = toml::to_string(setup.options).map_err(|e| Error::Msg(format!("options: {e}")))?;
        let inner = make(text.as_str().into()).into_result().map_err(|e| Error::Msg(e.into_string()))?;
        Ok(Box::new(LibraryDeviceAttention { inner, what: what.clone(), seqs: 0 }))
    })
}

struct LibraryDeviceAttention {
    inner: ffi::CudaAttentionBackendBox,
    what: String,
    /// Sequences in this step (from `begin_step`).
    seqs: usize,
}

impl DeviceAttention for LibraryDeviceAttention {
    fn begin_step(&mut self, plan: &StepPlan) -> Result<()> {
        let (indptr, indices) = page_table_csr(&plan.page_tables);
        self.seqs = plan.page_tables.len();
        let step = ffi::StepInfo {
            tokens: plan.token_seq.len(),
            token_seq: plan.token_seq.as_slice().into(),
            token_pos: plan.token_pos.as_slice().into(),
            page_size: plan.page_size,
            page_indptr: indptr.as_slice().into(),
            page_indices: indices.as_slice().into(),
        };
        match self.inner.begin_step(step) {
            RResult::ROk(()) => Ok(()),
            RResult::RErr(e) => {
                Err(Error::op("attention_with_kv_cache", format!("{}: planning the step: {e}", self.what)))
            }
        }
    }

    fn attend(&self, c: &DeviceAttentionCall, gpu: &Gpu) -> Result<HeadRows> {
        let bad =
            |msg: String| Error::op("attention_with_kv_cache", format!("{}, layer {}: {msg}", self.what, c.layer));
        let tokens = c.step.tokens;
        let contiguous = |rows: HeadRows| rows == HeadRows::heads_major(tokens, c.head_dim);
        if c.rope.is_some()
            || c.qk_norm.is_some()
            || !contiguous(c.q.rows)
            || !contiguous(c.k.rows)
            || !contiguous(c.v.rows)
        {
            return Err(bad("the executor gave a library backend strided or RoPE-fused operands".into()));
        }
        if c.mods != Default::default() {
            return Err(bad("a library backend cannot apply a sliding window or soft-cap".into()));
        }
        let call = ffi::DeviceAttentionCall {
            layer: c.layer,
            scale: c.scale,
            heads: c.heads,
            kv_heads: c.kv_heads,
            tokens,
            head_dim: c.head_dim,
            dtype: device_dtype(c.dtype).map_err(bad)?,
            q: c.q.ptr,
            k: c.k.ptr,
            v: c.v.ptr,
            out: c.out,
            k_cache: c.k_cache,
            v_cache: c.v_cache,
            seqs: self.seqs,
            page_size: c.step.page_size,
            token_seq: c.step.token_seq,
            token_pos: c.step.token_pos,
            page_indptr: c.step.page_indptr,
            page_indices: c.step.page_indices,
            seq_start: c.step.seq_start,
            cached_len: c.step.cached_len,
        };
        let mut launcher = SourceLauncher { gpu, what: self.what.clone(), flags: 0, scratch: vec![] };
        let mut host = HostLauncher(&mut launcher);
        match self.inner.attend(call, ffi::CudaLauncher_TO::from_ptr(&mut host, TD_Opaque)) {
            RResult::ROk(()) => Ok(HeadRows::heads_major(tokens, c.head_dim)),
            RResult::RErr(e) => Err(bad(e.into_string())),
        }
    }
}
