//! `naive` on the GPU: the CUDA side of the example attention backend (the kernels of
//! `naive_attention.cu`, compiled and launched by the host). Two launches a layer: this step's
//! k/v into their cache slots, then one block per (token, head) that attends position by
//! position. Correct and plain; the built-in `flashinfer` is what to run for speed.

use autodeploy_sdk::abi_stable::std_types::{RResult, RStr, RString};
use autodeploy_sdk::ffi::{
    cuda_attention_backend_box, CudaAttentionBackend, CudaAttentionBackendBox, CudaLauncherRef, DeviceAttentionCall,
    DeviceDtype, Dim3, KernelArg, StepInfo,
};

const SOURCE: &str = include_str!("naive_attention.cu");

/// Option `max_positions` as on the CPU side: the longest span a query may attend over.
struct NaiveCuda {
    max_positions: usize,
}

/// Makes the CUDA side from the backend's options (the same text the CPU side gets).
pub extern "C" fn new_naive_cuda(options: RStr<'_>) -> RResult<CudaAttentionBackendBox, RString> {
    match super::max_positions(options.as_str()) {
        Ok(max_positions) => RResult::ROk(cuda_attention_backend_box(NaiveCuda { max_positions })),
        Err(e) => RResult::RErr(e.into()),
    }
}

impl CudaAttentionBackend for NaiveCuda {
    /// The host's view of the step: checked here, once, before any kernel runs.
    fn begin_step(&mut self, step: StepInfo<'_>) -> RResult<(), RString> {
        for (tok, &pos) in step.token_pos.iter().enumerate() {
            if self.max_positions > 0 && pos >= self.max_positions {
                return RResult::RErr(
                    format!("token {tok} at position {pos} is past max_positions = {}", self.max_positions).into(),
                );
            }
        }
        RResult::ROk(())
    }

    fn attend(&self, c: DeviceAttentionCall, mut gpu: CudaLauncherRef<'_>) -> RResult<(), RString> {
        let (h, kvh, t, d) = (c.heads, c.kv_heads, c.tokens, c.head_dim);
        if h == 0 || kvh == 0 || h % kvh != 0 {
            return RResult::RErr(format!("{h} query heads cannot share {kvh} kv heads").into());
        }
        if d == 0 || d > 1024 {
            return RResult::RErr(format!("head_dim {d}: this kernel takes 1..=1024").into());
        }
        let name = match c.dtype {
            DeviceDtype::F32 => "f32",
            DeviceDtype::BF16 => "bf16",
            other => return RResult::RErr(format!("the naive backend has no {other:?} kernels").into()),
        };
        if t == 0 {
            return RResult::ROk(());
        }
        let meta = [
            KernelArg::ptr(c.token_seq),
            KernelArg::ptr(c.token_pos),
            KernelArg::ptr(c.page_indptr),
            KernelArg::ptr(c.page_indices),
            KernelArg::i32(c.page_size as i32),
        ];
        // This step's keys and values into their slots first (the stream orders the launches).
        let n = kvh * t * d;
        let mut args =
            vec![KernelArg::ptr(c.k), KernelArg::ptr(c.v), KernelArg::ptr(c.k_cache), KernelArg::ptr(c.v_cache)];
        args.extend(meta);
        args.extend([KernelArg::i32(kvh as i32), KernelArg::i64(t as i64), KernelArg::i32(d as i32)]);
        let r = gpu.launch(
            SOURCE.into(),
            format!("naive_write_kv_{name}").as_str().into(),
            Dim3 { x: n.div_ceil(256) as u32, y: 1, z: 1 },
            Dim3 { x: 256, y: 1, z: 1 },
            0,
            args.as_slice().into(),
        );
        if let RResult::RErr(e) = r {
            return RResult::RErr(e);
        }
        let mut args =
            vec![KernelArg::ptr(c.q), KernelArg::ptr(c.k_cache), KernelArg::ptr(c.v_cache), KernelArg::ptr(c.out)];
        args.extend(meta);
        args.extend([
            KernelArg::i32(h as i32),
            KernelArg::i32(kvh as i32),
            KernelArg::i64(t as i64),
            KernelArg::i32(d as i32),
            KernelArg::f32(c.scale),
        ]);
        gpu.launch(
            SOURCE.into(),
            format!("naive_attend_{name}").as_str().into(),
            Dim3 { x: t as u32, y: h as u32, z: 1 },
            Dim3 { x: (d.div_ceil(32) * 32) as u32, y: 1, z: 1 },
            0,
            args.as_slice().into(),
        )
    }
}
