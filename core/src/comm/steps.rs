//! Rank 0 leads, the other ranks follow. A sharded engine's runtime (scheduler, KV-cache pages,
//! sampler, server) runs on rank 0 alone; every forward it asks of its engine is first sent to
//! the other ranks ([`Communicator::broadcast`]), whose engines run the same forward on their
//! slices, so the collectives inside meet. What travels is what `ModelRunner::forward_step`
//! (or `forward_full`) was given: the tokens, cached lengths and pages of each sequence, the
//! page size, the sampling draws. A follower's outputs are dropped (rank 0's are the same bits).
//!
//! A step that fails on any rank stops the group: the ranks can no longer be sure their
//! collectives meet. Rank 0's engine then refuses every later step and says why
//! (`ModelRunner::failure`: the server answers 503); a follower returns the error (its process
//! exits, and `mpirun` ends the job).

use super::{current, Wait};
use crate::error::{Error, Result};
use crate::pipeline::Engine;
use crate::runtime::SeqStep;
use crate::sampling::RowDraw;

impl Engine {
    /// Before a forward on rank 0 of a sharded group: sends it (`message()`) to the followers.
    /// Refused on a follower (its steps come from rank 0) and once the group has failed.
    pub(crate) fn lead(&mut self, message: impl FnOnce() -> Vec<u8>) -> Result<()> {
        if self.world_size <= 1 {
            return Ok(());
        }
        if let Some(f) = &self.group_failure {
            return Err(Error::Msg(f.clone()));
        }
        if self.rank != 0 {
            return Err(Error::Msg(format!(
                "rank {} of a sharded engine runs the steps rank 0 sends it (Engine::follow), not its own",
                self.rank
            )));
        }
        let sent = current().and_then(|c| c.broadcast(&message(), Wait::Bounded));
        sent.map(|_| ()).map_err(|e| self.fail(format!("sending a step to the other ranks: {e}")))
    }

    /// After a forward on rank 0: a failure stops a sharded group (see the module doc).
    pub(crate) fn settle<T>(&mut self, out: Result<T>) -> Result<T> {
        match out {
            Err(e) if self.world_size > 1 => Err(self.fail(format!("a step failed on rank 0: {e}"))),
            out => out,
        }
    }

    fn fail(&mut self, why: String) -> Error {
        let why = format!("{why}; a sharded engine stops at its first failure (restart it)");
        tracing::error!("{why}");
        self.group_failure = Some(why.clone());
        Error::Msg(why)
    }

    /// A follower (rank > 0) of a sharded group: runs each step rank 0 sends, until rank 0's
    /// engine goes (Ok) or a step fails here (the error; the group cannot go on).
    pub fn follow(&mut self) -> Result<()> {
        if self.rank == 0 || self.world_size <= 1 {
            return Err(Error::Msg("only ranks above 0 of a sharded engine follow rank 0's steps".into()));
        }
        let comm = current().map_err(Error::Msg)?;
        loop {
            let bytes = comm.broadcast(&[], Wait::Idle).map_err(Error::Msg)?;
            let msg = decode(&bytes).map_err(|e| Error::Msg(format!("rank {}: {e}", self.rank)))?;
            let out = match msg {
                Message::Stop => return Ok(()),
                Message::Step { page_size, want_logits, seqs, draws } => {
                    let steps: Vec<SeqStep> = seqs.iter().map(OwnedSeq::as_step).collect();
                    self.run_step(page_size, &steps, &draws, want_logits).map(|_| ())
                }
                Message::Full { tokens } => self.run_full(&tokens).map(|_| ()),
            };
            if let Err(e) = out {
                return Err(Error::Msg(format!("rank {}: a step from rank 0 failed here: {e}", self.rank)));
            }
        }
    }
}

impl Drop for Engine {
    /// Rank 0's engine going tells the followers to stop (unless the group already failed).
    fn drop(&mut self) {
        if self.world_size > 1 && self.rank == 0 && crate::runtime::ModelRunner::failure(self).is_none() {
            if let Err(e) = current().and_then(|c| c.broadcast(&encode_stop(), Wait::Bounded)) {
                tracing::warn!("telling the other ranks to stop: {e}");
            }
        }
    }
}

/// The fewest KV-cache pages any rank of this process's group holds (each rank sizes its own
/// cache from its slice and its memory; rank 0's scheduler may use only what all of them have).
pub fn fewest_pages(mine: usize) -> Result<usize> {
    let c = current().map_err(Error::Msg)?;
    let all = c.all_gather(&(mine as u64).to_le_bytes()).map_err(Error::Msg)?;
    let fewest = all.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).min().unwrap_or(0);
    Ok(usize::try_from(fewest).unwrap_or(usize::MAX).min(mine))
}

/// What rank 0 sends its followers.
#[derive(Debug, PartialEq)]
pub enum Message {
    /// No more steps: rank 0's engine is gone.
    Stop,
    /// A forward through the paged KV cache (`ModelRunner::forward_step`).
    Step { page_size: usize, want_logits: bool, seqs: Vec<OwnedSeq>, draws: Vec<RowDraw> },
    /// A full-sequence forward (`ModelRunner::forward_full`).
    Full { tokens: Vec<i64> },
}

/// A [`SeqStep`] that owns its slices (as a follower decodes it).
#[derive(Debug, PartialEq)]
pub struct OwnedSeq {
    pub new_tokens: Vec<i64>,
    pub cached: usize,
    pub pages: Vec<u32>,
}

impl OwnedSeq {
    pub fn as_step(&self) -> SeqStep<'_> {
        SeqStep { new_tokens: &self.new_tokens, cached: self.cached, pages: &self.pages }
    }
}

