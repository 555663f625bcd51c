//! Ranks `autodeploy` starts itself on one machine (`world_size > 1` without `mpirun`): rank 0
//! is the process the user started; it runs the same command line again as `world_size - 1`
//! child processes (`AUTODEPLOY_RANK`, `AUTODEPLOY_WORLD`, `AUTODEPLOY_SOCKET` tell them who they
//! are), each connected to it by a Unix socket in a private folder. Over those sockets go rank
//! 0's steps, the NCCL unique id, and the host collectives of ranks without NCCL (CPU ranks,
//! ranks sharing a GPU), gathered at rank 0 and sent back in rank order, so every rank gets the
//! same bits. Across machines, `mpirun` is the launcher (comm/mpi.rs).
//!
//! Rank 0 watches its children: one that exits marks the group failed at once (its socket shut,
//! so a collective waiting on it returns), and rank 0's engine then refuses every step and says
//! which rank stopped (the server answers 503). A child whose rank 0 goes away reads the end of
//! its socket and exits.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Communicator, Wait, DEFAULT_TIMEOUT};

const RANK_VAR: &str = "AUTODEPLOY_RANK";
const WORLD_VAR: &str = "AUTODEPLOY_WORLD";
const SOCKET_VAR: &str = "AUTODEPLOY_SOCKET";

/// Largest message a rank accepts (a length read from a socket is checked before allocating).
const MAX_FRAME: u64 = 1 << 34;

/// One rank's end of the sockets: rank 0 holds one stream a child (rank order), a child one to
/// rank 0.
pub struct SocketRank {
    rank: usize,
    world: usize,
    streams: Mutex<Vec<UnixStream>>,
    /// Clones of the streams, to shut one while a collective waits on it.
    shut: Vec<UnixStream>,
    failed: Mutex<Option<String>>,
    timeout: Duration,
    /// Rank 0's children and where their socket lives (removed when done).
    children: Mutex<Vec<(usize, Child)>>,
    dir: Option<PathBuf>,
}

fn io_err(what: &str, e: std::io::Error) -> String {
    format!("{what}: {e}")
}

fn write_frame(s: &mut UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)
}

fn read_frame(s: &mut UnixStream, timeout: Option<Duration>) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(timeout)?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {n} bytes")));
    }
    let mut out = vec![0u8; n as usize];
    s.read_exact(&mut out)?;
    Ok(out)
}

impl SocketRank {
    /// The group's failure, or `f`'s result (a failure then poisons the group).
    fn guarded<T>(&self, f: impl FnOnce(&mut Vec<UnixStream>) -> Result<T, String>) -> Result<T, String> {
        if let Some(why) = self.failure() {
            return Err(why);
        }
        let mut streams = self.streams.lock().map_err(|_| "a rank panicked inside a collective".to_string())?;
        let out = f(&mut streams);
        if let Err(e) = &out {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            // The monitor's reason (a child exited) says more than the broken read it caused.
            return Err(failed.get_or_insert_with(|| e.clone()).clone());
        }
        out
    }

    /// Peer `i`'s name in errors: rank 0 holds ranks 1.., a child only rank 0.
    fn peer(&self, i: usize) -> usize {
        if self.rank == 0 {
            i + 1
        } else {
            0
        }
    }

    fn read_from(&self, streams: &mut [UnixStream], i: usize, wait: Wait) -> Result<Vec<u8>, String> {
        let timeout = match wait {
            Wait::Bounded => Some(self.timeout),
            Wait::Idle => None,
        };
        read_frame(&mut streams[i], timeout).map_err(|e| {
            let r = self.peer(i);
            match e.kind() {
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                    format!("rank {}: rank {r} stopped (its process exited or closed its socket)", self.rank)
                }
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("rank {}: rank {r} did not answer within {:?} (stuck or stopped)", self.rank, self.timeout)
                }
                _ => format!("rank {}: reading from rank {r}: {e}", self.rank),
            }
        })
    }

    fn write_to(&self, streams: &mut [UnixStream], i: usize, bytes: &[u8]) -> Result<(), String> {
        let r = self.peer(i);
        write_frame(&mut streams[i], bytes).map_err(|e| format!("rank {}: sending to rank {r}: {e}", self.rank))
    }

    /// Marks the group failed (a child exited) and shuts every socket, so no rank waits on it.
    fn fail(&self, why: String) {
        tracing::error!("{why}");
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
        for s in &self.shut {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        super::run_failure_hooks();
    }
}

