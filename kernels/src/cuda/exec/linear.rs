//! The dense linears' launches: the bf16 decode GEMVs (`graph.cu`'s `gemv_bf16_*`, the SwiGLU
//! epilogue variant `gemv_swiglu_bf16*`) and cuBLAS for the rest.

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::LaunchConfig;

use super::{launched, Dt, Gpu, Ptr};
use crate::cuda::Unavailable;

impl Gpu {
    /// The decode GEMV (bf16, m in 1, 2, 4, 8, k % 8 == 0, 16-byte aligned) when it applies:
    /// `Ok(false)` means use `linear`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv(
        &self,
        dt: Dt,
        m: usize,
        n: usize,
        k: usize,
        x: Ptr,
        w: Ptr,
        y: Ptr,
        accumulate: bool,
    ) -> Result<bool, Unavailable> {
        let i = match m {
            1 => 0,
            2 => 1,
            4 => 2,
            8 => 3,
            _ => return Ok(false),
        };
        if dt != Dt::BF16 || !k.is_multiple_of(8) || !(x | w).is_multiple_of(16) {
            return Ok(false);
        }
        let (n32, k32, acc) = (n as i32, k as i32, accumulate as i32);
        let pf = self.prefetch_bytes(k);
        let (f, rows_per_block) = match (m, self.gemv_split) {
            (1, 2) => (self.f.gemv_bf16_split[0], 4),
            (1, 4) => (self.f.gemv_bf16_split[1], 2),
            _ => (self.f.gemv_bf16[i], 8),
        };
        let mut l = self.launcher(f);
        l.arg(&x).arg(&w).arg(&y).arg(&n32).arg(&k32).arg(&acc).arg(&pf);
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(rows_per_block), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x [m, k], w [n, k], y [m, n] as the caller's tensors; alignment checked.
        launched("gemv_bf16", unsafe { l.launch(cfg) }.map(|_| ()))?;
        Ok(true)
    }

    /// Bytes of each weight row of `k` bf16 a GEMV prefetches (see `prefetch_row`).
    fn prefetch_bytes(&self, k: usize) -> i32 {
        self.prefetch_row.min(k * 2) as i32
    }

    /// One bf16 row through a fused gate/up weight `[2·inter, k]` with the SwiGLU activation as
    /// the epilogue: `out[inter] = silu(gate) * up`. `Ok(false)`: does not apply.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_swiglu(
        &self,
        dt: Dt,
        m: usize,
        inter: usize,
        k: usize,
        x: Ptr,
        w: Ptr,
        out: Ptr,
    ) -> Result<bool, Unavailable> {
        if dt != Dt::BF16 || m != 1 || !k.is_multiple_of(8) || !(x | w).is_multiple_of(16) {
            return Ok(false);
        }
        let (i32_, k32) = (inter as i32, k as i32);
        let pf = self.prefetch_bytes(k);
        let (f, outs_per_block) = match self.swiglu_split {
            2 => (self.f.gemv_swiglu_bf16_split[0], 4),
            4 => (self.f.gemv_swiglu_bf16_split[1], 2),
            _ => (self.f.gemv_swiglu_bf16, 8),
        };
        let mut l = self.launcher(f);
        l.arg(&x).arg(&w).arg(&out).arg(&i32_).arg(&k32).arg(&pf);
        let cfg = LaunchConfig {
            grid_dim: ((inter as u32).div_ceil(outs_per_block), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x [1, k], w [2·inter, k], out [1, inter]; alignment checked.
        launched("gemv_swiglu_bf16", unsafe { l.launch(cfg) }.map(|_| ()))?;
        Ok(true)
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ y when `accumulate`)`, row-major, f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        dt: Dt,
        m: usize,
        n: usize,
        k: usize,
        x: Ptr,
        w: Ptr,
        y: Ptr,
        accumulate: bool,
    ) -> Result<(), Unavailable> {
        self.gemm(dt, dt, m, n, k, x, w, y, accumulate)
    }

    /// `y[m, n] (+)= x[m, k] · w[n, k]ᵀ` with x and w of `dt` and y of `out`, through cuBLAS
    /// (f32 sums). Column-major view: yᵀ [n, m] = w [k, n]ᵀ-read · xᵀ [k, m].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        dt: Dt,
        out: Dt,
        m: usize,
        n: usize,
        k: usize,
        x: Ptr,
        w: Ptr,
        y: Ptr,
        accumulate: bool,
    ) -> Result<(), Unavailable> {
        use blas_sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
        let ty = |d: Dt| match d {
            Dt::F32 => Ok(cudaDataType::CUDA_R_32F),
            Dt::BF16 => Ok(cudaDataType::CUDA_R_16BF),
            Dt::F16 => Ok(cudaDataType::CUDA_R_16F),
            _ => Err(Unavailable(format!("linear over {d:?} has no cuBLAS type"))),
        };
        let (tin, tout) = (ty(dt)?, ty(out)?);
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        // SAFETY: sizes are the callers' tensors' (checked by the op rules at build time).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                tin,
                k as i32,
                x as *const _,
                tin,
                k as i32,
                &beta as *const f32 as *const _,
                y as *mut _,
                tout,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Unavailable(format!("cuBLAS linear {m}x{k} · ({n}x{k})ᵀ ({dt:?} to {out:?}): {e:?}")))
    }
}
