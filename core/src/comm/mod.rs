//! Collectives between the ranks of a sharded engine: what the `all_reduce` and `all_gather`
//! ops (ops/collective.rs) call. A rank finds its communicator through [`current`]: the one its
//! thread was given ([`with_thread`]: ranks that are threads of one process, as the sharding
//! tests run them), else the process's ([`set_process`]: one process a rank, as a launcher
//! sets it up). Every wait has a timeout, and the error says which ranks never arrived.

pub mod gpu;
pub mod mpi;
pub mod spawn;
pub mod steps;

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One rank's view of its group.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Every rank's `buf` summed elementwise, in rank order (so each rank gets the same bits),
    /// into every rank's `buf`. All ranks pass the same length. By default gathered, then
    /// added on every rank ([`sum_in_rank_order`]).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), String> {
        let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.all_gather(&bytes)?;
        sum_in_rank_order(buf, &all, bytes.len())
    }
    /// Every rank's `part` (all the same length), in rank order.
    fn all_gather(&self, part: &[u8]) -> Result<Vec<u8>, String>;
    /// Rank 0's `data` on every rank (the others' `data` is not read). `Wait::Idle`: a rank
    /// waiting for rank 0's next step, which may come after any pause (waits without spinning).
    fn broadcast(&self, data: &[u8], wait: Wait) -> Result<Vec<u8>, String>;
    /// Why the group can no longer run collectives (a rank timed out or stopped), if it cannot.
    fn failure(&self) -> Option<String> {
        None
    }
    /// Called once when the process is done with its collectives (MPI's finalize); `ok`: the
    /// command succeeded (a rank that failed may not wait for ranks that wait for it).
    fn finish(&self, _ok: bool) {}
}

/// Ends this process's communicator, if it has one (before exiting); `ok` as for
/// [`Communicator::finish`].
pub fn finish_process(ok: bool) {
    if let Some(c) = PROCESS.get() {
        c.finish(ok);
    }
}

static PROCESS: OnceLock<Arc<dyn Communicator>> = OnceLock::new();

thread_local! {
    static THREAD: RefCell<Option<Arc<dyn Communicator>>> = const { RefCell::new(None) };
}

/// For a config with `world_size > 1` run as one process a rank: joins the ranks `mpirun`
/// started (comm/mpi.rs), or, without `mpirun`, the ranks this process starts itself on this
/// machine (or, in a process so started, its rank 0: comm/spawn.rs). Sets this process's
/// communicator and returns its rank.
pub fn join(world_size: usize) -> Result<usize, String> {
    if mpi::launched() {
        return join_mpi(world_size);
    }
    let c: Arc<dyn Communicator> = if spawn::is_child() {
        Arc::new(spawn::join_as_child(world_size)?)
    } else {
        spawn::spawn_children(world_size, DEFAULT_TIMEOUT)?
    };
    let rank = c.rank();
    set_process(c)?;
    Ok(rank)
}

/// Joins the ranks `mpirun` started (MPI initialised, this process's communicator set) and
/// returns this process's rank, after checking that `mpirun -n` and `world_size` agree.
pub fn join_mpi(world_size: usize) -> Result<usize, String> {
    if !mpi::launched() {
        return Err(format!(
            "world_size = {world_size}: start its ranks with `mpirun -n {world_size} autodeploy ...` (one process a \
             rank; across machines add `--hostfile`)"
        ));
    }
    let m = mpi::init()?;
    if m.world() != world_size {
        return Err(format!("mpirun started {} ranks but the config's world_size is {world_size}", m.world()));
    }
    let rank = m.rank();
    set_process(Arc::new(m))?;
    Ok(rank)
}

/// Why this process's group can no longer run (a rank failed), if it has a communicator and
/// it cannot.
pub fn process_failure() -> Option<String> {
    PROCESS.get()?.failure()
}

/// Runs `hook` (once) when this process's group fails, from the thread that notices: what
/// releases work waiting on a dead rank elsewhere (an NCCL communicator's abort).
pub fn on_failure(hook: Hook) {
    FAILURE_HOOKS.lock().unwrap_or_else(|p| p.into_inner()).push(hook);
}

/// Runs the hooks `on_failure` registered (each once).
pub(crate) fn run_failure_hooks() {
    let hooks = std::mem::take(&mut *FAILURE_HOOKS.lock().unwrap_or_else(|p| p.into_inner()));
    for h in hooks {
        h();
    }
}

pub type Hook = Box<dyn Fn() + Send + Sync>;
static FAILURE_HOOKS: Mutex<Vec<Hook>> = Mutex::new(Vec::new());

