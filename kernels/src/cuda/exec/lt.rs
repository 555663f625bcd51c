//! The FP8 GEMM on tensor cores through cuBLASLt (sm_89+): `acc[m, n] = xq[m, k] · w[n, k]ᵀ`
//! over E4M3 bytes, f32 out, no scales (the FP8 linear's epilogue applies them, as on the
//! dequantizing path). cuBLASLt's FP8 kernels want the "TN" layout, which row-major operands
//! give directly: in column-major terms the weight is `k × n` read transposed and the
//! activations `k × m` read as they are, and the `n × m` result is `acc` row-major.
//!
//! A plan (descriptors, layouts and the heuristic's algorithm) is made once per shape, on the
//! host, so a step captured in a CUDA graph only enqueues the matmul. Off unless
//! `[kernels] fp8_gemm_cublaslt = true` (not yet measured against the dequantizing path).

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::cublaslt::{result as lt, sys};

use crate::cuda::Unavailable;

fn err(what: &str, e: impl std::fmt::Debug) -> Unavailable {
    Unavailable(format!("cuBLASLt FP8 GEMM: {what}: {e:?}"))
}

/// One shape's descriptors and algorithm.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Plan {
    fn new(handle: sys::cublasLtHandle_t, m: usize, n: usize, k: usize, workspace: usize) -> Result<Plan, Unavailable> {
        use sys::cudaDataType::{CUDA_R_32F, CUDA_R_8F_E4M3};
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
            .map_err(|e| err("matmul descriptor", e))?;
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        use cudarc::cublas::sys::cublasOperation_t as Op;
        let (t, no) = (Op::CUBLAS_OP_T, Op::CUBLAS_OP_N);
        // SAFETY: the descriptor is live; each attribute's value is the type cuBLASLt reads.
        unsafe {
            for (attr, op) in [
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &t),
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &no),
            ] {
                lt::set_matmul_desc_attribute(plan.desc, attr, op as *const _ as *const _, std::mem::size_of_val(op))
                    .map_err(|e| err("transposes", e))?;
            }
        }
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        // A: the weight, k × n column-major (its rows), read transposed; B: the activations,
        // k × m; D: n × m, acc row-major [m, n].
        plan.a = lt::create_matrix_layout(CUDA_R_8F_E4M3, k64, n64, k as i64).map_err(|e| err("A layout", e))?;
        plan.b = lt::create_matrix_layout(CUDA_R_8F_E4M3, k64, m64, k as i64).map_err(|e| err("B layout", e))?;
        plan.d = lt::create_matrix_layout(CUDA_R_32F, n64, m64, n as i64).map_err(|e| err("D layout", e))?;
        let pref = lt::create_matmul_pref().map_err(|e| err("preference", e))?;
        // SAFETY: every descriptor is live; the preference is destroyed after the query.
        let found = unsafe {
            let ws = workspace as u64;
            let set = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const _,
                std::mem::size_of::<u64>(),
            );
            let found = set
                .and_then(|_| lt::get_matmul_algo_heuristic(handle, plan.desc, plan.a, plan.b, plan.d, plan.d, pref));
            let _ = lt::destroy_matmul_pref(pref);
            found
        };
        plan.algo = found.map_err(|e| err(&format!("no algorithm for m={m} n={n} k={k}"), e))?.algo;
        Ok(plan)
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created here and is destroyed once; a null one is skipped.
        unsafe {
            for l in [self.a, self.b, self.d] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle and its plans by shape.
pub struct LtFp8 {
    handle: sys::cublasLtHandle_t,
    plans: Mutex<HashMap<(usize, usize, usize), Plan>>,
}

// SAFETY: the handle and descriptors are used under the plans' lock or by one stream's
// enqueues; cuBLASLt handles may be used from any thread.
unsafe impl Send for LtFp8 {}
unsafe impl Sync for LtFp8 {}

impl LtFp8 {
    /// A handle, or why there is none (no libcublasLt).
    pub fn new() -> Result<LtFp8, Unavailable> {
        // SAFETY: only tries to dlopen the library by name.
        if !unsafe { sys::is_culib_present() } {
            return Err(Unavailable("cuBLASLt FP8 GEMM: libcublasLt could not be loaded".into()));
        }
        let handle = lt::create_handle().map_err(|e| err("handle", e))?;
        Ok(LtFp8 { handle, plans: Mutex::new(HashMap::new()) })
    }

    /// Enqueues `acc[m, n] (f32) = xq[m, k] · w[n, k]ᵀ` (E4M3 bytes, rows 16-byte aligned,
    /// k % 16 == 0) on `stream`, with `workspace` bytes at `ws`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        stream: cudarc::driver::sys::CUstream,
        m: usize,
        n: usize,
        k: usize,
        xq: u64,
        w: u64,
        acc: u64,
        ws: u64,
        workspace: usize,
    ) -> Result<(), Unavailable> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let plan = match plans.entry((m, n, k)) {
            std::collections::hash_map::Entry::Occupied(p) => p.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Plan::new(self.handle, m, n, k, workspace)?),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the plan's layouts describe these buffers (w n·k bytes, xq m·k bytes, acc
        // m·n f32, the workspace `workspace` bytes), all device memory live for the stream's
        // work; alpha and beta are host scalars read during the call.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const _,
                &beta as *const f32 as *const _,
                w as *const _,
                plan.a,
                xq as *const _,
                plan.b,
                acc as *const _,
                plan.d,
                acc as *mut _,
                plan.d,
                &plan.algo,
                ws as *mut _,
                workspace,
                stream as sys::cudaStream_t,
            )
        }
        .map_err(|e| err(&format!("matmul m={m} n={n} k={k}"), e))?;
        super::count_launch("cublaslt_fp8");
        Ok(())
    }
}

impl Drop for LtFp8 {
    fn drop(&mut self) {
        self.plans.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // SAFETY: created in `new`, destroyed once, after its plans.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
