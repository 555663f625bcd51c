//! Linear layers on the GPU through cuBLAS (f32 accumulation for every dtype).

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::Unavailable;

/// A cuBLAS handle on `stream`, or why there is none (the library is loaded at run time).
pub fn handle(stream: std::sync::Arc<cudarc::driver::CudaStream>) -> Result<CudaBlas, Unavailable> {
    // SAFETY: only tries to dlopen the library by name.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(Unavailable("the cuBLAS library (libcublas) was not found; it ships with the CUDA toolkit".into()));
    }
    CudaBlas::new(stream).map_err(|e| Unavailable(format!("cuBLAS did not start: {e:?}")))
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`, all row-major (torch's `linear` without bias), for `T` in
/// f32, f16, bf16.
///
/// cuBLAS is column-major: row-major `y` is column-major `yᵀ [n, m]`, so this asks for
/// `yᵀ = w · xᵀ`, with `w` read transposed from its row-major storage.
pub fn linear<T>(
    blas: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
) -> Result<(), Unavailable>
where
    CudaBlas: Gemm<T>,
    T: Zero,
    CudaSlice<T>: DevicePtr<T> + DevicePtrMut<T>,
{
    if x.len() < m * k || w.len() < n * k || y.len() < m * n {
        return Err(Unavailable(format!(
            "linear {m}x{k} · ({n}x{k})ᵀ: buffers of {}, {}, {} elements are too small",
            x.len(),
            w.len(),
            y.len()
        )));
    }
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: T::one(),
        lda: k as i32,
        ldb: k as i32,
        beta: T::zero(),
        ldc: n as i32,
    };
    // SAFETY: the sizes were checked above against the dimensions cuBLAS reads and writes.
    unsafe { blas.gemm(cfg, w, x, y) }.map_err(|e| Unavailable(format!("cuBLAS gemm {m}x{n}x{k}: {e:?}")))
}

/// The scalars a GEMM needs.
pub trait Zero: Copy {
    fn zero() -> Self;
    fn one() -> Self;
}

impl Zero for f32 {
    fn zero() -> f32 {
        0.0
    }
    fn one() -> f32 {
        1.0
    }
}

impl Zero for half::bf16 {
    fn zero() -> half::bf16 {
        half::bf16::ZERO
    }
    fn one() -> half::bf16 {
        half::bf16::ONE
    }
}

impl Zero for half::f16 {
    fn zero() -> half::f16 {
        half::f16::ZERO
    }
    fn one() -> half::f16 {
        half::f16::ONE
    }
}
