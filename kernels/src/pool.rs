//! A small thread pool for decode-sized work, whose workers spin between jobs.
//!
//! A decode step is a chain of ~100 short parallel kernels (tens of microseconds each) separated
//! by short serial ops. rayon puts idle workers to sleep quickly, and waking one costs more than
//! such a kernel (measured here: a 40 µs job on 2 threads took 100–118 µs after a 0.1–1 ms
//! serial gap). These workers spin for [`SPIN`] after each job, then sleep until the next one.
//! Big GEMMs (prefill) stay on rayon through the `gemm` crate.
//!
//! One job runs at a time: a call made while another is running (from another thread, or from
//! inside a job) runs its chunks on the calling thread instead.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps, and after how long of that it yields its
/// core to other runnable threads (rayon's, during prefill) on every check.
const SPIN: Duration = Duration::from_millis(2);
const SPIN_HOT: Duration = Duration::from_micros(50);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job; workers run each epoch exactly once (the next job waits for them).
    epoch: AtomicU64,
    /// The current job; written before `epoch` is bumped, read after it is seen.
    job: UnsafeCell<Job>,
    chunks: AtomicUsize,
    next: AtomicUsize,
    /// Workers that have not finished the current epoch.
    active: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `submit`, while no worker reads it (all
// finished the previous epoch), and read by workers only between the epoch bump (Release/Acquire)
// and their decrement of `active`, while the submitting thread keeps the closure alive.
unsafe impl Sync for Shared {}

struct Pool {
    shared: &'static Shared,
    workers: usize,
    submit: Mutex<()>,
}

fn noop(_: usize) {}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = rayon::current_num_threads().max(1);
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(&noop as &(dyn Fn(usize) + Sync) as Job),
            chunks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let mut workers = 0;
        for i in 1..threads {
            let spawned =
                std::thread::Builder::new().name(format!("autodeploy-pool-{i}")).spawn(move || worker(shared)).is_ok();
            workers += spawned as usize;
        }
        Pool { shared, workers, submit: Mutex::new(()) }
    })
}

/// Claims and runs chunks of the current job until none are left.
fn run_chunks(s: &Shared, job: &(dyn Fn(usize) + Sync)) {
    let n = s.chunks.load(Ordering::Relaxed);
    loop {
        let c = s.next.fetch_add(1, Ordering::Relaxed);
        if c >= n {
            break;
        }
        job(c);
    }
}

fn worker(s: &'static Shared) {
    let mut seen = 0u64;
    loop {
        // Spin, then sleep, until a new epoch is published.
        let start = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN_HOT {
                std::thread::yield_now();
            }
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        }
        seen = s.epoch.load(Ordering::Acquire);
        // SAFETY: see `Shared`: the submitter keeps the job alive until `active` reaches 0.
        let job = unsafe { &**s.job.get() };
        if catch_unwind(AssertUnwindSafe(|| run_chunks(s, job))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.active.fetch_sub(1, Ordering::Release);
    }
}

/// Threads the pool runs jobs on (the caller's included).
pub fn threads() -> usize {
    pool().workers + 1
}

/// Calls `f(c)` for every chunk index `c` in `0..chunks`, spread over the pool's threads (the
/// caller's included); returns when all have run. A panic in `f` is re-raised here.
pub fn for_each_chunk(chunks: usize, f: &(dyn Fn(usize) + Sync)) {
    let p = pool();
    let guard = if chunks > 1 && p.workers > 0 { p.submit.try_lock().ok() } else { None };
    let Some(_guard) = guard else {
        (0..chunks).for_each(f);
        return;
    };
    let s = p.shared;
    // SAFETY: no worker reads `job` now (all finished the previous epoch, `active` is 0), and
    // this function does not return before every worker has finished with it.
    unsafe { *s.job.get() = std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
    s.chunks.store(chunks, Ordering::Relaxed);
    s.next.store(0, Ordering::Relaxed);
    s.active.store(p.workers, Ordering::Relaxed);
    s.epoch.fetch_add(1, Ordering::SeqCst);
    if s.sleepers.load(Ordering::SeqCst) > 0 {
        let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    let mine = catch_unwind(AssertUnwindSafe(|| run_chunks(s, f)));
    while s.active.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
    }
    let theirs = s.panicked.swap(false, Ordering::Relaxed);
    if let Err(e) = mine {
        std::panic::resume_unwind(e);
    }
    assert!(!theirs, "a pool worker panicked while running a chunk");
}

/// Calls `f(i, piece)` for the `chunk`-long pieces of `data` (the last may be shorter), on the
/// pool.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    struct Base<T>(*mut T);
    // SAFETY: the pointer is only used to make the disjoint pieces below.
    unsafe impl<T: Send> Sync for Base<T> {}
    let chunk = chunk.max(1);
    let len = data.len();
    let base = Base(data.as_mut_ptr());
    let base = &base;
    for_each_chunk(len.div_ceil(chunk), &|c| {
        let start = c * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: every chunk index runs exactly once, so the pieces are disjoint, and all are
        // within `data`, which is mutably borrowed for the whole call.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
        f(c, piece);
    });
}

/// Fills `y[m, n]` by chunks of `chunk` output channels on the spinning pool (decode-sized
/// work): `dot(i, out, first)` writes activation row `i` against weight rows `first..` into
/// `out`. Each chunk's weight rows stay in cache while every activation row passes over them.
pub(crate) fn by_channel_chunks(
    m: usize,
    n: usize,
    chunk: usize,
    y: &mut [f32],
    dot: impl Fn(usize, &mut [f32], usize) + Sync,
) {
    if m == 1 {
        for_each_chunk_mut(y, chunk, |c, out| dot(0, out, c * chunk));
        return;
    }
    let mut yt = vec![0f32; n * m]; // [n, m], transposed so chunks are contiguous
    for_each_chunk_mut(&mut yt, chunk * m, |c, out| {
        let mut tmp = vec![0f32; out.len() / m];
        for i in 0..m {
            dot(i, &mut tmp, c * chunk);
            for (r, v) in tmp.iter().enumerate() {
                out[r * m + i] = *v;
            }
        }
    });
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = yt[j * m + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_exactly_once_also_from_many_threads() {
        let runs = |n: usize| {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each_chunk(n, &|c| {
                hits[c].fetch_add(1, Ordering::Relaxed);
            });
            hits.iter().all(|h| h.load(Ordering::Relaxed) == 1)
        };
        for n in [0, 1, 2, 7, 64, 1000] {
            assert!(runs(n), "{n} chunks");
        }
        // Concurrent callers: one gets the pool, the others run on their own threads.
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4).map(|_| sc.spawn(|| (0..200).all(|i| runs(1 + i % 50)))).collect();
            assert!(hs.into_iter().all(|h| h.join().unwrap()));
        });
        // Nested: a job that calls the pool runs the inner job itself.
        let total = AtomicUsize::new(0);
        for_each_chunk(4, &|_| {
            for_each_chunk(3, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn mutable_pieces_cover_the_slice() {
        let mut v = vec![0usize; 1003];
        for_each_chunk_mut(&mut v, 64, |c, piece| piece.iter_mut().for_each(|x| *x += c + 1));
        assert!(v.iter().enumerate().all(|(i, &x)| x == i / 64 + 1));
    }

    #[test]
    fn a_panicking_chunk_panics_the_caller_and_the_pool_survives() {
        let r = catch_unwind(|| for_each_chunk(16, &|c| assert!(c != 11, "chunk 11 fails")));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        for_each_chunk(16, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 16);
    }
}
