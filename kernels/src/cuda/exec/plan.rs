//! The attention launchers' host-side plans (exec/attention.rs launches them): how split-KV
//! decode cuts positions, which build a dtype, cache and head dim pick, how many heads a block
//! takes, the tensor-core prefill's tiles, and a step's metadata on the device.

use super::*;

/// How split-KV decode cuts positions, and where its partial states go.
#[derive(Clone, Copy, Debug)]
pub struct Split {
    pub chunk: usize,
    pub splits: usize,
    pub partial: Ptr,
    /// One zeroed i32 per (token, head); the kernel leaves them zero.
    pub counters: Ptr,
}

impl Split {
    /// Chunks for sequences of up to `max_len` positions: `min_chunk` positions each
    /// (`Gpu::split_min_chunk`: what the latency build's four warps take in one pass), at most
    /// 32 of them. The kernels lengthen a token's chunks to the least multiple of `min_chunk`
    /// whose 32 chunks cover its positions (`token_chunk` in attention.cuh), so a short
    /// sequence is cut into chunks of `min_chunk` whatever `max_len` is. Until session 46 the
    /// plan was `max_len / 32` a chunk: an engine built for the default 2,048 positions ran a
    /// batch-1 decode at 128 positions through 3 chunks of 64 a head, one built for 4,096
    /// through 2 of 128. On an H200 longer chunks (at least 64, 128, 256 positions) made the 8B
    /// decode step at short sequences slower: 4.43, 4.75, 5.08 ms against 4.22 at 32 (fewer
    /// blocks, more passes in each; session 23); up to 64 chunks for long sequences (measured
    /// with a page-index preload in the kernels, since removed) made the 8B step at 2000
    /// positions no faster (4.816 ms against 4.846) and the 1B's slower (1.188 against 1.113).
    /// cuda_check's lengthened cases (`/8x2`, `/64x4`) passed on an H100 (session 46); the
    /// steps' times against the old plan wait for `pending.sh` part `chunkab`.
    pub fn plan(max_len: usize, min_chunk: usize) -> (usize, usize) {
        let chunk = min_chunk.max(1);
        (chunk, max_len.div_ceil(chunk).clamp(1, 32))
    }

    /// This plan for a step of `tokens` tokens where the partials hold `budget` tokens' worth of
    /// this plan's chunks: the same positions (`chunk × splits`) in fewer, longer chunks, so
    /// that `tokens × splits` stays within `budget × splits` (at least one chunk). A large decode
    /// step has blocks enough without splitting each sequence (session 37, H100: the 8B's decode
    /// step at batch 512 took 25 ms through the ragged prefill kernel, 7.5 ms at 256 here).
    pub fn for_tokens(self, tokens: usize, budget: usize) -> Split {
        if tokens <= budget {
            return self;
        }
        let want = (budget * self.splits / tokens.max(1)).max(1);
        let positions = self.chunk * self.splits;
        let chunk = positions.div_ceil(want);
        Split { chunk, splits: positions.div_ceil(chunk), ..self }
    }
}

/// The split-KV kernel of `builds` (`ATTN_BUILDS` × head dims) for these activations, cache and
/// head dim.
pub(super) fn split_build(builds: &[Vec<Kernel>; 4], dt: Dt, d: usize, mods: ScoreMods) -> Result<Kernel, Unavailable> {
    Ok(builds[build(dt, mods.kv_fp8)?][head_dim_index(d, "paged attention")?])
}

fn attn_dt(dt: Dt) -> Result<usize, Unavailable> {
    match dt {
        Dt::F32 => Ok(0),
        Dt::BF16 => Ok(1),
        _ => Err(Unavailable(format!("paged attention has f32 and bf16 kernels, not {dt:?}"))),
    }
}

/// The attention kernels' builds, by entry-point suffix: f32 and bf16 activations over a cache
/// of their dtype, then over an FP8 cache (E4M3 codes; the kernels take the layer's k_scale and
/// v_scale as two more arguments).
pub const ATTN_BUILDS: [&str; 4] = ["f32", "bf16", "f32_fp8kv", "bf16_fp8kv"];

/// The build (`ATTN_BUILDS`) for activations of `dt` over a cache in that dtype or in FP8.
pub(super) fn build(dt: Dt, kv_fp8: Option<(f32, f32)>) -> Result<usize, Unavailable> {
    Ok(attn_dt(dt)? + if kv_fp8.is_some() { 2 } else { 0 })
}

