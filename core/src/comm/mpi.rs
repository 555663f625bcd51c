//! Ranks that are processes started by `mpirun`: MPI's library loaded at run time (like
//! cuBLAS: the binary runs without MPI installed, and MPI is needed only to launch ranks), Open
//! MPI (`libmpi.so.40`) or MPICH (`libmpi.so.12`). The two differ in how they name the world
//! communicator, the datatypes and the sum (Open MPI: addresses of its exported objects; MPICH:
//! integer constants); every handle travels as a pointer-sized argument, which both ABIs read.
//!
//! `all_reduce_sum` gathers every rank's buffer and sums them in rank order on each rank, rather
//! than calling `MPI_Allreduce`, whose algorithms may round differently on different ranks: the
//! ranks must get the same bits, or their samplers could choose different tokens.

use std::sync::Mutex;

use super::{Communicator, Wait};

type Handle = usize;
type InitThread = unsafe extern "C" fn(*mut i32, *mut *mut *mut i8, i32, *mut i32) -> i32;
type Initialized = unsafe extern "C" fn(*mut i32) -> i32;
type CommInt = unsafe extern "C" fn(Handle, *mut i32) -> i32;
type Allgather = unsafe extern "C" fn(*const u8, i32, Handle, *mut u8, i32, Handle, Handle) -> i32;
type Finalize = unsafe extern "C" fn() -> i32;
type Bcast = unsafe extern "C" fn(*mut u8, i32, Handle, i32, Handle) -> i32;
type Ibcast = unsafe extern "C" fn(*mut u8, i32, Handle, i32, Handle, *mut Handle) -> i32;
type Test = unsafe extern "C" fn(*mut Handle, *mut i32, *mut u64) -> i32;
type WaitReq = unsafe extern "C" fn(*mut Handle, *mut u64) -> i32;

/// Whether this process was started by an MPI launcher (its rank variables are set).
pub fn launched() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"].iter().any(|v| std::env::var_os(v).is_some())
}

pub struct Mpi {
    rank: usize,
    world: usize,
    comm: Handle,
    byte: Handle,
    allgather: Allgather,
    bcast: Bcast,
    ibcast: Ibcast,
    test: Test,
    wait: WaitReq,
    finalize: Finalize,
    finished: std::sync::atomic::AtomicBool,
    /// MPI with `MPI_THREAD_SERIALIZED`: one call at a time from any thread.
    turn: Mutex<()>,
    _lib: libloading::Library,
}

/// Initializes MPI (once a process) and returns this rank's communicator over
/// `MPI_COMM_WORLD`; the error says what is missing (the library, a symbol, the thread level).
pub fn init() -> Result<Mpi, String> {
    let names = ["libmpi.so.40", "libmpi.so.12", "libmpi.so"];
    // SAFETY: loading MPI's shared library runs its initialisers, which have no preconditions.
    let lib = names.iter().find_map(|n| unsafe { libloading::Library::new(n) }.ok()).ok_or_else(|| {
        format!("no MPI library found ({}): install Open MPI (Debian: openmpi-bin) or MPICH", names.join(", "))
    })?;
    // SAFETY: each symbol is looked up with the type the MPI standard gives it (handles as
    // pointer-sized integers, see the module doc); addresses of exported objects are only taken.
    unsafe {
        let sym = |n: &str| -> Result<*const (), String> {
            lib.get::<*const ()>(n.as_bytes()).map(|s| *s).map_err(|e| format!("MPI library: {n}: {e}"))
        };
        let (comm, byte) = match lib.get::<*const ()>(b"ompi_mpi_comm_world") {
            Ok(world) => (*world as Handle, sym("ompi_mpi_byte")? as Handle),
            // MPICH's MPI_COMM_WORLD and MPI_BYTE.
            Err(_) => (0x4400_0000, 0x4c00_010d),
        };
        let initialized: Initialized = std::mem::transmute(sym("MPI_Initialized")?);
        let init_thread: InitThread = std::mem::transmute(sym("MPI_Init_thread")?);
        let rank_of: CommInt = std::mem::transmute(sym("MPI_Comm_rank")?);
        let size_of: CommInt = std::mem::transmute(sym("MPI_Comm_size")?);
        let allgather: Allgather = std::mem::transmute(sym("MPI_Allgather")?);
        let bcast: Bcast = std::mem::transmute(sym("MPI_Bcast")?);
        let ibcast: Ibcast = std::mem::transmute(sym("MPI_Ibcast")?);
        let test: Test = std::mem::transmute(sym("MPI_Test")?);
        let wait: WaitReq = std::mem::transmute(sym("MPI_Wait")?);
        let finalize: Finalize = std::mem::transmute(sym("MPI_Finalize")?);
        let mut flag = 0;
        initialized(&mut flag);
        if flag == 0 {
            const SERIALIZED: i32 = 2;
            let mut provided = 0;
            let rc = init_thread(std::ptr::null_mut(), std::ptr::null_mut(), SERIALIZED, &mut provided);
            if rc != 0 {
                return Err(format!("MPI_Init_thread failed (code {rc})"));
            }
            if provided < SERIALIZED {
                return Err(format!("MPI gives thread level {provided}; autodeploy needs MPI_THREAD_SERIALIZED (2)"));
            }
        }
        let (mut rank, mut world) = (0, 0);
        if rank_of(comm, &mut rank) != 0 || size_of(comm, &mut world) != 0 || world < 1 {
            return Err("MPI_Comm_rank/MPI_Comm_size on MPI_COMM_WORLD failed".into());
        }
        Ok(Mpi {
            rank: rank as usize,
            world: world as usize,
            comm,
            byte,
            allgather,
            bcast,
            ibcast,
            test,
            wait,
            finalize,
            finished: Default::default(),
            turn: Mutex::new(()),
            _lib: lib,
        })
    }
}

