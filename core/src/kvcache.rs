//! The paged KV cache the runtime owns, the per-step batch metadata, and the attention-backend
//! interface that reads and writes the cache.

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::ops::attention::CachedAttn;
use crate::tensor::Tensor;

/// Cache geometry of one attention layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerCache {
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The layer reads K and V through FP8 (`Scoring::kv_fp8`): a device keeps its cache as
    /// E4M3 codes, one byte a value (the CPU's reference keeps their values as f32).
    pub fp8: bool,
}

impl LayerCache {
    /// Bytes a cached value takes on a device whose cache dtype is `elem` bytes.
    pub fn device_elem(&self, elem: usize) -> usize {
        if self.fp8 {
            1
        } else {
            elem
        }
    }
}

/// What a graph with cached attention needs from the runtime, derived from its nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheSpec {
    pub backend: String,
    pub layers: Vec<LayerCache>,
}

impl CacheSpec {
    /// Bytes one page of `page` tokens takes over all layers, K and V, at `elem` bytes a value.
    pub fn bytes_per_page(&self, page: usize, elem: usize) -> usize {
        self.layers.iter().map(|l| 2 * page * l.kv_heads * l.head_dim * elem).sum()
    }

    /// The same on a device whose cache dtype is `elem` bytes: FP8 layers one byte a value.
    pub fn device_bytes_per_page(&self, page: usize, elem: usize) -> usize {
        self.layers.iter().map(|l| 2 * page * l.kv_heads * l.head_dim * l.device_elem(elem)).sum()
    }

