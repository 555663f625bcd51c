//! The element-wise, layout, embedding and token-picking launchers (graph.cu, sample.cu):
//! strided copies, binary and unary ops, fills, means, RoPE, gated activations, embedding rows,
//! index selects, the argmax and the sampler.

use cudarc::driver::LaunchConfig;

use super::*;

impl Gpu {
    /// `out` (contiguous, `dt_out`) = `input` read with `s.sa` strides; with `strided_dst`,
    /// written at `s.sb` strides instead of contiguously.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_strided(
        &self,
        input: Ptr,
        dt_in: Dt,
        out: Ptr,
        dt_out: Dt,
        n: usize,
        s: Strided,
        strided_dst: bool,
    ) -> Result<(), Unavailable> {
        let (di, dout, n64, sd) = (dt_in as i32, dt_out as i32, n as i64, strided_dst as i32);
        let mut b = self.launcher(self.f.copy_strided);
        b.arg(&input).arg(&di).arg(&out).arg(&dout).arg(&n64).arg(&s).arg(&sd);
        // SAFETY: the kernel reads/writes at offsets the strides give within the callers' tensors.
        launched("copy_strided", unsafe { b.launch(grid(n, 256)) }.map(|_| ()))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn binary(
        &self,
        op: Binary,
        a: (Ptr, Dt),
        b: (Ptr, Dt),
        out: (Ptr, Dt),
        n: usize,
        s: Strided,
    ) -> Result<(), Unavailable> {
        let (da, db, dout, n64, o) = (a.1 as i32, b.1 as i32, out.1 as i32, n as i64, op as i32);
        let mut l = self.launcher(self.f.binary);
        l.arg(&a.0).arg(&da).arg(&b.0).arg(&db).arg(&out.0).arg(&dout).arg(&n64).arg(&o).arg(&s);
        // SAFETY: offsets from the strides stay within the operands (shapes checked by the caller).
        launched("binary", unsafe { l.launch(grid(n, 256)) }.map(|_| ()))
    }

    pub fn unary(&self, op: Unary, input: Ptr, out: Ptr, dt: Dt, n: usize, scalar: f64) -> Result<(), Unavailable> {
        let (d, n64, o) = (dt as i32, n as i64, op as i32);
        let mut l = self.launcher(self.f.unary);
        l.arg(&input).arg(&out).arg(&d).arg(&n64).arg(&o).arg(&scalar);
        // SAFETY: both hold n elements of dt.
        launched("unary", unsafe { l.launch(grid(n, 256)) }.map(|_| ()))
    }

    /// Uniform parts of one weight at `out`, one after another, in one launch: part `(n, seed,
    /// scale)` is `n` values of `dt` in chunks of `chunk` values, its chunk k an xorshift32 stream
    /// from `(seed ^ k·0x9e3779b9) | 1`, each value `(x / u32::MAX · 2 − 1) · scale` (core's
    /// `weights::Synthetic::Uniform`: the CPU's values, bit for bit).
    pub fn fill_uniform(&self, out: Ptr, dt: Dt, parts: &[(usize, u32, f32)], chunk: usize) -> Result<(), Unavailable> {
        if parts.is_empty() {
            return Ok(());
        }
        let chunk = chunk.max(1);
        let (mut table, mut at, mut chunks) = (Vec::with_capacity(5 * parts.len() + 1), 0usize, 0usize);
        for &(n, seed, scale) in parts {
            table.extend([at as i64, n as i64, seed as i64, scale.to_bits() as i32 as i64, chunks as i64]);
            at += n;
            chunks += n.div_ceil(chunk);
        }
        table.push(chunks as i64);
        let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = self.alloc(bytes.len(), "generated weights' part table")?;
        self.upload(t.ptr, &bytes)?;
        let (d, np, c32) = (dt as i32, parts.len() as i32, chunk as i32);
        let mut l = self.launcher(self.f.fill_uniform);
        l.arg(&out).arg(&d).arg(&t.ptr).arg(&np).arg(&c32);
        // SAFETY: out holds the parts' values of dt, one after another; the table is theirs.
        launched("fill_uniform", unsafe { l.launch(grid(chunks, 128)) }.map(|_| ()))?;
        // The table is freed on return: wait for the launch that reads it.
        self.sync()
    }

    /// `n` values of `dt` at `out`, each `v`.
    pub fn fill_const(&self, out: Ptr, dt: Dt, n: usize, v: f32) -> Result<(), Unavailable> {
        let (d, n64) = (dt as i32, n as i64);
        let mut l = self.launcher(self.f.fill_const);
        l.arg(&out).arg(&d).arg(&n64).arg(&v);
        // SAFETY: out holds n elements of dt.
        launched("fill_const", unsafe { l.launch(grid(n.min(1 << 24), 256)) }.map(|_| ()))
    }

    pub fn mean_last(
        &self,
        input: Ptr,
        dt_in: Dt,
        out: Ptr,
        dt_out: Dt,
        rows: usize,
        n: usize,
    ) -> Result<(), Unavailable> {
        let (di, dout, n32) = (dt_in as i32, dt_out as i32, n as i32);
        let mut l = self.launcher(self.f.mean_last);
        l.arg(&input).arg(&di).arg(&out).arg(&dout).arg(&n32);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: rows × n in, rows out.
        launched("mean_last", unsafe { l.launch(cfg) }.map(|_| ()))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: Ptr,
        dt: Dt,
        cos: Ptr,
        sin: Ptr,
        out: Ptr,
        rows: usize,
        table_rows: usize,
        d: usize,
    ) -> Result<(), Unavailable> {
        let (dt32, r64, t64, d32) = (dt as i32, rows as i64, table_rows as i64, d as i32);
        let mut l = self.launcher(self.f.rope);
        l.arg(&x).arg(&dt32).arg(&cos).arg(&sin).arg(&out).arg(&r64).arg(&t64).arg(&d32);
        // SAFETY: rows × d in x and out, table_rows × d in cos and sin.
        launched("rope", unsafe { l.launch(grid(rows * d / 2, 256)) }.map(|_| ()))
    }

    /// `out [rows, inter] = act(gate) * up`; `up = None` reads both from `gate` rows of 2·inter.
    /// With `codes_scale = Some(s)` (one f32 on the device) `out` gets one E4M3 code a value, of
    /// the result (rounded to `dt`) divided by `s`.
    #[allow(clippy::too_many_arguments)]
    pub fn silu_mul(
        &self,
        gate: Ptr,
        up: Option<Ptr>,
        dt: Dt,
        out: Ptr,
        codes_scale: Option<Ptr>,
        rows: usize,
        inter: usize,
        act: GateAct,
    ) -> Result<(), Unavailable> {
        let (u, d, r64, i32_, a32) = (up.unwrap_or(0), dt as i32, rows as i64, inter as i32, act as i32);
        let qs = codes_scale.unwrap_or(0);
        if act == GateAct::Silu
            && dt == Dt::BF16
            && inter > 0
            && inter.is_multiple_of(8)
            && (gate | u | out).is_multiple_of(16)
        {
            let mut l = self.launcher(self.f.silu_mul_bf16x8);
            l.arg(&gate).arg(&u).arg(&out).arg(&r64).arg(&i32_).arg(&qs);
            // x: a row's 8-value pieces (blocks of up to 256 threads), y: rows (the kernel
            // strides past 65,535).
            let pieces = (inter / 8) as u32;
            let block = pieces.min(256).next_multiple_of(32);
            let cfg = LaunchConfig {
                grid_dim: (pieces.div_ceil(block), rows.clamp(1, 65_535) as u32, 1),
                block_dim: (block, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as below; 8 values a thread, aligned as checked.
            let name = if qs == 0 { "silu_mul_bf16x8" } else { "silu_mul_bf16x8_fp8" };
            return launched(name, unsafe { l.launch(cfg) }.map(|_| ()));
        }
        let mut l = self.launcher(self.f.silu_mul);
        l.arg(&gate).arg(&u).arg(&d).arg(&out).arg(&r64).arg(&i32_).arg(&a32).arg(&qs);
        // SAFETY: sizes as documented (out rows × inter bytes with qs); qs one f32 or null.
        launched(
            if qs == 0 { "silu_mul" } else { "silu_mul_fp8" },
            unsafe { l.launch(grid(rows * inter, 256)) }.map(|_| ()),
        )
    }

    /// `out[t] = weight[ids[t] - start]` for a slice of `rows` rows of a `vocab`-row table
    /// (the whole table: start 0, vocab = rows); ids of other ranks' rows give zeros, an id
    /// outside the table is flagged in the i64 at `bad` (`bad_index` reads it).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding(
        &self,
        weight: Ptr,
        ids: Ptr,
        out: Ptr,
        tokens: usize,
        row_bytes: usize,
        (rows, start, vocab): (usize, usize, usize),
        bad: Ptr,
    ) -> Result<(), Unavailable> {
        if tokens == 0 || row_bytes == 0 {
            return Ok(());
        }
        let (t64, rb, r64, s64, v64) = (tokens as i64, row_bytes as i64, rows as i64, start as i64, vocab as i64);
        let vec = i32::from(row_bytes.is_multiple_of(16) && (weight | out).is_multiple_of(16));
        let mut l = self.launcher(self.f.embedding_rows);
        l.arg(&weight).arg(&ids).arg(&out).arg(&t64).arg(&rb).arg(&r64).arg(&s64).arg(&v64).arg(&bad).arg(&vec);
        // x: a row's 16-byte spans (blocks of up to 256 threads), y: tokens (the kernel strides
        // past 65,535).
        let spans = row_bytes.div_ceil(16) as u32;
        let block = spans.min(256).next_multiple_of(32);
        let cfg = LaunchConfig {
            grid_dim: (spans.div_ceil(block), tokens.min(65_535) as u32, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: ids are checked in the kernel against `vocab`, rows read only inside the slice;
        // 16-byte accesses only where `vec` says both pointers and the row length allow them.
        launched("embedding", unsafe { l.launch(cfg) }.map(|_| ()))
    }

    /// `out[o, k, :] = x[o, idx[k], :]` for x `[outer, len, inner]`; an index outside
    /// `0..len` is flagged in the i64 at `bad` (`bad_index` reads it).
    #[allow(clippy::too_many_arguments)]
    pub fn index_select(
        &self,
        x: Ptr,
        idx: Ptr,
        out: Ptr,
        outer: usize,
        nidx: usize,
        len: usize,
        inner_bytes: usize,
        bad: Ptr,
    ) -> Result<(), Unavailable> {
        let (o, k, n, ib) = (outer as i64, nidx as i64, len as i64, inner_bytes as i64);
        let mut l = self.launcher(self.f.index_select);
        l.arg(&x).arg(&idx).arg(&out).arg(&o).arg(&k).arg(&n).arg(&ib).arg(&bad);
        // SAFETY: indices are checked in the kernel against `len`.
        launched("index_select", unsafe { l.launch(grid(outer * nidx * inner_bytes, 256)) }.map(|_| ()))
    }

    /// Argmax of each of `rows` rows of logits into i64 `out`; `scratch` holds
    /// `rows × ARGMAX_PARTS` (f32, i32) pairs.
    pub fn argmax_rows(
        &self,
        logits: Ptr,
        dt: Dt,
        out: Ptr,
        rows: usize,
        vocab: usize,
        scratch: Ptr,
    ) -> Result<(), Unavailable> {
        let (d, v, parts) = (dt as i32, vocab as i32, ARGMAX_PARTS as i32);
        let part_i = scratch + 4 * (rows * ARGMAX_PARTS) as u64;
        let mut l = self.launcher(self.f.argmax_partial);
        l.arg(&logits).arg(&d).arg(&scratch).arg(&part_i).arg(&v);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, ARGMAX_PARTS as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: rows × vocab logits; rows × ARGMAX_PARTS partials in scratch.
        launched("argmax_partial", unsafe { l.launch(cfg) }.map(|_| ()))?;
        let mut l = self.launcher(self.f.argmax_final);
        l.arg(&scratch).arg(&part_i).arg(&out).arg(&parts);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: reads the partials written above; rows ids out.
        launched("argmax_final", unsafe { l.launch(cfg) }.map(|_| ()))
    }

    /// One token per row of logits `[rows, vocab]` (f32 or bf16) sampled as `params[row]`
    /// says (`RowSampling`, uploaded by the caller): the CPU sampler's semantics on the GPU.
    pub fn sample_rows(
        &self,
        logits: Ptr,
        dt: Dt,
        params: Ptr,
        out: Ptr,
        rows: usize,
        vocab: usize,
    ) -> Result<(), Unavailable> {
        if !matches!(dt, Dt::F32 | Dt::BF16) {
            return Err(Unavailable(format!("GPU sampling reads f32 or bf16 logits, not {dt:?}")));
        }
        // The kernel's fixed-point sums hold a vocabulary of up to 2^21.
        if vocab > 1 << 21 {
            return Err(Unavailable(format!("GPU sampling takes vocabularies of up to 2^21 tokens, not {vocab}")));
        }
        let (d, v) = (dt as i32, vocab as i32);
        let mut l = self.launcher(self.f.sample_rows);
        l.arg(&logits).arg(&d).arg(&params).arg(&out).arg(&v);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: rows × vocab logits, rows `RowSampling` params, rows i64 ids out.
        launched("sample_rows", unsafe { l.launch(cfg) }.map(|_| ()))
    }
}

/// The bad index an error flag of `Gpu::embedding` or `Gpu::index_select` holds after a step
/// (the i64 at `bad`), or None where every index was in range: the kernels store a bad index
/// plus one past the end and a negative one as it is, so no bad index reads as 0.
pub fn bad_index(flag: i64) -> Option<i64> {
    match flag {
        0 => None,
        v if v < 0 => Some(v),
        v => Some(v - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::bad_index;

    /// Every bad index reads back, negative ones included (stored as they are, so -1 does not
    /// read as "no error").
    #[test]
    fn every_bad_index_reads_back_from_its_flag() {
        assert_eq!(bad_index(0), None);
        for (flag, id) in [(1i64, 0i64), (32_001, 32_000), (-1, -1), (-9, -9), (i64::MIN, i64::MIN)] {
            assert_eq!(bad_index(flag), Some(id), "flag {flag}");
        }
    }
}
