//! The attention launchers: KV writes, paged attention (prefill on CUDA or tensor cores, the
//! split-KV decode in its throughput and latency builds, RoPE fused with the KV write) and the
//! `triton` backend's slot attention. The host-side plans they take (splits, tensor-core tiles,
//! the step's metadata, which build a dtype and head dim pick) are `plan.rs`'s.

use cudarc::driver::LaunchConfig;

use super::plan::{build, head_dim_index, split_build};
use super::*;

/// A sliding window, chunked attention and a soft-cap on attention scores (none: plain causal
/// attention), and an FP8 KV cache with its (k_scale, v_scale).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScoreMods {
    pub window: Option<usize>,
    pub chunk: Option<usize>,
    pub softcap: Option<f32>,
    pub kv_fp8: Option<(f32, f32)>,
}

impl ScoreMods {
    /// Whether the scores differ from plain causal attention's (a window, chunks, a soft-cap):
    /// such layers take the throughput split-KV build and the ragged CUDA-core kernel.
    pub fn shapes_scores(&self) -> bool {
        self.window.is_some() || self.chunk.is_some() || self.softcap.is_some()
    }

    /// The kernels' `int window, float softcap` (0: none). The kernels' `window` also carries
    /// chunked attention, as a negative number: chunks of `-window` positions.
    fn kernel_args(&self) -> Result<(i32, f32), Unavailable> {
        let window = match (self.window, self.chunk) {
            (Some(_), Some(_)) => return Err(Unavailable("a sliding window and chunked attention together".into())),
            (Some(w), None) => i32::try_from(w).ok(),
            (None, Some(c)) => i32::try_from(c).ok().map(|c| -c),
            (None, None) => Some(0),
        }
        .ok_or_else(|| Unavailable(format!("window {:?} / chunk {:?} too large", self.window, self.chunk)))?;
        Ok((window, self.softcap.unwrap_or(0.0)))
    }
}

impl Gpu {
    /// The least positions a chunk of the split-KV decode's latency build should have: one
    /// pass of its four warps (`attn_early_u` positions each). The throughput build's chunks
    /// are planned at `split_throughput_min_chunk`.
    pub fn split_min_chunk(&self) -> usize {
        4 * self.attn_early_u()
    }