    /// `None` when the graph has no cached attention (it runs uncached, full sequence).
    pub fn of(g: &Graph) -> Result<Option<CacheSpec>> {
        let mut layers: Vec<Option<LayerCache>> = Vec::new();
        let mut backend = None;
        for n in &g.nodes {
            if let Some(CachedAttn { backend: b, layer, scoring, .. }) = n.op.cached_attention_of() {
                let km = g.meta(n.inputs[1]);
                let (kv_heads, head_dim) = match km.shape.as_slice() {
                    [_, h, _, d] => match (h.as_static(), d.as_static()) {
                        (Some(h), Some(d)) => (h, d),
                        _ => {
                            return Err(Error::op(
                                n.op.name(),
                                format!("k heads and head_dim must be static, got {km}"),
                            ))
                        }
                    },
                    _ => return Err(Error::op(n.op.name(), format!("k must be 4-D, got {km}"))),
                };
                if layers.len() <= layer {
                    layers.resize(layer + 1, None);
                }
                layers[layer] = Some(LayerCache { kv_heads, head_dim, fp8: scoring.kv_fp8.is_some() });
                match &backend {
                    None => backend = Some(b.clone()),
                    Some(x) if *x != b => {
                        return Err(Error::Msg(format!("graph mixes attention backends {x} and {b}")))
                    }
                    _ => {}
                }
            }
        }
        let Some(backend) = backend else { return Ok(None) };
        let layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| l.ok_or_else(|| Error::Msg(format!("cached attention layer {i} is missing"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(CacheSpec { backend, layers }))
    }
}

/// Hands out page ids, reference-counted: a page shared by several sequences (a common prefix)
/// or held by the prefix cache goes back to the free list when its last holder releases it.
#[derive(Debug)]
pub struct PagePool {
    free: Vec<u32>,
    refs: Vec<u32>,
    capacity: usize,
}

#[cfg(test)]
mod tests {
    use super::PagePool;

    #[test]
    fn runs_are_aligned_and_come_back() {
        let mut p = PagePool::new(8);
        assert_eq!(p.alloc_run(4), Some(vec![0, 1, 2, 3]));
        assert_eq!(p.alloc_run(4), Some(vec![4, 5, 6, 7]));
        assert_eq!(p.alloc_run(4), None);
        p.release(vec![0, 1, 2, 3]);
        assert_eq!(p.alloc_run(4), Some(vec![0, 1, 2, 3]));
        assert_eq!(p.available(), 0);
    }

    #[test]
    fn a_shared_page_is_free_only_after_its_last_release() {
        let mut p = PagePool::new(2);
        let a = p.alloc().unwrap();
        p.retain(a);
        assert_eq!(p.refs(a), 2);
        p.release([a]);
        assert_eq!((p.refs(a), p.available()), (1, 1), "one holder left");
        p.release([a]);
        assert_eq!((p.refs(a), p.available()), (0, 2));
        // Releasing a free page again changes nothing (never a double entry in the free list).
        p.release([a]);
        assert_eq!(p.available(), 2);
        assert_eq!([p.alloc(), p.alloc(), p.alloc()], [Some(0), Some(1), None]);
    }
}

impl PagePool {
    pub fn new(capacity: usize) -> PagePool {
        // Lowest ids first, so the cache's storage grows only as far as it is used.
        PagePool { free: (0..capacity as u32).rev().collect(), refs: vec![0; capacity], capacity }
    }
    /// A free page, held once.
    pub fn alloc(&mut self) -> Option<u32> {
        let p = self.free.pop()?;
        self.refs[p as usize] = 1;
        Some(p)
    }
    /// One more holder of a page already handed out.
    pub fn retain(&mut self, page: u32) {
        debug_assert!(self.refs[page as usize] > 0, "retain of free page {page}");
        self.refs[page as usize] += 1;
    }
    /// How many hold `page` (0: free).
    pub fn refs(&self, page: u32) -> u32 {
        self.refs[page as usize]
    }
    /// `n` consecutive pages starting at a multiple of `n` (a per-sequence slot, for attention
    /// backends that want each sequence contiguous), lowest first.
    pub fn alloc_run(&mut self, n: usize) -> Option<Vec<u32>> {
        if n == 0 {
            return Some(Vec::new());
        }
        let mut free = vec![false; self.capacity];
        for &p in &self.free {
            free[p as usize] = true;
        }
        let slot = (0..self.capacity / n).find(|&i| free[i * n..(i + 1) * n].iter().all(|&f| f))?;
        let run: Vec<u32> = (slot * n..(slot + 1) * n).map(|p| p as u32).collect();
        self.free.retain(|p| !run.contains(p));
        for &p in &run {
            self.refs[p as usize] = 1;
        }
        Some(run)
    }

    /// Drops one hold on each page; a page nobody holds any more is free again.
    pub fn release(&mut self, pages: impl IntoIterator<Item = u32>) {
        for p in pages {
            let r = &mut self.refs[p as usize];
            if *r == 0 {
                continue;
            }
            *r -= 1;
            if *r == 0 {
                self.free.push(p);
            }
        }
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }
    pub fn available(&self) -> usize {
        self.free.len()
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// K and V pages per layer, layout `[page, slot, kv_head, head_dim]`, stored as f32 (values
/// keep the precision the model computed them in: a bf16 k is stored exactly).
pub struct PagedKvCache {
    pub spec: CacheSpec,
    pub page_size: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pages: usize,
}

impl PagedKvCache {
    pub fn new(spec: CacheSpec, page_size: usize) -> PagedKvCache {
        let n = spec.layers.len();
        PagedKvCache { spec, page_size, k: vec![Vec::new(); n], v: vec![Vec::new(); n], pages: 0 }
    }

    fn page_len(&self, layer: usize) -> usize {
        let l = &self.spec.layers[layer];
        self.page_size * l.kv_heads * l.head_dim
    }

    /// Grows storage to hold pages `0..n`.
    pub fn ensure_pages(&mut self, n: usize) {
        if n <= self.pages {
            return;
        }
        for l in 0..self.k.len() {
            let len = n * self.page_len(l);
            self.k[l].resize(len, 0.0);
            self.v[l].resize(len, 0.0);
        }
        self.pages = n;
    }

    pub fn bytes(&self) -> usize {
        (0..self.k.len()).map(|l| 2 * self.pages * self.page_len(l) * 4).sum()
    }

    /// Mutable K and V storage of one layer.
    pub fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.k[layer], &mut self.v[layer])
    }
}

/// One forward step over a batch of sequences, tokens flattened in sequence order.
#[derive(Clone, Debug, Default)]
pub struct BatchMetadata {
    /// New tokens of each sequence in this step.
    pub seq_lens: Vec<usize>,
    /// Tokens each sequence already has in the cache (its first new token's position).
    pub cached_lens: Vec<usize>,
    /// Pages of each sequence, in order; must cover `cached_len + seq_len` positions.
    pub page_tables: Vec<Vec<u32>>,
}

/// Per-token view of a step, planned once and shared by every layer.
#[derive(Clone, Debug)]
pub struct StepPlan {
    /// For each flattened token: its sequence and its position in that sequence.
    pub token_seq: Vec<usize>,
    pub token_pos: Vec<usize>,
    pub page_size: usize,
    pub page_tables: Vec<Vec<u32>>,
}

impl StepPlan {
    pub fn new(meta: &BatchMetadata, page_size: usize) -> Result<StepPlan> {
        let n = meta.seq_lens.len();
        if meta.cached_lens.len() != n || meta.page_tables.len() != n {
            return Err(Error::Msg("batch metadata: seq_lens, cached_lens and page_tables differ in length".into()));
        }
        let (mut token_seq, mut token_pos) = (Vec::new(), Vec::new());
        for s in 0..n {
            let end = meta.cached_lens[s] + meta.seq_lens[s];
            if meta.page_tables[s].len() * page_size < end {
                return Err(Error::Msg(format!(
                    "batch metadata: sequence {s} needs {end} positions but has {} pages of {page_size}",
                    meta.page_tables[s].len()
                )));
            }
            for p in meta.cached_lens[s]..end {
                token_seq.push(s);
                token_pos.push(p);
            }
        }
        Ok(StepPlan { token_seq, token_pos, page_size, page_tables: meta.page_tables.clone() })
    }

    /// Flat slot index (page · page_size + slot) of position `pos` of sequence `seq`.
    pub fn slot(&self, seq: usize, pos: usize) -> usize {
        self.page_tables[seq][pos / self.page_size] as usize * self.page_size + pos % self.page_size
    }
}

/// What a step gives the ops that need runtime state.
pub struct StepContext<'a> {
    pub plan: &'a StepPlan,
    pub cache: &'a mut PagedKvCache,
}

/// An attention backend: cached attention over the paged cache for one layer.
pub trait AttentionBackend: Send + Sync {
    /// Called once per step before any layer's `attend`, with the step's plan: a backend
    /// derives what every layer shares here (FlashInfer's plan/run split). Default: nothing.
    fn begin_step(&mut self, _plan: &StepPlan) -> Result<()> {
        Ok(())
    }

    /// `q [1, heads, tokens, dim]`, `k`/`v [1, kv_heads, tokens, dim]` for this step's tokens;
    /// writes k/v into the cache, returns `[1, heads, tokens, dim]`.
    /// `sc` says how scores are formed: the scale, and the sliding window and soft-cap where the
    /// backend declared it honours them (`AttentionBackendPlugin::scoring`); always causal.
    fn attend(
        &self,
        layer: usize,
        sc: autodeploy_kernels::cpu::Scores,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cx: &mut StepContext,
    ) -> Result<Tensor>;
}
