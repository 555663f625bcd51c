//! NCCL, the GPUs' collectives, loaded at run time like cuBLAS (`libnccl.so.2`, as NVIDIA's
//! packages and PyTorch's wheels install it; `LD_LIBRARY_PATH` finds a wheel's copy): a
//! communicator over ranks that share a unique id, and the sum all-reduce on a `Gpu`'s stream.
//! The ranks' launcher hands the id from rank 0 to the others (over MPI); one rank makes its own.

use std::ffi::{c_char, c_int, c_void};

use super::exec::{Dt, Gpu, Ptr};
use super::Unavailable;

/// `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId(pub [u8; 128]);

type Comm = *mut c_void;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int;
type AllGather = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, *mut c_void) -> c_int;
type CommDestroy = unsafe extern "C" fn(Comm) -> c_int;
type CommAbort = unsafe extern "C" fn(Comm) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

struct Lib {
    get_unique_id: GetUniqueId,
    init_rank: CommInitRank,
    all_reduce: AllReduce,
    all_gather: AllGather,
    destroy: CommDestroy,
    abort: CommAbort,
    error: ErrorString,
    _lib: libloading::Library,
}

fn lib() -> Result<&'static Lib, Unavailable> {
    static LIB: std::sync::OnceLock<Result<Lib, String>> = std::sync::OnceLock::new();
    let l = LIB.get_or_init(|| {
        let names = ["libnccl.so.2", "libnccl.so"];
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        let lib = names
            .iter()
            .find_map(|n| unsafe { libloading::Library::new(n) }.ok())
            .ok_or_else(|| format!("NCCL not found ({}; put its folder on LD_LIBRARY_PATH)", names.join(", ")))?;
        // SAFETY: each symbol is taken with the type nccl.h declares for it.
        unsafe {
            let f = |n: &str| lib.get::<*const ()>(n.as_bytes()).map(|s| *s).map_err(|e| format!("NCCL: {n}: {e}"));
            Ok(Lib {
                get_unique_id: std::mem::transmute::<*const (), GetUniqueId>(f("ncclGetUniqueId")?),
                init_rank: std::mem::transmute::<*const (), CommInitRank>(f("ncclCommInitRank")?),
                all_reduce: std::mem::transmute::<*const (), AllReduce>(f("ncclAllReduce")?),
                all_gather: std::mem::transmute::<*const (), AllGather>(f("ncclAllGather")?),
                destroy: std::mem::transmute::<*const (), CommDestroy>(f("ncclCommDestroy")?),
                abort: std::mem::transmute::<*const (), CommAbort>(f("ncclCommAbort")?),
                error: std::mem::transmute::<*const (), ErrorString>(f("ncclGetErrorString")?),
                _lib: lib,
            })
        }
    });
    l.as_ref().map_err(|e| Unavailable(e.clone()))
}

fn check(l: &Lib, what: &str, rc: c_int) -> Result<(), Unavailable> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: NCCL returns a static string for any code.
    let msg = unsafe { std::ffi::CStr::from_ptr((l.error)(rc)) }.to_string_lossy().into_owned();
    Err(Unavailable(format!("{what}: {msg} (NCCL code {rc})")))
}

/// Whether the NCCL library loads here.
pub fn available() -> bool {
    lib().is_ok()
}

/// A new unique id (rank 0 makes it; the others receive it).
pub fn unique_id() -> Result<UniqueId, Unavailable> {
    let l = lib()?;
    let mut id = UniqueId([0; 128]);
    // SAFETY: `id` is a writable ncclUniqueId.
    check(l, "ncclGetUniqueId", unsafe { (l.get_unique_id)(&mut id) })?;
    Ok(id)
}