/// The head dim of the kernel that runs head dim `d`: `d` itself where `HEAD_DIMS` has it, else
/// the narrowest of `GENERAL_DIMS` that holds it, for any multiple of 8 up to 256 (the kernels
/// take the row length at run time; a lane's share of a row stays a whole vector load). None
/// for other dims.
pub fn kernel_head_dim(d: usize) -> Option<usize> {
    if HEAD_DIMS.contains(&d) {
        return Some(d);
    }
    if d == 0 || !d.is_multiple_of(8) {
        return None;
    }
    GENERAL_DIMS.into_iter().find(|&k| k >= d)
}

/// Where the attention kernel for head dim `d` sits in a kernel table (`HEAD_DIMS` with the
/// row length a constant, then the general builds of `GENERAL_DIMS`), or why there is none.
pub(super) fn head_dim_index(d: usize, kernel: &str) -> Result<usize, Unavailable> {
    let general = || GENERAL_DIMS.iter().position(|&x| Some(x) == kernel_head_dim(d)).map(|i| HEAD_DIMS.len() + i);
    HEAD_DIMS.iter().position(|&x| x == d).or_else(general).ok_or_else(|| {
        Unavailable(format!("{kernel} has kernels for head_dim {HEAD_DIMS:?} and any multiple of 8 up to 256, not {d}"))
    })
}

/// Query heads of one GQA group a split-KV decode block (throughput build) can attend for
/// together: the most of 8, 4, 2 that divides the group and keeps a lane's q and output rows
/// within 32 values each (`d / 32` values a head), else 1.
pub fn heads_a_block(heads: usize, kv_heads: usize, d: usize) -> usize {
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return 1;
    }
    let (group, per) = (heads / kv_heads, kernel_head_dim(d).unwrap_or(d).div_ceil(32));
    [8, 4, 2].into_iter().find(|&hb| group.is_multiple_of(hb) && hb * per <= 32).unwrap_or(1)
}

/// Query heads of one GQA group a block of the tensor-core prefill takes together
/// (`prefill_group`): the most of 8, 4, 2 that divides the group, else 1 (the one-warp build).
pub fn prefill_heads_a_block(heads: usize, kv_heads: usize) -> usize {
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return 1;
    }
    [8, 4, 2].into_iter().find(|&w| (heads / kv_heads).is_multiple_of(w)).unwrap_or(1)
}

/// Head dims the tensor-core prefill is instantiated for (larger ones take the CUDA-core
/// kernel: their output fragments would not fit a thread's registers).
pub const PREFILL_TC_DIMS: [usize; 4] = [32, 64, 96, 128];

/// The tensor-core prefill's tiles for a step: runs of up to 16 consecutive tokens of one
/// sequence at consecutive positions, as (first token, count) i64 pairs, padded with (0, 0) to
/// `tile_slots(tokens, seqs)` pairs so the launch's grid depends only on the step's shape (a
/// captured CUDA graph replays any step of that shape).
pub fn plan_tiles(token_seq: &[i64], token_pos: &[i64], seqs: usize) -> Vec<i64> {
    let mut tiles = Vec::new();
    let mut t = 0;
    while t < token_seq.len() {
        let mut n = 1;
        while n < 16
            && t + n < token_seq.len()
            && token_seq[t + n] == token_seq[t]
            && token_pos[t + n] == token_pos[t] + n as i64
        {
            n += 1;
        }
        tiles.extend([t as i64, n as i64]);
        t += n;
    }
    let slots = tile_slots(token_seq.len(), seqs).max(tiles.len() / 2);
    tiles.resize(2 * slots, 0);
    tiles
}

/// An upper bound of `plan_tiles`' tile count for `tokens` tokens of `seqs` sequences (each
/// sequence's tokens consecutive): every sequence starts a tile, every 16 tokens another.
pub fn tile_slots(tokens: usize, seqs: usize) -> usize {
    (tokens + 15 * seqs.min(tokens)) / 16
}

/// Head dims the paged attention kernels are instantiated for.
pub const HEAD_DIMS: [usize; 6] = [16, 32, 64, 96, 128, 256];

/// The kernels other multiples of 8 run on (`kernel_head_dim`; attention.cu's `_g` builds, the
/// row length a run-time value): PER = dim / 32 values a lane, a power of two, so it divides any
/// multiple of 8 they hold.
pub const GENERAL_DIMS: [usize; 4] = [32, 64, 128, 256];

