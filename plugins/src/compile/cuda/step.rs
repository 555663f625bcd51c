//! Step staging: a step's inputs and batch metadata (the CSR page table, tiles, splits) packed
//! into one upload, the kernels' error flags, and the output read back.

use super::*;

/// Where a step's inputs landed on the device.
pub(super) struct Staged {
    pub(super) meta: Option<StepMeta>,
    pub(super) input_ptrs: Vec<Ptr>,
    /// Sequences in the step (rows of logits wanted), before padding.
    pub(super) rows: usize,
}

impl CudaModel {
    /// Packs the graph inputs and the step's metadata (CSR page table) into one upload.
    /// `pad_to` adds one-token sequences on the scratch page up to that many sequences.
    pub(super) fn stage(
        &self,
        inputs: &[Tensor],
        step: Option<&StepContext>,
        pad_to: Option<usize>,
    ) -> Result<(Staged, Vec<Tensor>)> {
        let mut inputs: Vec<Tensor> = inputs.to_vec();
        let rows = self.gather_rows(&inputs);
        let mut host = Vec::new();
        let mut offsets = Vec::new();
        let push = |host: &mut Vec<u8>, b: &[u8]| -> usize {
            let at = host.len();
            host.extend_from_slice(b);
            host.resize(at + padded(b.len()), 0);
            at
        };
        let mut meta_host = None;
        if let Some(cx) = step {
            let plan = cx.plan;
            let (mut seq, mut pos) = (
                plan.token_seq.iter().map(|&s| s as i64).collect::<Vec<_>>(),
                plan.token_pos.iter().map(|&p| p as i64).collect::<Vec<_>>(),
            );
            let mut indptr = vec![0i64];
            let mut indices: Vec<i32> = Vec::new();
            for pt in &plan.page_tables {
                indices.extend(pt.iter().map(|&p| p as i32));
                indptr.push(indices.len() as i64);
            }
            if let Some(b) = pad_to {
                let (s0, t0) = (plan.page_tables.len(), seq.len());
                for k in 0..b.saturating_sub(s0) {
                    seq.push((s0 + k) as i64);
                    pos.push(0);
                    indices.push(self.kv_pages as i32);
                    indptr.push(indices.len() as i64);
                }
                // The graph inputs grow the same way: token 0 at position 0, its own logits row.
                let extra = b.saturating_sub(t0);
                for (i, &v) in self.graph.inputs.iter().enumerate() {
                    let name = &self.graph.value(v).name;
                    let mut vals = inputs[i].to_i64().into_owned();
                    match name.as_str() {
                        "input_ids" | "position_ids" => vals.extend(std::iter::repeat_n(0, extra)),
                        _ => vals.extend((t0..t0 + extra).map(|t| t as i64)),
                    }
                    let mut shape = inputs[i].shape().to_vec();
                    *shape.last_mut().expect("rank >= 1") += extra;
                    inputs[i] = Tensor::from_i64(shape, vals)?;
                }
            }
            meta_host = Some((seq, pos, indptr, indices));
        }
        for t in &inputs {
            offsets.push(push(&mut host, host_bytes(t)?));
        }
        let mut meta = None;
        if let Some((seq, pos, indptr, indices)) = meta_host {
            // Per sequence: its first token in the step and that token's position.
            let nseq = indptr.len() - 1;
            let (mut start, mut cached) = (vec![-1i64; nseq], vec![0i64; nseq]);
            for (t, (&sq, &ps)) in seq.iter().zip(&pos).enumerate() {
                if start[sq as usize] < 0 {
                    start[sq as usize] = t as i64;
                    cached[sq as usize] = ps;
                }
            }
            let b = |v: &[i64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
            let (a, p, ip) = (push(&mut host, &b(&seq)), push(&mut host, &b(&pos)), push(&mut host, &b(&indptr)));
            let (ss, cl) = (push(&mut host, &b(&start)), push(&mut host, &b(&cached)));
            let tiles = plan_tiles(&seq, &pos, nseq);
            let tl = push(&mut host, &b(&tiles));
            // Last: the only array whose length varies between steps of one batch size.
            let ix: Vec<u8> = indices.iter().flat_map(|x| x.to_le_bytes()).collect();
            let ii = push(&mut host, &ix);
            let base = self.staging.ptr;
            meta = Some(StepMeta {
                tokens: seq.len(),
                page_size: self.page_size,
                token_seq: base + a as u64,
                token_pos: base + p as u64,
                page_indptr: base + ip as u64,
                page_indices: base + ii as u64,
                seq_start: base + ss as u64,
                cached_len: base + cl as u64,
                tiles: base + tl as u64,
                tile_slots: tiles.len() / 2,
                decode_prefix: decode_prefix_count(&seq),
            });
        }
        if host.len() > self.staging.bytes() {
            return Err(Error::Msg(format!(
                "this step's inputs take {} bytes, more than the {} planned for the largest step",
                host.len(),
                self.staging.bytes()
            )));
        }
        self.gpu.upload(self.staging.ptr, &host).map_err(gpu_err)?;
        let input_ptrs = offsets.iter().map(|&o| self.staging.ptr + o as u64).collect();
        Ok((Staged { meta, input_ptrs, rows }, inputs))
    }
    pub(super) fn check_flags(&self) -> Result<()> {
        let mut f = [0u8; 16];
        self.gpu.download(self.flags.ptr, &mut f).map_err(gpu_err)?;
        self.flags_ok(&f)
    }

    /// The kernels' error flags (the first 16 bytes of the flags buffer) as an error.
    pub(super) fn flags_ok(&self, f: &[u8]) -> Result<()> {
        use autodeploy_core::custom_op::ErrorFlag;
        use autodeploy_core::ops::gather::{EMBEDDING, INDEX_SELECT};
        let flag = |e: ErrorFlag| {
            let at = e.offset() as usize;
            i64::from_le_bytes(f[at..at + 8].try_into().expect("8 bytes"))
        };
        use autodeploy_kernels::cuda::exec::bad_index;
        if let Some(id) = bad_index(flag(ErrorFlag::Embedding)) {
            return Err(Error::op(EMBEDDING, format!("token id {id} is out of range for the vocabulary")));
        }
        if let Some(i) = bad_index(flag(ErrorFlag::Gather)) {
            return Err(Error::op(INDEX_SELECT, format!("index {i} is out of range")));
        }
        Ok(())
    }

    /// The first `rows` rows of the output (rows: everything but the last dim; a CUDA-graph
    /// step computes padding rows after them), shaped like the graph's output.
    pub(super) fn download_rows(&self, p: Ptr, shape: &[usize], rows: usize) -> Result<Tensor> {
        let o = self.graph.outputs[0];
        let dtype = self.graph.meta(o).dtype;
        let width = shape.last().copied().unwrap_or(1);
        let take = rows.min(total_rows(shape));
        let mut bytes = vec![0u8; take * width * dtype.size_in_bytes()];
        self.gpu.download(p, &mut bytes).map_err(gpu_err)?;
        self.check_flags()?;
        let s = if take == total_rows(shape) {
            shape.to_vec()
        } else {
            // Padding rows dropped: [1, .., 1, rows, width].
            let mut s = vec![1; shape.len().saturating_sub(2)];
            s.extend([take, width]);
            s
        };
        Tensor::from_le_bytes(dtype, s, &bytes)
    }
}

/// Rows of an output of this shape: all but its last dim.
pub(super) fn total_rows(shape: &[usize]) -> usize {
    shape[..shape.len().saturating_sub(1)].iter().product()
}
