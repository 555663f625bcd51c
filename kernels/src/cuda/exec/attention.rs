//! The attention launchers: KV writes, paged attention (prefill on CUDA or tensor cores, the
//! split-KV decode in its throughput and latency builds, RoPE fused with the KV write), the
//! `triton` backend's slot attention, and the host-side plans they take (splits, tensor-core
//! tiles, the step's metadata).

use cudarc::driver::LaunchConfig;

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
        let cfg = LaunchConfig {
            grid_dim: (quads.div_ceil(256) as u32, (heads + kv_heads) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as write_kv; q_out [heads, tokens, d]; q, k, v rows where `rows` says (the
        // caller's views of its tensors: heads × tokens rows of d within them); one thread a
        // token's four pairs of one head (d % 8 == 0, the index within 32 bits: checked above).
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
    /// Chunks for sequences of up to `max_len` positions: at least `min_chunk` positions each
    /// (`Gpu::split_min_chunk`: what the latency build's four warps take in one pass), at most 32
    /// chunks. On an H200 longer chunks (at least 64, 128, 256 positions) made the 8B decode
    /// step slower: 4.43, 4.75, 5.08 ms against 4.22 at 32 (fewer blocks, more passes in each);
    /// up to 64 chunks for long sequences (measured with a page-index preload in the kernels,
    /// since removed) made the 8B step at 2000 positions no faster (4.816 ms against 4.846) and
    /// the 1B's slower (1.188 against 1.113).
    pub fn plan(max_len: usize, min_chunk: usize) -> (usize, usize) {
        let chunk = max_len.div_ceil(32).max(min_chunk.max(1));
        (chunk, max_len.div_ceil(chunk).max(1))
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
fn split_build(builds: &[Vec<Kernel>; 4], dt: Dt, d: usize, mods: ScoreMods) -> Result<Kernel, Unavailable> {
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
fn build(dt: Dt, kv_fp8: Option<(f32, f32)>) -> Result<usize, Unavailable> {
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
fn head_dim_index(d: usize, kernel: &str) -> Result<usize, Unavailable> {
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
    fn split_chunks_cover_the_longest_sequence_in_at_most_32() {
        assert_eq!(Split::plan(512, 64), (64, 8));
        assert_eq!(Split::plan(512, 16), (16, 32));
        assert_eq!(Split::plan(2048, 16), (64, 32));
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