/// One rank's NCCL communicator, on the GPU of the `Gpu` it was made with.
pub struct Nccl {
    comm: Comm,
    pub rank: usize,
    pub world: usize,
    /// Set once the communicator was aborted (it is then not destroyed again).
    aborted: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

// SAFETY: the communicator is used from one thread at a time (the executor's), as NCCL allows.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins the `world` ranks sharing `id` as `rank` (blocks until all have joined), on `gpu`'s
    /// device.
    pub fn init(gpu: &Gpu, id: UniqueId, rank: usize, world: usize) -> Result<Nccl, Unavailable> {
        let l = lib()?;
        gpu.bind()?;
        let mut comm: Comm = std::ptr::null_mut();
        let (n, r) = (world as c_int, rank as c_int);
        // SAFETY: `comm` is writable; the GPU's context is current on this thread.
        check(l, "ncclCommInitRank", unsafe { (l.init_rank)(&mut comm, n, id, r) })?;
        Ok(Nccl { comm, rank, world, aborted: Default::default() })
    }

    /// What aborts this communicator from another thread (once; later calls do nothing): NCCL
    /// then ends its kernels waiting on a rank that died, so a stream waiting on them returns.
    pub fn aborter(&self) -> impl Fn() + Send + Sync + 'static {
        let (comm, aborted) = (self.comm as usize, self.aborted.clone());
        move || {
            if aborted.swap(true, std::sync::atomic::Ordering::AcqRel) {
                return;
            }
            if let Ok(l) = lib() {
                // SAFETY: the communicator lives until `Nccl`'s drop, which skips it once
                // aborted; ncclCommAbort may be called from any thread.
                unsafe { (l.abort)(comm as Comm) };
            }
        }
    }

    /// `recv[i] = Σ_ranks send[i]` for `n` values of `dt` (in place when `send == recv`),
    /// queued on `gpu`'s stream.
    pub fn all_reduce_sum(&self, gpu: &Gpu, send: Ptr, recv: Ptr, n: usize, dt: Dt) -> Result<(), Unavailable> {
        let l = lib()?;
        // ncclDataType_t: ncclFloat16 6, ncclFloat32 7, ncclBfloat16 9; ncclSum 0.
        let t = match dt {
            Dt::F16 => 6,
            Dt::F32 => 7,
            Dt::BF16 => 9,
            _ => return Err(Unavailable(format!("all_reduce of {dt:?} values"))),
        };
        let stream = gpu.raw_stream();
        // SAFETY: send and recv hold n values of dt on this communicator's GPU; the stream is
        // that GPU's.
        let rc = unsafe { (l.all_reduce)(send as *const c_void, recv as *mut c_void, n, t, 0, self.comm, stream) };
        check(l, "ncclAllReduce", rc)
    }
}

impl Nccl {
    /// `recv` = every rank's `bytes` bytes at `send`, in rank order (`world * bytes` bytes),
    /// queued on `gpu`'s stream.
    pub fn all_gather_bytes(&self, gpu: &Gpu, send: Ptr, recv: Ptr, bytes: usize) -> Result<(), Unavailable> {
        let l = lib()?;
        let stream = gpu.raw_stream();
        // SAFETY: send holds `bytes`, recv `world * bytes` on this communicator's GPU
        // (ncclUint8 = 1); the stream is that GPU's.
        let rc = unsafe { (l.all_gather)(send as *const c_void, recv as *mut c_void, bytes, 1, self.comm, stream) };
        check(l, "ncclAllGather", rc)
    }
}

/// How a GPU's collectives reach the other ranks of its group: NCCL, or, where NCCL cannot
/// (ranks that share a GPU, no NCCL library), through the host: the stream waited for, the
/// values copied out, the host communicator's collective, the result copied back (a step with
/// them is not captured in a CUDA graph).
pub enum Collectives {
    Nccl(Nccl),
    Host,
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if self.aborted.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        if let Ok(l) = lib() {
            // SAFETY: the communicator is this value's, destroyed once.
            unsafe { (l.destroy)(self.comm) };
        }
    }
}