    /// Positions a warp takes a pass in the split-KV decode's latency build: 8 or 4.
    pub fn attn_early_u(&self) -> usize {
        self.attn_early_u.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets them (4, else 8) for the launches after; the split chunks a model planned stay.
    pub fn set_attn_early_u(&self, u: usize) {
        self.attn_early_u.store(if u == 4 { 4 } else { 8 }, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the split-KV decode's throughput build takes a GQA group's query heads together.
    pub fn attn_group(&self) -> bool {
        self.attn_group.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets it for the launches after.
    pub fn set_attn_group(&self, on: bool) {
        self.attn_group.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Query heads a block of the split-KV decode's throughput build attends for
    /// (`heads_a_block`; 1 when `attn_group` is off).
    pub fn decode_heads_a_block(&self, heads: usize, kv_heads: usize, d: usize) -> usize {
        if self.attn_group() {
            heads_a_block(heads, kv_heads, d)
        } else {
            1
        }
    }

    /// Whether the split-KV decode's throughput build runs on tensor cores
    /// (`decode_tc.cu`'s `paged_decode_tc`) for these shapes: on (`decode_tc`), the GQA group
    /// taken together (`attn_group`), bf16, a head dim of `PREFILL_TC_DIMS`, at most 8 query
    /// heads a kv head (the N side of its MMAs), plain causal scores.
    pub fn decode_tc_applies(&self, dt: Dt, heads: usize, kv_heads: usize, d: usize, mods: ScoreMods) -> bool {
        dt == Dt::BF16 && !mods.shapes_scores() && self.decode_tc_shapes(heads, kv_heads, d)
    }

    /// The shape side of `decode_tc_applies` (and the switches).
    fn decode_tc_shapes(&self, heads: usize, kv_heads: usize, d: usize) -> bool {
        let group = if kv_heads > 0 && heads.is_multiple_of(kv_heads) { heads / kv_heads } else { 0 };
        self.decode_tc() && self.attn_group() && PREFILL_TC_DIMS.contains(&d) && (1..=8).contains(&group)
    }

    /// The least chunk to plan the throughput build's splits at for these layers' `(heads,
    /// kv_heads, head_dim)`: `SPLIT_TC_MIN_CHUNK` where every layer's shapes take the
    /// tensor-core build, else `SPLIT_MIN_CHUNK`. (The activations' dtype and a layer's window
    /// or soft-cap are not known here: such layers run the CUDA-core build at the longer chunk.)
    pub fn split_throughput_min_chunk(&self, layers: &[(usize, usize, usize)]) -> usize {
        let tc = !layers.is_empty() && layers.iter().all(|&(h, kvh, d)| self.decode_tc_shapes(h, kvh, d));
        if tc {
            SPLIT_TC_MIN_CHUNK
        } else {
            SPLIT_MIN_CHUNK
        }
    }

    /// Whether the throughput split-KV build may run on tensor cores (`decode_tc_applies`).
    pub fn decode_tc(&self) -> bool {
        self.decode_tc.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether that tensor-core build loads its fragments by `ldmatrix`.
    pub fn decode_ldmatrix(&self) -> bool {
        self.decode_ldsm.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets `decode_ldmatrix` for the launches after.
    pub fn set_decode_ldmatrix(&self, on: bool) {
        self.decode_ldsm.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether that tensor-core build, over an FP8 cache, makes its fragments straight from the
    /// codes (`[kernels] decode_fp8_codes`; `decode_ldmatrix` then does not apply).
    pub fn decode_fp8_codes(&self) -> bool {
        self.decode_codes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets `decode_fp8_codes` for the launches after.
    pub fn set_decode_fp8_codes(&self, on: bool) {
        self.decode_codes.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the tensor-core prefill takes a GQA group's heads a block
    /// (`prefill_heads_a_block`).
    pub fn prefill_group(&self) -> bool {
        self.prefill_group.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets `prefill_group` for the launches after.
    pub fn set_prefill_group(&self, on: bool) {
        self.prefill_group.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets `decode_tc` for the launches after (on only where the device has tensor cores).
    pub fn set_decode_tc(&self, on: bool) {
        let on = on && self.dev.cc.0 >= 8;
        self.decode_tc.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `paged_attention` runs on tensor cores for this layer and step: bf16, a head dim
    /// of `PREFILL_TC_DIMS`, plain causal scores, sm_80+ (`prefill_tc`), tiles planned.
    pub fn prefill_tc_applies(&self, dt: Dt, d: usize, mods: ScoreMods, meta: &StepMeta) -> bool {
        self.prefill_tc
            && dt == Dt::BF16
            && PREFILL_TC_DIMS.contains(&d)
            && !mods.shapes_scores()
            && meta.tile_slots > 0
    }

    /// Whether `flashinfer` runs a mixed step's decode prefix through the split-KV decode and
    /// the rest through the tensor-core prefill (`[kernels] mixed_step_split_decodes`).
    pub fn mixed_split_decodes(&self) -> bool {
        self.mixed_split
    }

    /// Whether steps of a few decode tokens take the split-KV decode's latency build (`[kernels]
    /// decode_latency_build`), not `rope_write_kv` and the throughput build.
    pub fn decode_latency_build(&self) -> bool {
        self.decode_latency
    }

    /// Writes this step's k/v `[kv_heads, tokens, d]` into their cache slots (an FP8 cache:
    /// `kv_fp8`'s scales).
    #[allow(clippy::too_many_arguments)]
    pub fn write_kv(
        &self,
        dt: Dt,
        k: Ptr,
        v: Ptr,
        kc: Ptr,
        vc: Ptr,
        meta: &StepMeta,
        kv_heads: usize,
        d: usize,
        kv_fp8: Option<(f32, f32)>,
    ) -> Result<(), Unavailable> {
        let f = &self.f.write_kv[build(dt, kv_fp8)?];
        let (ps, kvh, t, d32) = (meta.page_size as i32, kv_heads as i32, meta.tokens as i64, d as i32);
        let mut l = self.launcher(*f);
        l.arg(&k).arg(&v).arg(&kc).arg(&vc).arg(&meta.token_seq).arg(&meta.token_pos).arg(&meta.page_indptr);
        l.arg(&meta.page_indices).arg(&ps).arg(&kvh).arg(&t).arg(&d32);
        let scales = kv_fp8.unwrap_or((1.0, 1.0));
        if kv_fp8.is_some() {
            l.arg(&scales.0).arg(&scales.1);
        }
        // SAFETY: slots come from the page table the runtime planned within the cache's pages.
        launched("write_kv", unsafe { l.launch(grid(kv_heads * meta.tokens * d, 256)) }.map(|_| ()))
    }

    /// Paged attention of q `[heads, tokens, d]` over the cache, into out (its rows where
    /// `HeadRows` says: `heads_major` is q's layout; `tokens_major` the o projection's input,
    /// no transpose after): on
    /// tensor cores (one warp per tile of 16 query tokens and head; with `prefill_group`, a
    /// block of `prefill_heads_a_block` such warps of one GQA group sharing the K and V they
    /// stage) where `prefill_tc` allows and the step has tiles, else one block per query token
    /// and head. `mods`: a sliding window and a soft-cap (those run on the CUDA-core kernel).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        dt: Dt,
        q: Ptr,
        kc: Ptr,
        vc: Ptr,
        (out, rows): (Ptr, HeadRows),
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        d: usize,
        scale: f32,
        mods: ScoreMods,
    ) -> Result<(), Unavailable> {
        let (ps, h, kvh, t) = (meta.page_size as i32, heads as i32, kv_heads as i32, meta.tokens as i64);
        let (ohs, ots) = (rows.head, rows.token);
        if let (true, Some(i)) =
            (self.prefill_tc_applies(dt, d, mods, meta), PREFILL_TC_DIMS.iter().position(|&x| x == d))
        {
            let w = if self.prefill_group() { prefill_heads_a_block(heads, kv_heads) } else { 1 };
            let builds = if w > 1 { &self.f.paged_prefill_tc_grp } else { &self.f.paged_prefill_tc };
            let mut l = self.launcher(builds[usize::from(mods.kv_fp8.is_some())][i]);
            l.arg(&q).arg(&kc).arg(&vc).arg(&meta.token_seq).arg(&meta.token_pos).arg(&meta.page_indptr);
            l.arg(&meta.page_indices).arg(&meta.tiles).arg(&ps).arg(&h).arg(&kvh).arg(&t).arg(&scale).arg(&out);
            l.arg(&ohs).arg(&ots);
            let scales = mods.kv_fp8.unwrap_or((1.0, 1.0));
            if mods.kv_fp8.is_some() {
                l.arg(&scales.0).arg(&scales.1);
            }
            let cfg = LaunchConfig {
                grid_dim: (meta.tile_slots as u32, (heads / w) as u32, 1),
                block_dim: (32 * w as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as write_kv; `tiles` holds tile_slots (first token, count) pairs of
            // consecutive tokens of one sequence each (`plan_tiles`); w divides the GQA group
            // (`prefill_heads_a_block`), so a block's heads share one KV head.
            let name = if w > 1 { "paged_prefill_tc_grp" } else { "paged_prefill_tc" };
            return launched(name, unsafe { l.launch(cfg) }.map(|_| ()));
        }
        let di = head_dim_index(d, "paged attention")?;
        let f = &self.f.paged_attention[build(dt, mods.kv_fp8)?][di];
        let mut l = self.launcher(*f);
        l.arg(&q).arg(&kc).arg(&vc).arg(&meta.token_seq).arg(&meta.token_pos).arg(&meta.page_indptr);
        l.arg(&meta.page_indices).arg(&ps).arg(&h).arg(&kvh).arg(&t).arg(&scale).arg(&out).arg(&ohs).arg(&ots);
        let (window, softcap) = mods.kernel_args()?;
        let d32 = d as i32;
        l.arg(&window).arg(&softcap).arg(&d32);
        let scales = mods.kv_fp8.unwrap_or((1.0, 1.0));
        if mods.kv_fp8.is_some() {
            l.arg(&scales.0).arg(&scales.1);
        }
        let cfg = LaunchConfig {
            grid_dim: (meta.tokens as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as write_kv.
        launched("paged_attention", unsafe { l.launch(cfg) }.map(|_| ()))
    }
}

/// Where the head rows of a `[heads, tokens, d]` tensor lie: elements from one head's row to the
/// next head's (same token), and from one token's to the next's (same head); rows contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadRows {
    pub head: i64,
    pub token: i64,
}

impl HeadRows {
    /// `[heads, tokens, d]` contiguous.
    pub fn heads_major(tokens: usize, d: usize) -> HeadRows {
        HeadRows { head: (tokens * d) as i64, token: d as i64 }
    }

    /// `[tokens, heads, d]` contiguous (a linear's output viewed as heads, transposed).
    pub fn tokens_major(heads: usize, d: usize) -> HeadRows {
        HeadRows { head: d as i64, token: (heads * d) as i64 }
    }
}

impl Gpu {
    /// Split-KV decode attention, throughput build: positions cut into `split.splits` chunks of
    /// `split.chunk`, partial states in `split.partial` (`tokens × heads × splits × (d + 2)`
    /// f32), merged into out (its rows where `HeadRows` says) by the last chunk to finish.
    /// Reads q `[heads, tokens, d]` (rotated) and every position's k/v from the cache:
    /// `write_kv` or `rope_write_kv` runs first. Applies `mods` (window, soft-cap).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_split(
        &self,
        dt: Dt,
        q: Ptr,
        cache: (Ptr, Ptr),
        out: (Ptr, HeadRows),
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        d: usize,
        scale: f32,
        split: Split,
        mods: ScoreMods,
    ) -> Result<(), Unavailable> {
        self.decode_split_over(meta.tokens, dt, q, cache, out, meta, (heads, kv_heads, d), scale, split, mods)
    }

    /// `paged_decode_split` of the step's decode prefix alone (`meta.decode_prefix` tokens; q
    /// and out as for the whole step): a mixed step's decodes, the tensor-core prefill taking
    /// the tiles after them (`StepMeta::after_decode_prefix`).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_split_prefix(
        &self,
        dt: Dt,
        q: Ptr,
        cache: (Ptr, Ptr),
        out: (Ptr, HeadRows),
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        d: usize,
        scale: f32,
        split: Split,
        mods: ScoreMods,
    ) -> Result<(), Unavailable> {
        let n = meta.decode_prefix.min(meta.tokens);
        self.decode_split_over(n, dt, q, cache, out, meta, (heads, kv_heads, d), scale, split, mods)
    }

    /// The split-KV decode's throughput build over the step's first `n` tokens.
    #[allow(clippy::too_many_arguments)]
    fn decode_split_over(
        &self,
        n: usize,
        dt: Dt,
        q: Ptr,
        cache: (Ptr, Ptr),
        out: (Ptr, HeadRows),
        meta: &StepMeta,
        (heads, kv_heads, d): (usize, usize, usize),
        scale: f32,
        split: Split,
        mods: ScoreMods,
    ) -> Result<(), Unavailable> {
        let shapes = (heads, kv_heads, d);
        if self.decode_tc_applies(dt, heads, kv_heads, d, mods) {
            // One block a kv head: the group's heads are the N side of its MMAs.
            let i = PREFILL_TC_DIMS.iter().position(|&x| x == d).unwrap_or_default();
            let fp8 = usize::from(mods.kv_fp8.is_some());
            let tc = match (fp8 == 1 && self.decode_fp8_codes(), self.decode_ldmatrix()) {
                (true, _) => (self.f.paged_decode_tc_codes[i], "paged_decode_tc_codes"),
                (false, true) => (self.f.paged_decode_tc_ldsm[fp8][i], "paged_decode_tc_ldsm"),
                (false, false) => (self.f.paged_decode_tc[fp8][i], "paged_decode_tc"),
            };
            let hb = heads / kv_heads;
            return self.launch_split(
                tc,
                (q, 0, 0),
                (0, 0),
                None,
                cache,
                out,
                (meta, n),
                shapes,
                (scale, mods),
                split,
                hb,
            );
        }
        let hb = self.decode_heads_a_block(heads, kv_heads, d);
        let builds = match hb {
            2 => &self.f.paged_decode_split_grouped[0],
            4 => &self.f.paged_decode_split_grouped[1],
            8 => &self.f.paged_decode_split_grouped[2],
            _ => &self.f.paged_decode_split,
        };
        let f = (split_build(builds, dt, d, mods)?, "paged_decode_split");
        self.launch_split(f, (q, 0, 0), (0, 0), None, cache, out, (meta, n), shapes, (scale, mods), split, hb)
    }

    /// Split-KV decode attention, latency build (for steps of at most `SPLIT_EARLY_MAX_TOKENS`
    /// tokens), with the layer's RoPE and KV-cache write in the same launch: `qkv` are this
    /// step's q `[heads, tokens, d]` and k, v `[kv_heads, tokens, d]` as the linears left them;
    /// with `rope` (one `[tokens, d]` cos and sin table) q and k are rotated first, with
    /// `qk_norm` (q's and k's norm weights `[d]`, eps) each head row RMS-normalised before
    /// that (as the `rmsnorm` kernel, the norm's dtype `dt`). The kernel
    /// stores the step's k and v in the cache (an FP8 cache: `kv_fp8`'s scales). Otherwise as
    /// `paged_decode_split`, without a window or soft-cap (layers with them take the throughput
    /// build).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_split_fused(
        &self,
        dt: Dt,
        qkv: (Ptr, Ptr, Ptr),
        rope: Option<(Ptr, Ptr)>,
        qk_norm: Option<(Ptr, Ptr, f32)>,
        cache: (Ptr, Ptr),
        out: (Ptr, HeadRows),
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        d: usize,
        scale: f32,
        split: Split,
        kv_fp8: Option<(f32, f32)>,
    ) -> Result<(), Unavailable> {
        let f =
            if self.attn_early_u() == 4 { &self.f.paged_decode_split_early4 } else { &self.f.paged_decode_split_early };
        let tables = rope.unwrap_or((0, 0));
        if qk_norm.is_some() && rope.is_none() {
            return Err(Unavailable("the q/k norms are fused only with the RoPE".into()));
        }
        let plain = ScoreMods { kv_fp8, ..ScoreMods::default() };
        let f = (split_build(f, dt, d, plain)?, "paged_decode_split");
        let shapes = (heads, kv_heads, d);
        self.launch_split(f, qkv, tables, qk_norm, cache, out, (meta, meta.tokens), shapes, (scale, plain), split, 1)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_split(
        &self,
        (f, name): (Kernel, &'static str),
        qkv: (Ptr, Ptr, Ptr),
        (cos, sin): (Ptr, Ptr),
        qk_norm: Option<(Ptr, Ptr, f32)>,
        cache: (Ptr, Ptr),
        (out, rows): (Ptr, HeadRows),
        (meta, grid_tokens): (&StepMeta, usize),
        (heads, kv_heads, d): (usize, usize, usize),
        (scale, mods): (f32, ScoreMods),
        split: Split,
        heads_a_block: usize,
    ) -> Result<(), Unavailable> {
        let (ps, h, kvh, t) = (meta.page_size as i32, heads as i32, kv_heads as i32, meta.tokens as i64);
        let (chunk, splits) = (split.chunk as i32, split.splits as i32);
        let mut l = self.launcher(f);
        l.arg(&qkv.0).arg(&qkv.1).arg(&qkv.2).arg(&cos).arg(&sin).arg(&cache.0).arg(&cache.1);
        l.arg(&meta.token_seq).arg(&meta.token_pos).arg(&meta.page_indptr).arg(&meta.page_indices);
        l.arg(&meta.seq_start)
            .arg(&meta.cached_len)
            .arg(&ps)
            .arg(&h)
            .arg(&kvh)
            .arg(&t)
            .arg(&scale)
            .arg(&chunk)
            .arg(&splits);
        l.arg(&split.partial).arg(&split.counters).arg(&out).arg(&rows.head).arg(&rows.token);
        let (window, softcap) = mods.kernel_args()?;
        let d32 = d as i32;
        l.arg(&window).arg(&softcap).arg(&d32);
        let scales = mods.kv_fp8.unwrap_or((1.0, 1.0));
        if mods.kv_fp8.is_some() {
            l.arg(&scales.0).arg(&scales.1);
        }
        // Every split build takes the q/k norms' weights and eps last (only the latency build
        // reads them; null: no norms).
        let (qn, kn, neps) = qk_norm.unwrap_or((0, 0, 0.0));
        l.arg(&qn).arg(&kn).arg(&neps);
        let cfg = LaunchConfig {
            grid_dim: (grid_tokens as u32, (heads / heads_a_block) as u32, split.splits as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as paged_attention; the step's first `grid_tokens` tokens (at most
        // meta.tokens) index q/k/v and cos/sin, whose rows span meta.tokens; `partial` holds
        // grid_tokens × heads × splits × (d + 2) floats, `counters` grid_tokens × heads zeroed
        // ints.
        launched(name, unsafe { l.launch(cfg) }.map(|_| ()))
    }

    /// RoPE of q into `q_out` `[heads, tokens, d]` and of k into the cache, v copied to the
    /// cache: the rope and KV-write of a layer in one launch. q, k, v are read where `rows`
    /// says (`HeadRows::heads_major` for contiguous `[heads, tokens, d]`; a fused q/k/v linear's
    /// column slices in place). An FP8 cache: `kv_fp8`'s scales. With `qk_norm` (q's and k's
    /// norm weights `[d]`, eps) each head row of q and k is RMS-normalised before its rotation
    /// (`rope_norm_write_kv`, a warp a row; the norm's dtype `dt`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_write_kv(
        &self,
        dt: Dt,
        qkv: (Ptr, Ptr, Ptr),
        rows: [HeadRows; 3],
        (cos, sin): (Ptr, Ptr),
        qk_norm: Option<(Ptr, Ptr, f32)>,
        q_out: Ptr,
        cache: (Ptr, Ptr),
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        d: usize,
        kv_fp8: Option<(f32, f32)>,
    ) -> Result<(), Unavailable> {
        let b = build(dt, kv_fp8)?;
        let f = if qk_norm.is_some() { self.f.rope_norm_write_kv[b] } else { self.f.rope_write_kv[b] };
        let (ps, h, kvh, t, d32) = (meta.page_size as i32, heads as i32, kv_heads as i32, meta.tokens as i64, d as i32);
        let mut l = self.launcher(f);
        l.arg(&qkv.0).arg(&qkv.1).arg(&qkv.2).arg(&cos).arg(&sin).arg(&q_out).arg(&cache.0).arg(&cache.1);
        l.arg(&meta.token_seq).arg(&meta.token_pos).arg(&meta.page_indptr).arg(&meta.page_indices);
        l.arg(&ps).arg(&h).arg(&kvh).arg(&t).arg(&d32);
        for r in &rows {
            l.arg(&r.head).arg(&r.token);
        }
        let scales = kv_fp8.unwrap_or((1.0, 1.0));
        if kv_fp8.is_some() {
            l.arg(&scales.0).arg(&scales.1);
        }
        // `rope_write_kv` loads four values at once where every row starts 16-byte aligned
        // (d % 8 == 0 keeps a thread's offsets at multiples of 4 values).
        let aligned = [qkv.0, qkv.1, qkv.2, cos, sin, q_out].iter().all(|p| p.is_multiple_of(16))
            && rows.iter().all(|r| r.head % 4 == 0 && r.token % 4 == 0);
        let vec = i32::from(aligned);
        let rows = (heads + kv_heads) * meta.tokens;
        if let Some((qn, kn, eps)) = &qk_norm {
            l.arg(qn).arg(kn).arg(eps);
            // SAFETY: as below; qn, kn hold d elements of dt each.
            return launched("rope_norm_write_kv", unsafe { l.launch(grid(rows * 32, 256)) }.map(|_| ()));
        }
        // Four pairs a thread, a head a grid row, 32-bit indices in the kernel.
        let quads = meta.tokens * d / 8;
        if !d.is_multiple_of(8) || quads >= 1 << 31 || heads + kv_heads > 65_535 {
            return Err(Unavailable(format!(
                "rope_write_kv takes a head dim that is a multiple of 8, fewer than 2^31 / (d / 8) tokens and at most 65,535 heads: d {d}, {} tokens, {} heads",
                meta.tokens,
                heads + kv_heads
            )));
        }
        l.arg(&vec);
        let cfg = LaunchConfig {
            grid_dim: (quads.div_ceil(256) as u32, (heads + kv_heads) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as write_kv; q_out [heads, tokens, d]; q, k, v rows where `rows` says (the
        // caller's views of its tensors: heads × tokens rows of d within them); one thread a
        // token's four pairs of one head (d % 8 == 0, the index within 32 bits: checked above);
        // vector accesses only where `aligned` holds.
        launched("rope_write_kv", unsafe { l.launch(cfg) }.map(|_| ()))
    }
}

impl Gpu {
    /// The `triton` backend's fused kernel: attention over per-sequence contiguous cache slots,
    /// this step's k/v read directly and then stored. Needs `meta.seq_start`/`meta.cached_len`.
    /// `kv_fp8`: the cache holds E4M3 codes at these (k_scale, v_scale), the step's own k/v read
    /// through them as stored.
    #[allow(clippy::too_many_arguments)]
    pub fn slot_attention(
        &self,
        dt: Dt,
        qkv: (Ptr, Ptr, Ptr),
        cache: (Ptr, Ptr),
        out: Ptr,
        meta: &StepMeta,
        heads: usize,
        kv_heads: usize,
        d: usize,
        scale: f32,
        kv_fp8: Option<(f32, f32)>,
    ) -> Result<(), Unavailable> {
        let di = head_dim_index(d, "slot attention")?;
        let f = &self.f.slot_attention[build(dt, kv_fp8)?][di];
        let (ps, h, kvh, t) = (meta.page_size as i32, heads as i32, kv_heads as i32, meta.tokens as i64);
        let mut l = self.launcher(*f);
        l.arg(&qkv.0).arg(&qkv.1).arg(&qkv.2).arg(&cache.0).arg(&cache.1).arg(&meta.token_seq).arg(&meta.token_pos);
        l.arg(&meta.seq_start).arg(&meta.cached_len).arg(&meta.page_indptr).arg(&meta.page_indices);
        let d32 = d as i32;
        l.arg(&ps).arg(&h).arg(&kvh).arg(&t).arg(&scale).arg(&out).arg(&d32);
        if let Some(scales) = &kv_fp8 {
            l.arg(&scales.0).arg(&scales.1);
        }
        let cfg = LaunchConfig {
            grid_dim: (meta.tokens as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: slots are whole runs of pages the runtime reserved; step tokens index k/v.
        launched("slot_attention", unsafe { l.launch(cfg) }.map(|_| ()))
    }
}