/// A step's batch metadata on the device (FlashInfer's CSR page table), shared by all layers.
#[derive(Clone, Copy, Debug)]
pub struct StepMeta {
    pub tokens: usize,
    pub page_size: usize,
    /// i64 per token: its sequence, its position.
    pub token_seq: Ptr,
    pub token_pos: Ptr,
    /// i64 per sequence + 1, i32 per page.
    pub page_indptr: Ptr,
    pub page_indices: Ptr,
    /// i64 per sequence: its first token in this step, and its cached length.
    pub seq_start: Ptr,
    pub cached_len: Ptr,
    /// The tensor-core prefill's tiles (`plan_tiles`): `tile_slots` i64 pairs; 0 slots: none
    /// planned (the CUDA-core kernel runs).
    pub tiles: Ptr,
    pub tile_slots: usize,
    /// Leading tokens that are each their sequence's only token in this step (the runtime
    /// queues a step's decodes before its prefill chunks): `tiles`' first `decode_prefix` pairs
    /// are theirs, one a token (`decode_prefix_count`).
    pub decode_prefix: usize,
}

impl StepMeta {
    /// This step past its decode prefix, for the tensor-core prefill after a split-KV decode of
    /// the prefix (`Gpu::paged_decode_split_prefix`): the tiles after the prefix's.
    pub fn after_decode_prefix(&self) -> StepMeta {
        let skip = self.decode_prefix.min(self.tile_slots);
        StepMeta { tiles: self.tiles + 16 * skip as u64, tile_slots: self.tile_slots - skip, decode_prefix: 0, ..*self }
    }
}

/// The leading tokens of a step (`token_seq`, each sequence's tokens consecutive) that are
/// each their sequence's only token.
pub fn decode_prefix_count(token_seq: &[i64]) -> usize {
    let alone = |t: usize| token_seq.get(t + 1) != Some(&token_seq[t]);
    (0..token_seq.len()).take_while(|&t| alone(t)).count()
}

#[cfg(test)]
mod tests {
    use super::{heads_a_block, plan_tiles, tile_slots, Split};

    #[test]
    fn a_steps_decode_prefix_is_its_leading_lone_tokens_and_their_tiles() {
        // Three decodes, a prompt chunk of 20, a decode after it (not leading): 3.
        let seq = [0i64, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4];
        let pos: Vec<i64> = [9i64, 4, 30].into_iter().chain(0..20).chain([7]).collect();
        assert_eq!(super::decode_prefix_count(&seq), 3);
        let tiles = plan_tiles(&seq, &pos, 5);
        // The prefix's tiles first, one token each.
        assert_eq!(&tiles[..6], &[0, 1, 1, 1, 2, 1]);
        assert_eq!(&tiles[6..8], &[3, 16]);
        // A prompt first: no prefix; decodes only: all of them; nothing: 0.
        assert_eq!(super::decode_prefix_count(&[0, 0, 1]), 0);
        assert_eq!(super::decode_prefix_count(&[0, 1, 2]), 3);
        assert_eq!(super::decode_prefix_count(&[]), 0);
        let meta = super::StepMeta {
            tokens: seq.len(),
            page_size: 16,
            token_seq: 0,
            token_pos: 0,
            page_indptr: 0,
            page_indices: 0,
            seq_start: 0,
            cached_len: 0,
            tiles: 1000,
            tile_slots: tiles.len() / 2,
            decode_prefix: 3,
        };
        let after = meta.after_decode_prefix();
        assert_eq!((after.tiles, after.tile_slots, after.decode_prefix), (1048, tiles.len() / 2 - 3, 0));
    }

    #[test]
    fn a_prefill_block_takes_a_divisor_of_the_gqa_group() {
        // Llama-3.x (group 4), Qwen3-30B-A3B (32 / 4: 8), group 16 (8 a block), Qwen2.5-7B
        // (28 / 4: 7, one warp), group 6 (2), no GQA, a group that does not divide.
        for (heads, kv, w) in [(32, 8, 4), (32, 4, 8), (64, 4, 8), (28, 4, 1), (12, 2, 2), (16, 16, 1), (10, 4, 1)] {
            assert_eq!(super::prefill_heads_a_block(heads, kv), w, "{heads} heads, {kv} kv heads");
        }
    }

