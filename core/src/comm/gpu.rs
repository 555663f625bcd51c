//! A sharded model's GPU joins its group: NCCL when every rank can use it (the NCCL library
//! loads, and no two ranks share a GPU: NCCL refuses that), the unique id made by rank 0 and
//! sent to the others over the host communicator; else the collectives go through the host
//! (`ops/collective.rs`). Every rank takes the same decision: they exchange what they have first.

use autodeploy_kernels::cuda::exec::Gpu;
use autodeploy_kernels::cuda::nccl::{self, Collectives, Nccl, UniqueId};

use super::{current, Wait};

/// Joins `gpu` to this rank's group; true when its collectives run on NCCL (a step may then be
/// captured in a CUDA graph), false when they go through the host. `AUTODEPLOY_COLLECTIVES=host`
/// (on every rank) takes the host path (a developer's switch: docs/DEVELOPING.md).
pub fn join(gpu: &Gpu) -> Result<bool, String> {
    let c = current()?;
    let forced_host = std::env::var("AUTODEPLOY_COLLECTIVES").is_ok_and(|v| v == "host");
    let can = !forced_host && nccl::available();
    let mut mine = gpu.uuid().map_err(|e| e.0)?.to_vec();
    mine.push(can as u8);
    let all = c.all_gather(&mine)?;
    let ranks: Vec<&[u8]> = all.chunks_exact(17).collect();
    let shared = (0..ranks.len()).any(|i| (0..i).any(|j| ranks[i][..16] == ranks[j][..16]));
    let everyone_can = ranks.iter().all(|r| r[16] == 1);
    if shared || !everyone_can {
        let why =
            if shared { "ranks share a GPU" } else { "not every rank can load NCCL (or AUTODEPLOY_COLLECTIVES=host)" };
        tracing::warn!("collectives go through the host ({why}): every step waits for the GPU at each one");
        gpu.set_collectives(Collectives::Host).map_err(|e| e.0)?;
        return Ok(false);
    }
    let id = if c.rank() == 0 { nccl::unique_id().map_err(|e| e.0)?.0.to_vec() } else { Vec::new() };
    let id = c.broadcast(&id, Wait::Bounded)?;
    let id: [u8; 128] = id.try_into().map_err(|_| "rank 0 sent an NCCL unique id of the wrong size".to_string())?;
    let n = Nccl::init(gpu, UniqueId(id), c.rank(), c.world()).map_err(|e| e.0)?;
    tracing::info!(rank = c.rank(), world = c.world(), "NCCL communicator ready");
    // A rank that dies leaves NCCL's kernels on the others waiting for it: the group's failure
    // aborts the communicator, so their steps return (and fail) instead of hanging.
    super::on_failure(Box::new(n.aborter()));
    gpu.set_collectives(Collectives::Nccl(n)).map_err(|e| e.0)?;
    Ok(true)
}
