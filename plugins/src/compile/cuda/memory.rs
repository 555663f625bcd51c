//! Device memory: the activation arena's offsets, and the footprint an engine needs (weights,
//! KV cache, activations, a reserve) checked against what the device has free before anything
//! large is allocated.

use autodeploy_core::backend::CompileOptions;
use autodeploy_core::error::{Error, Result};
use autodeploy_core::Graph;
use autodeploy_kernels::cuda::exec::Gpu;

/// Held back for what is allocated after the KV cache (step buffers, split-KV partials,
/// cuBLAS's workspace, CUDA graphs).
pub(super) const RESERVE: u64 = 1 << 30;

/// Bytes, padded so every region starts 256-byte aligned.
pub(super) fn padded(bytes: usize) -> usize {
    bytes.div_ceil(256) * 256
}

/// First-fit allocator over offsets of one arena; `top` is its high-water mark.
#[derive(Default)]
pub(super) struct Arena {
    free: Vec<(usize, usize)>,
    pub(super) top: usize,
}

impl Arena {
    pub(super) fn alloc(&mut self, bytes: usize) -> usize {
        let bytes = padded(bytes.max(1));
        if let Some(i) = self.free.iter().position(|&(_, n)| n >= bytes) {
            let (at, n) = self.free[i];
            if n == bytes {
                self.free.remove(i);
            } else {
                self.free[i] = (at + bytes, n - bytes);
            }
            return at;
        }
        // Grow from the top, merging with a free block that ends there.
        if let Some(i) = self.free.iter().position(|&(at, n)| at + n == self.top) {
            let (at, _) = self.free.remove(i);
            self.top = at + bytes;
            return at;
        }
        let at = self.top;
        self.top += bytes;
        at
    }

    pub(super) fn release(&mut self, at: usize, bytes: usize) {
        self.free.push((at, padded(bytes.max(1))));
        self.free.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.free.len());
        for &(a, n) in &self.free {
            match merged.last_mut() {
                Some((pa, pn)) if *pa + *pn == a => *pn += n,
                _ => merged.push((a, n)),
            }
        }
        self.free = merged;
    }
}

/// What one engine needs on its device, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Footprint {
    pub weights: u64,
    pub activations: u64,
    /// The KV cache: `kv_pages` pages (and one scratch page) of `page_size` tokens.
    pub kv_cache: u64,
    pub kv_pages: usize,
    pub page_size: usize,
    /// The KV cache is sized from free memory later (`free_mem_ratio`): `kv_pages` is the least
    /// it accepts, one longest sequence.
    pub kv_from_free: bool,
}

const GIB: f64 = (1u64 << 30) as f64;

impl Footprint {
    /// The footprint of `graph` compiled with `opts`, whose activations plan `activations` bytes.
    pub fn of(graph: &Graph, opts: &CompileOptions, activations: usize) -> Result<Footprint> {
        let too_big = || Error::Msg("the engine's memory footprint overflows 64 bits".into());
        let weights = autodeploy_core::pipeline::weight_bytes(graph).ok_or_else(too_big)?;
        let page_size = opts.page_size.max(1);
        let kv_from_free = opts.free_mem_ratio.is_some();
        let kv_pages = if kv_from_free { opts.min_kv_pages.max(1) } else { opts.kv_pages };
        let kv_cache = match autodeploy_core::kvcache::CacheSpec::of(graph)? {
            Some(spec) => {
                let elem = autodeploy_core::pipeline::cache_dtype(graph).size_in_bytes();
                (spec.device_bytes_per_page(page_size, elem) as u64)
                    .checked_mul(kv_pages as u64 + 1)
                    .ok_or_else(too_big)?
            }
            None => 0,
        };
        Ok(Footprint { weights, activations: activations as u64, kv_cache, kv_pages, page_size, kv_from_free })
    }