impl Communicator for SocketRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_gather(&self, part: &[u8]) -> Result<Vec<u8>, String> {
        self.guarded(|streams| {
            if self.rank != 0 {
                self.write_to(streams, 0, part)?;
                return self.read_from(streams, 0, Wait::Bounded);
            }
            let mut all = part.to_vec();
            for i in 0..streams.len() {
                let p = self.read_from(streams, i, Wait::Bounded)?;
                if p.len() != part.len() {
                    return Err(format!("all_gather: rank {} sent {} bytes, rank 0 {}", i + 1, p.len(), part.len()));
                }
                all.extend_from_slice(&p);
            }
            for i in 0..streams.len() {
                self.write_to(streams, i, &all)?;
            }
            Ok(all)
        })
    }
    fn broadcast(&self, data: &[u8], wait: Wait) -> Result<Vec<u8>, String> {
        self.guarded(|streams| {
            if self.rank != 0 {
                return self.read_from(streams, 0, wait);
            }
            for i in 0..streams.len() {
                self.write_to(streams, i, data)?;
            }
            Ok(data.to_vec())
        })
    }
    fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Rank 0: closes the sockets (a child reads what was sent, rank 0's stop message, then
    /// their end), waits a while for the children to exit, ends any still running, and removes
    /// the socket's folder.
    fn finish(&self, _ok: bool) {
        for s in &self.shut {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + Duration::from_secs(10);
        for (rank, child) in children.iter_mut() {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                tracing::warn!("rank {rank} did not stop; ending it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        children.clear();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Whether this process is a rank `autodeploy` started (its variables are set).
pub fn is_child() -> bool {
    std::env::var_os(RANK_VAR).is_some()
}

/// A child: connects to rank 0's socket and says its rank; returns its communicator.
pub fn join_as_child(world_size: usize) -> Result<SocketRank, String> {
    let var = |n: &str| std::env::var(n).map_err(|_| format!("{n} is not set"));
    let rank: usize = var(RANK_VAR)?.parse().map_err(|_| format!("{RANK_VAR} is not a rank"))?;
    let world: usize = var(WORLD_VAR)?.parse().map_err(|_| format!("{WORLD_VAR} is not a count"))?;
    if world != world_size || rank == 0 || rank >= world {
        return Err(format!("rank {rank} of {world} started for a config with world_size = {world_size}"));
    }
    let path = var(SOCKET_VAR)?;
    let mut s =
        UnixStream::connect(&path).map_err(|e| io_err(&format!("rank {rank}: connecting to rank 0 at {path}"), e))?;
    s.write_all(&(rank as u64).to_le_bytes()).map_err(|e| io_err("saying this rank's number", e))?;
    let shut = vec![s.try_clone().map_err(|e| io_err("cloning the socket", e))?];
    Ok(SocketRank {
        rank,
        world,
        streams: Mutex::new(vec![s]),
        shut,
        failed: Mutex::new(None),
        timeout: DEFAULT_TIMEOUT,
        children: Mutex::new(Vec::new()),
        dir: None,
    })
}

/// Rank 0: starts ranks 1 .. `world_size` as children running this process's command line,
/// waits (at most `timeout`) for each to connect, and watches them.
pub fn spawn_children(world_size: usize, timeout: Duration) -> Result<Arc<SocketRank>, String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!(
        "autodeploy-ranks-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir(&dir).map_err(|e| io_err(&format!("creating {}", dir.display()), e))?;
    // Only this user may connect.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io_err(&format!("making {} private", dir.display()), e))?;
    let path = dir.join("ranks.sock");
    let listener = UnixListener::bind(&path).map_err(|e| io_err(&format!("listening on {}", path.display()), e))?;
    listener.set_nonblocking(true).map_err(|e| io_err("setting up the socket", e))?;
    let exe = std::env::current_exe().map_err(|e| io_err("finding this program", e))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut children = Vec::new();
    let cleanup = |children: &mut Vec<(usize, Child)>| {
        for (_, c) in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&dir);
    };
    for rank in 1..world_size {
        let child = Command::new(&exe)
            .args(&args)
            .env(RANK_VAR, rank.to_string())
            .env(WORLD_VAR, world_size.to_string())
            .env(SOCKET_VAR, &path)
            // Rank 0 prints and reads; the others log to the same stderr.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn();
        match child {
            Ok(c) => {
                tracing::info!(rank, pid = c.id(), "started rank");
                children.push((rank, c));
            }
            Err(e) => {
                cleanup(&mut children);
                return Err(io_err(&format!("starting rank {rank} ({})", exe.display()), e));
            }
        }
    }
    let mut streams: Vec<Option<UnixStream>> = (1..world_size).map(|_| None).collect();
    let deadline = Instant::now() + timeout;
    while streams.iter().any(Option::is_none) {
        let exited = children.iter_mut().find_map(|(r, c)| c.try_wait().ok().flatten().map(|st| (*r, st)));
        if let Some((r, st)) = exited {
            cleanup(&mut children);
            return Err(format!("rank {r} exited ({st}) before connecting to rank 0"));
        }
        if Instant::now() > deadline {
            let missing: Vec<usize> = (1..world_size).filter(|r| streams[r - 1].is_none()).collect();
            cleanup(&mut children);
            return Err(format!("ranks {missing:?} did not connect to rank 0 within {timeout:?}"));
        }
        match listener.accept() {
            Ok((mut s, _)) => {
                let mut b = [0u8; 8];
                let ok = s.set_nonblocking(false).is_ok()
                    && s.set_read_timeout(Some(Duration::from_secs(10))).is_ok()
                    && s.read_exact(&mut b).is_ok();
                let r = u64::from_le_bytes(b) as usize;
                if ok && (1..world_size).contains(&r) && streams[r - 1].is_none() {
                    streams[r - 1] = Some(s);
                } else {
                    tracing::warn!("a connection to the ranks' socket that is not a rank; dropped");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                cleanup(&mut children);
                return Err(io_err("accepting a rank", e));
            }
        }
    }
    let streams: Vec<UnixStream> = streams.into_iter().flatten().collect();
    let shut = streams.iter().map(|s| s.try_clone()).collect::<std::io::Result<Vec<_>>>();
    let shut = match shut {
        Ok(s) => s,
        Err(e) => {
            cleanup(&mut children);
            return Err(io_err("cloning the ranks' sockets", e));
        }
    };
    let pids: Vec<(usize, u32)> = children.iter().map(|(r, c)| (*r, c.id())).collect();
    let me = Arc::new(SocketRank {
        rank: 0,
        world: world_size,
        streams: Mutex::new(streams),
        shut,
        failed: Mutex::new(None),
        timeout: DEFAULT_TIMEOUT,
        children: Mutex::new(children),
        dir: Some(dir),
    });
    watch(Arc::downgrade(&me), pids);
    Ok(me)
}

/// Rank 0's watch over its children: the first that exits before rank 0 is done fails the group.
fn watch(me: std::sync::Weak<SocketRank>, pids: Vec<(usize, u32)>) {
    let spawned = std::thread::Builder::new().name("autodeploy-ranks".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        let Some(me) = me.upgrade() else { return };
        let mut children = me.children.lock().unwrap_or_else(|p| p.into_inner());
        if children.is_empty() {
            // `finish` took them: rank 0 is done.
            return;
        }
        // A rank exits with success only after rank 0's stop message: that is no failure.
        let exited = children.iter_mut().find_map(|(r, c)| c.try_wait().ok().flatten().map(|st| (*r, st)));
        drop(children);
        if let Some((r, st)) = exited.filter(|(_, st)| !st.success()) {
            let pid = pids.iter().find(|(q, _)| *q == r).map_or(0, |p| p.1);
            me.fail(format!("rank {r} (pid {pid}) exited ({st}); the sharded engine cannot run without it"));
            return;
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch the ranks ({e}); a rank that exits is noticed at the next step");
    }
}