/// Makes `c` this process's communicator (once; a second call is an error).
pub fn set_process(c: Arc<dyn Communicator>) -> Result<(), String> {
    PROCESS.set(c).map_err(|_| "this process's communicator is already set".to_string())
}

/// Runs `f` with `c` as this thread's communicator (a rank that is a thread).
pub fn with_thread<T>(c: Arc<dyn Communicator>, f: impl FnOnce() -> T) -> T {
    /// Puts the thread's communicator back, also when `f` panics.
    struct Restore(Option<Arc<dyn Communicator>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            THREAD.with(|t| *t.borrow_mut() = before);
        }
    }
    let _restore = Restore(THREAD.with(|t| t.replace(Some(c))));
    f()
}

/// The communicator of the rank running on this thread.
pub fn current() -> Result<Arc<dyn Communicator>, String> {
    if let Some(c) = THREAD.with(|t| t.borrow().clone()) {
        return Ok(c);
    }
    PROCESS.get().cloned().ok_or_else(|| {
        "this engine is sharded (world_size > 1) but this process has no communicator: launch its ranks with \
         `mpirun -n <world_size>` or through autodeploy's launcher"
            .to_string()
    })
}

/// `buf` = the sum, in rank order, of the ranks' f32 buffers gathered in `all` (`part` bytes
/// each): every rank adds the same values in the same order, so all get the same bits.
pub fn sum_in_rank_order(buf: &mut [f32], all: &[u8], part: usize) -> Result<(), String> {
    if part != buf.len() * 4 || (part > 0 && !all.len().is_multiple_of(part)) {
        return Err(format!("all_reduce: {} bytes gathered for parts of {part}", all.len()));
    }
    buf.fill(0.0);
    for p in all.chunks_exact(part.max(1)) {
        for (b, c) in buf.iter_mut().zip(p.chunks_exact(4)) {
            *b += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(())
}

/// How long a broadcast may wait for the other ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// As long as any collective ([`DEFAULT_TIMEOUT`] or the group's own).
    Bounded,
    /// For as long as the sender takes: a follower between steps.
    Idle,
}

/// How long a rank waits for the others at a collective before failing.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The ranks of one process as threads: shared memory, a generation-counted barrier.
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<Round>,
    cv: Condvar,
}

#[derive(Default)]
struct Round {
    /// Completed collectives; a rank's contribution is for round `generation`.
    generation: u64,
    /// Each rank's contribution to the current round.
    parts: Vec<Option<Vec<u8>>>,
    /// The result of the last completed round, and how many ranks have yet to read it.
    result: Arc<Vec<u8>>,
    unread: usize,
    /// A rank that failed (timed out) poisons the group: the others fail too, not hang.
    failed: Option<String>,
}

/// Rank `rank` of a group of threads ([`local_group`]).
pub struct LocalRank {
    rank: usize,
    shared: Arc<Shared>,
}

/// A group of `world` ranks that are threads of this process; hand one to each thread.
pub fn local_group(world: usize, timeout: Duration) -> Vec<Arc<dyn Communicator>> {
    let shared = Arc::new(Shared {
        world,
        timeout,
        state: Mutex::new(Round { parts: vec![None; world], ..Default::default() }),
        cv: Condvar::new(),
    });
    (0..world).map(|rank| Arc::new(LocalRank { rank, shared: shared.clone() }) as Arc<dyn Communicator>).collect()
}

impl LocalRank {
    /// Contributes `part`, waits for every rank's, and returns `combine` of them (rank order),
    /// computed once by the last rank to arrive.
    fn exchange(
        &self,
        part: Vec<u8>,
        how: Wait,
        combine: impl FnOnce(&[Vec<u8>]) -> Vec<u8>,
    ) -> Result<Arc<Vec<u8>>, String> {
        let s = &*self.shared;
        let deadline = match how {
            Wait::Bounded => Some(Instant::now() + s.timeout),
            Wait::Idle => None,
        };
        let mut st = s.state.lock().map_err(|_| "a rank panicked inside a collective".to_string())?;
        // A rank a round ahead waits until the last round's result has been read by everyone.
        while st.unread > 0 && st.failed.is_none() {
            st = wait(s, st, deadline, self.rank)?;
        }
        if let Some(f) = &st.failed {
            return Err(f.clone());
        }
        let round = st.generation;
        st.parts[self.rank] = Some(part);
        if st.parts.iter().all(Option::is_some) {
            let parts: Vec<Vec<u8>> = st.parts.iter_mut().map(|p| p.take().unwrap_or_default()).collect();
            st.result = Arc::new(combine(&parts));
            st.generation += 1;
            st.unread = s.world;
            s.cv.notify_all();
        }
        while st.generation == round && st.failed.is_none() {
            st = wait(s, st, deadline, self.rank)?;
        }
        if let Some(f) = &st.failed {
            return Err(f.clone());
        }
        st.unread -= 1;
        let out = st.result.clone();
        if st.unread == 0 {
            s.cv.notify_all();
        }
        Ok(out)
    }
}

