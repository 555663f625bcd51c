//! The FP8 GEMM on tensor cores through cuBLASLt (sm_89+): `acc[m, n] = xq[m, k] · w[n, k]ᵀ`
//! over E4M3 bytes, either f32 out without scales (the FP8 linear's epilogue applies them, as on
//! the dequantizing path) or bf16 out with cuBLASLt applying the weight's and the activations'
//! scales itself (`LtOut::Bf16Scaled`: one launch, half the output bytes, no epilogue; per
//! output channel or per activation row through its "outer vector" scale mode where the
//! library has an algorithm for it, else the caller falls back to the f32 sums). cuBLASLt's FP8
//! kernels want the "TN" layout, which row-major operands
//! give directly: in column-major terms the weight is `k × n` read transposed and the
//! activations `k × m` read as they are, and the `n × m` result is `acc` row-major.
//!
//! A plan (descriptors, layouts and the heuristic's algorithm) is made once per shape, on the
//! host, so a step captured in a CUDA graph only enqueues the matmul (the scale pointers are
//! descriptor attributes set just before it). `[kernels] fp8_gemm_cublaslt` (on by default).

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::cublaslt::{result as lt, sys};

use crate::cuda::Unavailable;

fn err(what: &str, e: impl std::fmt::Debug) -> Unavailable {
    Unavailable(format!("cuBLASLt FP8 GEMM: {what}: {e:?}"))
}

/// What a plan's GEMM writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LtOut {
    /// f32 sums, no scales.
    F32Sums,
    /// bf16, scaled by the weight's scale (one f32, or one an output channel: `weight_rows`)
    /// and the activations' (one, or one a row: `input_rows`), both read from device memory.
    Bf16Scaled { weight_rows: bool, input_rows: bool },
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
    fn new(
        handle: sys::cublasLtHandle_t,
        (m, n, k): (usize, usize, usize),
        ldd: usize,
        out: LtOut,
        workspace: usize,
        fast_accum: bool,
    ) -> Result<Plan, Unavailable> {
        use sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F, CUDA_R_8F_E4M3};
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
        if fast_accum {
            let on = 1i8;
            // SAFETY: the descriptor is live; the attribute is an int8.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                    &on as *const i8 as *const _,
                    1,
                )
                .map_err(|e| err("fast accumulation", e))?;
            }
        }
        if let LtOut::Bf16Scaled { weight_rows, input_rows } = out {
            use sys::cublasLtMatmulDescAttributes_t::{
                CUBLASLT_MATMUL_DESC_A_SCALE_MODE, CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
            };
            use sys::cublasLtMatmulMatrixScale_t::{
                CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as VEC, CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F as ONE,
            };
            // A is the weight (its rows of op(A) the output channels), B the activations (the
            // columns of op(B) their rows).
            for (attr, rows) in
                [(CUBLASLT_MATMUL_DESC_A_SCALE_MODE, weight_rows), (CUBLASLT_MATMUL_DESC_B_SCALE_MODE, input_rows)]
            {
                let mode = (if rows { VEC } else { ONE }) as u32;
                // SAFETY: the descriptor is live; the scale mode is a 32-bit enum.
                unsafe {
                    lt::set_matmul_desc_attribute(plan.desc, attr, &mode as *const u32 as *const _, 4)
                        .map_err(|e| err("scale mode", e))?;
                }
            }
        }
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        // A: the weight, k × n column-major (its rows), read transposed; B: the activations,
        // k × m; D: n × m, acc row-major [m, n].
        plan.a = lt::create_matrix_layout(CUDA_R_8F_E4M3, k64, n64, k as i64).map_err(|e| err("A layout", e))?;
        plan.b = lt::create_matrix_layout(CUDA_R_8F_E4M3, k64, m64, k as i64).map_err(|e| err("B layout", e))?;
        let d_type = if out == LtOut::F32Sums { CUDA_R_32F } else { CUDA_R_16BF };
        plan.d = lt::create_matrix_layout(d_type, n64, m64, ldd as i64).map_err(|e| err("D layout", e))?;
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
        plan.algo = found.map_err(|e| err(&format!("no algorithm for m={m} n={n} k={k} {out:?}"), e))?.algo;
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

/// (m, n, k), the output's row stride and what the GEMM writes.
type PlanKey = (usize, usize, usize, usize, LtOut);