const STOP: u8 = 0;
const STEP: u8 = 1;
const FULL: u8 = 2;

pub fn encode_stop() -> Vec<u8> {
    vec![STOP]
}

pub fn encode_step(page_size: usize, seqs: &[SeqStep], draws: &[RowDraw], want_logits: bool) -> Vec<u8> {
    let tokens: usize = seqs.iter().map(|s| s.new_tokens.len() * 8 + s.pages.len() * 4 + 24).sum();
    let mut out = Vec::with_capacity(18 + tokens + draws.len() * 20);
    out.push(STEP);
    put(&mut out, page_size as u64);
    out.push(want_logits as u8);
    put(&mut out, seqs.len() as u64);
    for s in seqs {
        put(&mut out, s.cached as u64);
        put(&mut out, s.new_tokens.len() as u64);
        s.new_tokens.iter().for_each(|t| out.extend_from_slice(&t.to_le_bytes()));
        put(&mut out, s.pages.len() as u64);
        s.pages.iter().for_each(|p| out.extend_from_slice(&p.to_le_bytes()));
    }
    put(&mut out, draws.len() as u64);
    for d in draws {
        out.extend_from_slice(&d.temperature.to_le_bytes());
        put(&mut out, d.top_k as u64);
        out.extend_from_slice(&d.top_p.to_le_bytes());
        out.extend_from_slice(&d.u.to_le_bytes());
    }
    out
}

pub fn encode_full(tokens: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + tokens.len() * 8);
    out.push(FULL);
    put(&mut out, tokens.len() as u64);
    tokens.iter().for_each(|t| out.extend_from_slice(&t.to_le_bytes()));
    out
}

fn put(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Reads a message; every count is checked against the bytes left before anything is allocated
/// from it, and the error says what was malformed.
pub fn decode(bytes: &[u8]) -> Result<Message, String> {
    let mut r = Reader { bytes, at: 0 };
    let msg = match r.take(1)?[0] {
        STOP => Message::Stop,
        STEP => {
            let page_size = r.usize()?;
            let want_logits = r.take(1)?[0] != 0;
            let n = r.count(24)?;
            let mut seqs = Vec::with_capacity(n);
            for _ in 0..n {
                let cached = r.usize()?;
                let t = r.count(8)?;
                let new_tokens =
                    r.take(t * 8)?.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                let p = r.count(4)?;
                let pages = r.take(p * 4)?.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
                seqs.push(OwnedSeq { new_tokens, cached, pages });
            }
            let d = r.count(20)?;
            let mut draws = Vec::with_capacity(d);
            for _ in 0..d {
                let temperature = r.f32()?;
                let top_k = r.usize()?;
                let (top_p, u) = (r.f32()?, r.f32()?);
                draws.push(RowDraw { temperature, top_k, top_p, u });
            }
            Message::Step { page_size, want_logits, seqs, draws }
        }
        FULL => {
            let n = r.count(8)?;
            Message::Full {
                tokens: r.take(n * 8)?.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            }
        }
        k => return Err(format!("a step message of unknown kind {k}")),
    };
    if r.at != bytes.len() {
        return Err(format!("a step message has {} bytes past its end", bytes.len() - r.at));
    }
    Ok(msg)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            format!("a step message ends early: {n} bytes wanted at offset {} of {}", self.at, self.bytes.len())
        })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn usize(&mut self) -> Result<usize, String> {
        let v = self.u64()?;
        usize::try_from(v).map_err(|_| format!("a step message holds {v}, past this machine's sizes"))
    }
    fn f32(&mut self) -> Result<f32, String> {
        Ok(f32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    /// A count of items of at least `min_bytes` each: no more than the bytes left could hold.
    fn count(&mut self, min_bytes: usize) -> Result<usize, String> {
        let n = self.usize()?;
        let left = self.bytes.len() - self.at;
        if n.checked_mul(min_bytes).is_none_or(|b| b > left) {
            return Err(format!("a step message counts {n} items of {min_bytes}+ bytes with {left} bytes left"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_and_bad_bytes_are_refused() {
        let (a, b) = (vec![5i64, -1, 7], vec![9i64]);
        let (pa, pb) = (vec![0u32, 3], vec![u32::MAX]);
        let seqs =
            [SeqStep { new_tokens: &a, cached: 0, pages: &pa }, SeqStep { new_tokens: &b, cached: 17, pages: &pb }];
        let draws = [RowDraw { temperature: 0.7, top_k: 40, top_p: 0.9, u: 0.25 }; 2];
        let bytes = encode_step(16, &seqs, &draws, true);
        let Message::Step { page_size, want_logits, seqs: got, draws: got_draws } = decode(&bytes).unwrap() else {
            panic!("not a step")
        };
        assert_eq!((page_size, want_logits), (16, true));
        assert_eq!(
            got,
            vec![OwnedSeq { new_tokens: a, cached: 0, pages: pa }, OwnedSeq { new_tokens: b, cached: 17, pages: pb }]
        );
        assert_eq!(got_draws, draws.to_vec());
        assert_eq!(decode(&encode_full(&[1, 2, 3])).unwrap(), Message::Full { tokens: vec![1, 2, 3] });
        assert_eq!(decode(&encode_stop()).unwrap(), Message::Stop);
        // Cut anywhere, or claiming more than it holds: an error, not a panic or an allocation.
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = encode_full(&[]);
        huge[1..9].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&huge).unwrap_err().contains("counts"));
        assert!(decode(&[9]).unwrap_err().contains("unknown kind"));
        let mut long = encode_stop();
        long.push(0);
        assert!(decode(&long).unwrap_err().contains("past its end"));
    }
}