fn wait<'a>(
    s: &'a Shared,
    st: std::sync::MutexGuard<'a, Round>,
    deadline: Option<Instant>,
    rank: usize,
) -> Result<std::sync::MutexGuard<'a, Round>, String> {
    let Some(deadline) = deadline else {
        return s.cv.wait(st).map_err(|_| "a rank panicked inside a collective".to_string());
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let (mut st, timed_out) =
        s.cv.wait_timeout(st, left).map_err(|_| "a rank panicked inside a collective".to_string())?;
    if timed_out.timed_out() && Instant::now() >= deadline {
        let missing: Vec<usize> = (0..s.world).filter(|&r| st.parts[r].is_none()).collect();
        let msg = format!(
            "rank {rank}: a collective waited {:?} for ranks {missing:?} of {} (a rank stopped or is stuck)",
            s.timeout, s.world
        );
        st.failed = Some(msg.clone());
        s.cv.notify_all();
        return Err(msg);
    }
    Ok(st)
}

impl Communicator for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), String> {
        let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let n = buf.len();
        let sum = self.exchange(bytes, Wait::Bounded, |parts| {
            let mut acc = vec![0f32; n];
            for p in parts {
                for (a, c) in acc.iter_mut().zip(p.chunks_exact(4)) {
                    *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            acc.iter().flat_map(|v| v.to_le_bytes()).collect()
        })?;
        if sum.len() != n * 4 {
            return Err(format!("all_reduce: the ranks passed different lengths (this one {n})"));
        }
        for (b, c) in buf.iter_mut().zip(sum.chunks_exact(4)) {
            *b = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
    fn all_gather(&self, part: &[u8]) -> Result<Vec<u8>, String> {
        let n = part.len();
        let world = self.shared.world;
        let all = self.exchange(part.to_vec(), Wait::Bounded, |parts| {
            if parts.iter().any(|p| p.len() != n) {
                return Vec::new();
            }
            parts.concat()
        })?;
        if all.len() != n * world {
            return Err("all_gather: the ranks passed parts of different lengths".to_string());
        }
        Ok(all.as_ref().clone())
    }
    fn broadcast(&self, data: &[u8], wait: Wait) -> Result<Vec<u8>, String> {
        let part = if self.rank == 0 { data.to_vec() } else { Vec::new() };
        let all = self.exchange(part, wait, |parts| parts[0].clone())?;
        Ok(all.as_ref().clone())
    }
    fn failure(&self) -> Option<String> {
        self.shared
            .state
            .lock()
            .map_or_else(|_| Some("a rank panicked inside a collective".into()), |s| s.failed.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_ranks_reduce_and_gather_in_rank_order() {
        let group = local_group(3, Duration::from_secs(10));
        let handles: Vec<_> = group
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let r = c.rank() as f32;
                    let mut out = vec![];
                    // Several rounds back to back: a fast rank must not overtake a round.
                    for round in 0..50 {
                        let mut buf = vec![r + round as f32, 1.0];
                        c.all_reduce_sum(&mut buf).unwrap();
                        out.push(buf);
                        let g = c.all_gather(&[c.rank() as u8, round as u8]).unwrap();
                        assert_eq!(g, vec![0, round as u8, 1, round as u8, 2, round as u8]);
                    }
                    out
                })
            })
            .collect();
        for h in handles {
            let out = h.join().unwrap();
            for (round, buf) in out.iter().enumerate() {
                assert_eq!(buf, &vec![3.0 + 3.0 * round as f32, 3.0]);
            }
        }
    }

    #[test]
    fn a_missing_rank_times_out_naming_it() {
        let group = local_group(2, Duration::from_millis(200));
        let mut buf = vec![1.0];
        let e = group[0].all_reduce_sum(&mut buf).unwrap_err();
        assert!(e.contains("ranks [1]"), "{e}");
        // The group is poisoned: the late rank fails at once instead of waiting.
        assert!(group[1].all_reduce_sum(&mut buf).is_err());
    }
}
