//! The SmolLM2-135M decode step's linears (Q4_1 blocks, the Q8_0 tied LM head), one activation
//! row, on each CPU kernel path this CPU runs; µs per call, cache-resident weights.
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p autodeploy-kernels --example smollm2_linears
use autodeploy_kernels::quant::{qlinear_on, qlinear_packed, BlockKind, CpuKernels, PackedRows};
use std::time::Instant;

mod common;

fn main() {
    println!("threads: {}  detected: {}", autodeploy_kernels::pool::threads(), CpuKernels::detected().name());
    let shapes = [
        ("qkv", BlockKind::Q4_1, 960usize, 576usize, 30usize),
        ("o", BlockKind::Q4_1, 576, 576, 30),
        ("gate_up", BlockKind::Q4_1, 3072, 576, 30),
        ("down", BlockKind::Q4_1, 576, 1536, 30),
        ("lm_head", BlockKind::Q8_0, 49152, 576, 1),
    ];
    let mut per_token = [0f64; CpuKernels::ALL.len()];
    for (name, kind, n, k, per) in shapes {
        let w = common::random_blocks(kind, n * k / 32);
        let packed = PackedRows::pack(kind, n, k, &w);
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = vec![0f32; n];
        let mut line = format!("{name:<8} {kind:?} {n:>5}x{k:<5}");
        for (i, path) in CpuKernels::ALL.into_iter().enumerate() {
            if !path.supported() {
                continue;
            }
            let reps = if n > 10000 { 50 } else { 500 };
            let run = |y: &mut [f32]| {
                if path >= CpuKernels::AvxVnni {
                    qlinear_packed(path, 1, &x, &packed, None, y)
                } else {
                    qlinear_on(path, true, 1, n, k, &x, kind, &w, None, y)
                }
            };
            run(&mut y);
            let t0 = Instant::now();
            for _ in 0..reps {
                run(&mut y);
            }
            let us = t0.elapsed().as_secs_f64() * 1e6 / reps as f64;
            per_token[i] += us * per as f64;
            line += &format!("  {}: {us:8.1} us", path.name());
        }
        println!("{line}");
    }
    let totals: Vec<String> = CpuKernels::ALL
        .into_iter()
        .zip(per_token)
        .filter(|(p, _)| p.supported())
        .map(|(p, t)| format!("{} {:.2} ms", p.name(), t / 1e3))
        .collect();
    println!("per token (linears only): {}", totals.join(", "));
}