    /// Everything, the reserve included; saturates rather than wraps.
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.activations).saturating_add(self.kv_cache).saturating_add(RESERVE)
    }

    /// Refuses, with the numbers and what to lower, a footprint over `free` bytes.
    pub fn verdict(&self, free: u64, total: u64, device: &str) -> std::result::Result<(), String> {
        if self.total() <= free {
            return Ok(());
        }
        let kv = if self.kv_from_free {
            format!(
                "KV cache {:.2} GiB at least (one longest sequence: {} pages of {} tokens)",
                self.kv_cache as f64 / GIB,
                self.kv_pages,
                self.page_size
            )
        } else {
            format!(
                "KV cache {:.2} GiB ({} pages of {} tokens)",
                self.kv_cache as f64 / GIB,
                self.kv_pages,
                self.page_size
            )
        };
        let lower = if self.weights.saturating_add(RESERVE) > free {
            "the weights alone do not fit: use a smaller dtype or model, or more GPUs"
        } else if self.kv_from_free {
            "lower max_seq_len or max_num_tokens"
        } else {
            "lower max_batch_size or max_seq_len, set kv_cache_budget_mib, or size the cache with free_mem_ratio"
        };
        Err(format!(
            "this engine needs {:.2} GiB on {device} (weights {:.2} GiB, {kv}, activations {:.2} GiB, {:.2} GiB reserve) \
             and {:.2} GiB of {:.2} GiB are free: {lower}",
            self.total() as f64 / GIB,
            self.weights as f64 / GIB,
            self.activations as f64 / GIB,
            RESERVE as f64 / GIB,
            free as f64 / GIB,
            total as f64 / GIB,
        ))
    }

    /// `verdict` against the device's free memory now (nothing is checked when the driver does
    /// not say).
    pub fn check(&self, gpu: &Gpu) -> Result<()> {
        let (free, total) = gpu.mem_info();
        if total == 0 {
            return Ok(());
        }
        self.verdict(free as u64, total as u64, &gpu.dev.name).map_err(Error::Msg)?;
        tracing::info!(
            weights_gib = format!("{:.2}", self.weights as f64 / GIB),
            kv_cache_gib = format!("{:.2}", self.kv_cache as f64 / GIB),
            activations_gib = format!("{:.2}", self.activations as f64 / GIB),
            free_gib = format!("{:.2}", free as f64 / GIB),
            "device memory"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_reuses_freed_regions_and_merges_neighbours() {
        let mut a = Arena::default();
        let x = a.alloc(1000);
        let y = a.alloc(300);
        let z = a.alloc(10);
        // Regions are padded to 256 bytes.
        assert_eq!((x, y, z), (0, 1024, 1536));
        a.release(x, 1000);
        a.release(y, 300);
        // x and y merged: 1536 bytes free at 0; 1280 of them taken.
        assert_eq!(a.alloc(1200), 0);
        assert_eq!(a.top, 1792);
        a.release(z, 10);
        // The rest of that block and z's merge at the top, and grow there.
        assert_eq!(a.alloc(4096), 1280);
        assert_eq!(a.top, 1280 + 4096);
    }

    #[test]
    fn a_footprint_over_free_memory_is_refused_with_its_parts() {
        const G: u64 = 1 << 30;
        let f = Footprint {
            weights: 16 * G,
            activations: G,
            kv_cache: 30 * G,
            kv_pages: 4096,
            page_size: 64,
            kv_from_free: false,
        };
        assert_eq!(f.total(), 48 * G);
        assert!(f.verdict(48 * G, 80 * G, "H200").is_ok());
        let e = f.verdict(40 * G, 80 * G, "H200").unwrap_err();
        assert!(e.contains("needs 48.00 GiB on H200"), "{e}");
        assert!(e.contains("weights 16.00 GiB") && e.contains("KV cache 30.00 GiB (4096 pages of 64 tokens)"), "{e}");
        assert!(e.contains("40.00 GiB of 80.00 GiB are free") && e.contains("lower max_batch_size"), "{e}");
        // Weights past the device: nothing to lower but the model.
        let big = Footprint { weights: 140 * G, ..f.clone() };
        assert!(big.verdict(139 * G, 140 * G, "H200").unwrap_err().contains("the weights alone do not fit"));
        // Sized from free memory: the least the cache takes is one sequence.
        let ratio = Footprint { kv_from_free: true, kv_cache: 2 * G, kv_pages: 128, ..f };
        let e = ratio.verdict(19 * G, 80 * G, "H200").unwrap_err();
        assert!(e.contains("at least (one longest sequence: 128 pages") && e.contains("max_seq_len"), "{e}");
        // Sizes past 2^64 saturate instead of wrapping into a small number.
        let huge = Footprint { weights: u64::MAX, ..ratio };
        assert!(huge.verdict(u64::MAX - 1, u64::MAX, "H200").is_err());
    }
}
