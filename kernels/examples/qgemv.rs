//! Speed of the block-quantized GEMV, cache-resident and streaming from memory.
//!
//!   cargo run --release -p autodeploy-kernels --example qgemv [-- THREADS]
//!
//! Prints GB/s of weight bytes and ns per 32-value block for f32 and int8 activations on the
//! blocks as stored (the AVX2 path where the CPU has it), and int8 on the row-interleaved copy
//! (the AVX-512 VNNI path where the CPU has it).
use autodeploy_kernels::quant::{qlinear_on, qlinear_packed, BlockKind, CpuKernels, PackedRows};
use std::time::Instant;

mod common;

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("thread pool");
    println!("threads: {threads}  memory read bandwidth: {:.1} GB/s", read_bandwidth());
    for kind in [BlockKind::Q4_1, BlockKind::Q8_0] {
        for (n, k, copies) in [(1536usize, 576usize, 1usize), (1536, 576, 64), (3072, 576, 32), (576, 1536, 64)] {
            let rb = k / 32 * kind.bytes();
            let w = common::random_blocks(kind, n * k / 32 * copies);
            let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut y = vec![0f32; n];
            let packed: Vec<PackedRows> = w.chunks(n * rb).map(|wc| PackedRows::pack(kind, n, k, wc)).collect();
            let best = CpuKernels::detected();
            for (name, int8, pack) in [("f32 act", false, false), ("int8 act", true, false), ("int8 pck", true, true)] {
                let reps = 200;
                let t0 = Instant::now();
                for r in 0..reps {
                    let c = r % copies;
                    let wc = &w[c * n * rb..(c + 1) * n * rb];
                    if pack {
                        qlinear_packed(best, 1, &x, &packed[c], None, &mut y);
                    } else {
                        qlinear_on(best.min(CpuKernels::Avx2), int8, 1, n, k, &x, kind, wc, None, &mut y);
                    }
                }
                let dt = t0.elapsed().as_secs_f64() / reps as f64;
                let gbs = (n * rb) as f64 / dt / 1e9;
                let ns_block = dt * 1e9 / (n * k / 32) as f64;
                let place = if copies == 1 { "cached" } else { "memory" };
                println!(
                    "{kind:?} {n}x{k} {place:<6} {name:<8}: {:7.1} us  {gbs:5.1} GB/s  {ns_block:.2} ns/block",
                    dt * 1e6
                );
            }
        }
    }
}

/// Read bandwidth of this machine: summing a buffer far larger than the caches, on the pool.
#[allow(dead_code)]
fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1u64; 64 << 20]; // 512 MiB
    let t0 = Instant::now();
    let mut s = 0u64;
    for _ in 0..3 {
        s = s
            .wrapping_add(buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, v| a.wrapping_add(*v))).sum::<u64>());
    }
    std::hint::black_box(s);
    (3 * buf.len() * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9
}