impl Communicator for Mpi {
    /// Ends MPI for this process (every rank calls it once, after its last collective). Not
    /// after a failure: a finalize waits for every rank, and the others may be waiting for this
    /// one's next step; exiting without it makes `mpirun` end them all.
    fn finish(&self, ok: bool) {
        if !ok {
            return;
        }
        let _t = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        if !self.finished.swap(true, std::sync::atomic::Ordering::AcqRel) {
            // SAFETY: called once, after every collective of this process.
            unsafe { (self.finalize)() };
        }
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_gather(&self, part: &[u8]) -> Result<Vec<u8>, String> {
        let n =
            i32::try_from(part.len()).map_err(|_| format!("all_gather of {} bytes: past MPI's counts", part.len()))?;
        let mut out = vec![0u8; part.len() * self.world];
        let _t = self.turn()?;
        // SAFETY: `part` holds n bytes, `out` n for each of the world's ranks; the handles are
        // this library's.
        let rc = unsafe { (self.allgather)(part.as_ptr(), n, self.byte, out.as_mut_ptr(), n, self.byte, self.comm) };
        if rc != 0 {
            return Err(format!("MPI_Allgather failed on rank {} (code {rc})", self.rank));
        }
        Ok(out)
    }
    /// A length (8 bytes, waited for as `wait` says), then the bytes. The length goes as a
    /// nonblocking broadcast on every rank (blocking and nonblocking collectives do not match),
    /// tested with growing sleeps between, so an idle follower does not spin a core.
    fn broadcast(&self, data: &[u8], wait: Wait) -> Result<Vec<u8>, String> {
        let mut len = (data.len() as u64).to_le_bytes();
        {
            let _t = self.turn()?;
            let mut req: Handle = 0;
            // Room for either library's MPI_Status.
            let mut status = [0u64; 8];
            // SAFETY: `len` holds 8 bytes, `req` and `status` outlive the request (it completes
            // before they go out of scope: waited or tested to completion below).
            let rc = unsafe { (self.ibcast)(len.as_mut_ptr(), 8, self.byte, 0, self.comm, &mut req) };
            if rc != 0 {
                return Err(format!("MPI_Ibcast failed on rank {} (code {rc})", self.rank));
            }
            if self.rank == 0 || wait == Wait::Bounded {
                // SAFETY: as above.
                let rc = unsafe { (self.wait)(&mut req, status.as_mut_ptr()) };
                if rc != 0 {
                    return Err(format!("MPI_Wait failed on rank {} (code {rc})", self.rank));
                }
            } else {
                let mut pause = std::time::Duration::from_micros(20);
                let started = std::time::Instant::now();
                loop {
                    let mut done = 0;
                    // SAFETY: as above.
                    let rc = unsafe { (self.test)(&mut req, &mut done, status.as_mut_ptr()) };
                    if rc != 0 {
                        return Err(format!("MPI_Test failed on rank {} (code {rc})", self.rank));
                    }
                    if done != 0 {
                        break;
                    }
                    // Busy for the first millisecond (steps come back to back while serving),
                    // then sleeps growing to 2 ms.
                    if started.elapsed() > std::time::Duration::from_millis(1) {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(std::time::Duration::from_millis(2));
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        let n = u64::from_le_bytes(len);
        let count = i32::try_from(n).map_err(|_| format!("broadcast of {n} bytes: past MPI's counts"))?;
        let mut out = if self.rank == 0 { data.to_vec() } else { vec![0u8; count as usize] };
        let _t = self.turn()?;
        // SAFETY: `out` holds `count` bytes on every rank (the length just broadcast).
        let rc = unsafe { (self.bcast)(out.as_mut_ptr(), count, self.byte, 0, self.comm) };
        if rc != 0 {
            return Err(format!("MPI_Bcast failed on rank {} (code {rc})", self.rank));
        }
        Ok(out)
    }
}

impl Mpi {
    /// This rank's turn at the library (one call at a time), refused after `finish`.
    fn turn(&self) -> Result<std::sync::MutexGuard<'_, ()>, String> {
        let t = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        if self.finished.load(std::sync::atomic::Ordering::Acquire) {
            return Err(format!("rank {}: MPI is finalized; no more collectives", self.rank));
        }
        Ok(t)
    }
}