    #[test]
    fn a_large_step_takes_fewer_chunks_within_the_partials() {
        let s = Split { chunk: 16, splits: 32, partial: 0, counters: 0 };
        // Within the budget: unchanged.
        let same = s.for_tokens(256, 256);
        assert_eq!((same.chunk, same.splits), (16, 32));
        for (tokens, splits) in [(512, 16), (1024, 8), (300, 27), (8192, 1), (100_000, 1)] {
            let t = s.for_tokens(tokens, 256);
            assert_eq!(t.splits, splits, "{tokens} tokens");
            assert!(t.chunk * t.splits >= 16 * 32, "{tokens} tokens: every position in a chunk");
            assert!(tokens * t.splits <= 256 * 32 || t.splits == 1, "{tokens} tokens: within the partials");
        }
    }

    #[test]
    fn a_decode_block_takes_the_gqa_group_heads_its_registers_allow() {
        // Llama-3.x (group 4), a group of 8, of 6 (2 a block), of 7 and 3 (Qwen2.5-0.5B,
        // SmolLM2: one a block), no GQA.
        assert_eq!(heads_a_block(32, 8, 128), 4);
        assert_eq!(heads_a_block(16, 2, 128), 8);
        assert_eq!(heads_a_block(16, 2, 256), 4);
        assert_eq!(heads_a_block(12, 2, 64), 2);
        assert_eq!(heads_a_block(14, 2, 64), 1);
        assert_eq!(heads_a_block(9, 3, 64), 1);
        assert_eq!(heads_a_block(8, 8, 128), 1);
        assert_eq!(heads_a_block(8, 0, 128), 1);
    }

    #[test]
    fn split_chunks_are_the_least_worth_a_block_at_most_32() {
        assert_eq!(Split::plan(512, 64), (64, 8));
        assert_eq!(Split::plan(512, 16), (16, 32));
        // Longer sequences than 32 chunks cover: the kernels lengthen them (`token_chunk`).
        assert_eq!(Split::plan(2048, 16), (16, 32));
        assert_eq!(Split::plan(1 << 24, 256), (256, 32));
        assert_eq!(Split::plan(100, 64), (64, 2));
        assert_eq!(Split::plan(0, 0), (1, 1));
    }

    #[test]
    fn tiles_cut_runs_of_16_within_a_sequence_and_pad_to_the_shape_bound() {
        // A 20-token prefill, one decode token, 3 tokens of a third sequence.
        let seq: Vec<i64> = [vec![0; 20], vec![1], vec![2; 3]].concat();
        let pos: Vec<i64> = [(0..20).collect::<Vec<i64>>(), vec![37], vec![15, 16, 17]].concat();
        let tiles = plan_tiles(&seq, &pos, 3);
        assert_eq!(tile_slots(24, 3), 4);
        assert_eq!(tiles, vec![0, 16, 16, 4, 20, 1, 21, 3]);
        // Decode-only: one tile a token, no padding needed.
        let t = plan_tiles(&[0, 1, 2, 3], &[5, 9, 1, 7], 4);
        assert_eq!(t, vec![0, 1, 1, 1, 2, 1, 3, 1]);
        // One long sequence: 40 tokens, tiles of 16, 16, 8, padded to the bound (40 + 15) / 16.
        let t = plan_tiles(&[0; 40], &(100..140).collect::<Vec<i64>>(), 1);
        assert_eq!(t, vec![0, 16, 16, 16, 32, 8]);
        // Fewer tiles than slots: the rest (0, 0).
        let t = plan_tiles(&[0; 16], &(0..16).collect::<Vec<i64>>(), 1);
        assert_eq!(tile_slots(16, 1), 1);
        assert_eq!(t, vec![0, 16]);
        let t = plan_tiles(&[0, 0, 1], &[0, 1, 0], 2);
        assert_eq!(tile_slots(3, 2), 2);
        assert_eq!(t, vec![0, 2, 2, 1]);
        let t = plan_tiles(&[0, 1, 1], &[4, 0, 1], 2);
        assert_eq!(t, vec![0, 1, 1, 2]);
        // A sequence whose positions are not consecutive still gets correct tiles.
        let t = plan_tiles(&[0, 0, 0], &[0, 1, 5], 1);
        assert_eq!(t, vec![0, 2, 2, 1]);
    }
}