/// A cuBLASLt handle and its plans by shape and output; `None`: the library has no algorithm
/// for that one (asked once).
pub struct LtFp8 {
    handle: sys::cublasLtHandle_t,
    plans: Mutex<HashMap<PlanKey, Option<Plan>>>,
    /// cuBLASLt's fast FP8 accumulation (`CUBLASLT_MATMUL_DESC_FAST_ACCUM`): the tensor cores'
    /// sums without its periodic promotion to f32 (`[kernels] fp8_gemm_fast_accum`).
    fast_accum: bool,
}

// SAFETY: the handle and descriptors are used under the plans' lock or by one stream's
// enqueues; cuBLASLt handles may be used from any thread.
unsafe impl Send for LtFp8 {}
unsafe impl Sync for LtFp8 {}

/// A GEMM's device buffers: E4M3 activations `xq` `[m, k]` and weight `w` `[n, k]` (rows
/// 16-byte aligned, k % 16 == 0), the output `[m, n]` (f32 or bf16 as the plan's `LtOut`), and
/// the scales (`LtOut::Bf16Scaled`: the weight's, the activations'; else unused).
#[derive(Clone, Copy, Debug)]
pub struct LtOperands {
    pub xq: u64,
    pub w: u64,
    pub out: u64,
    pub w_scale: u64,
    pub x_scale: u64,
}

impl LtFp8 {
    /// A handle, or why there is none (no libcublasLt).
    pub fn new(fast_accum: bool) -> Result<LtFp8, Unavailable> {
        // SAFETY: only tries to dlopen the library by name.
        if !unsafe { sys::is_culib_present() } {
            return Err(Unavailable("cuBLASLt FP8 GEMM: libcublasLt could not be loaded".into()));
        }
        let handle = lt::create_handle().map_err(|e| err("handle", e))?;
        Ok(LtFp8 { handle, plans: Mutex::new(HashMap::new()), fast_accum })
    }

    /// Enqueues `out[m, n] = xq[m, k] · w[n, k]ᵀ` as `kind` says on `stream`, with `workspace`
    /// bytes at `ws`; `out`'s rows `ldd` elements apart (n: a whole output; more: these are
    /// some columns of a wider one). `Ok(false)`: cuBLASLt has no algorithm for a `Bf16Scaled` kind at this
    /// shape (nothing enqueued; the caller takes the f32 sums and its epilogue). An f32 plan
    /// that cannot be made is an error.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        stream: cudarc::driver::sys::CUstream,
        (m, n, k): (usize, usize, usize),
        ldd: usize,
        kind: LtOut,
        o: LtOperands,
        ws: u64,
        workspace: usize,
    ) -> Result<bool, Unavailable> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if ldd < n {
            return Err(err("output", format!("row stride {ldd} under its {n} columns")));
        }
        let plan = match plans.entry((m, n, k, ldd, kind)) {
            std::collections::hash_map::Entry::Occupied(p) => p.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                match Plan::new(self.handle, (m, n, k), ldd, kind, workspace, self.fast_accum) {
                    Ok(p) => v.insert(Some(p)),
                    Err(e) if kind != LtOut::F32Sums => {
                        tracing::debug!("{}; the f32 sums and the epilogue instead", e.0);
                        v.insert(None)
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let Some(plan) = plan.as_ref() else { return Ok(false) };
        if kind != LtOut::F32Sums {
            use sys::cublasLtMatmulDescAttributes_t::{
                CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
            };
            for (attr, ptr) in
                [(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &o.w_scale), (CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &o.x_scale)]
            {
                // SAFETY: the descriptor is live (under the plans' lock); the attribute is a
                // device pointer, read when the matmul below is enqueued.
                unsafe { lt::set_matmul_desc_attribute(plan.desc, attr, ptr as *const u64 as *const _, 8) }
                    .map_err(|e| err("scale pointer", e))?;
            }
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the plan's layouts describe these buffers (w n·k bytes, xq m·k bytes, out
        // m·n of the plan's type, the scales one f32 or one a row/channel, the workspace
        // `workspace` bytes), all device memory live for the stream's work; alpha and beta are
        // host scalars read during the call.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const _,
                &beta as *const f32 as *const _,
                o.w as *const _,
                plan.a,
                o.xq as *const _,
                plan.b,
                o.out as *const _,
                plan.d,
                o.out as *mut _,
                plan.d,
                &plan.algo,
                ws as *mut _,
                workspace,
                stream as sys::cudaStream_t,
            )
        }
        .map_err(|e| err(&format!("matmul m={m} n={n} k={k} {kind:?}"), e))?;
        super::count_launch(if kind == LtOut::F32Sums { "cublaslt_fp8" } else { "cublaslt_fp8_scaled" });
        Ok(true)
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
