//! Times the CUDA executor's launchers one by one on decode-sized shapes (batch 1), so a slow
//! kernel or a slow launch path shows up apart from the model: `cargo run --release -p
//! autodeploy-kernels --example exec_bench` on a machine with a GPU.

use autodeploy_kernels::cuda::exec::{Dt, Gpu};

fn time(gpu: &Gpu, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    gpu.sync().unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        f();
    }
    gpu.sync().unwrap();
    t0.elapsed().as_secs_f64() * 1e6 / reps as f64
}

fn main() {
    let gpu = Gpu::open(0).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    println!("{}", gpu.dev.name);
    let big = gpu.alloc(1 << 30, "scratch").unwrap();
    let x = gpu.alloc(64 << 20, "x").unwrap();
    let y = gpu.alloc(64 << 20, "y").unwrap();
    let reps = 200;
    let us = time(&gpu, reps, || {
        gpu.rmsnorm((x.ptr, Dt::BF16), None, (x.ptr, Dt::BF16), (y.ptr, Dt::BF16), None, Dt::BF16, 1, 896, 1e-6)
            .unwrap()
    });
    println!("rmsnorm [1, 896] bf16: {us:.2} us per launch (launch-bound)");
    for &(n, k) in &[
        (1152usize, 896usize),
        (896, 896),
        (9728, 896),
        (896, 4864),
        (151936, 896),
        (6144, 4096),
        (4096, 4096),
        (28672, 4096),
        (4096, 14336),
        (128256, 4096),
    ] {
        for &m in &[1usize, 8, 64] {
            let us = time(&gpu, reps, || gpu.linear(Dt::BF16, m, n, k, x.ptr, big.ptr, y.ptr, false).unwrap());
            let gbs = (n * k * 2) as f64 / (us * 1e-6) / 1e9;
            println!("cuBLAS bf16 m={m} n={n} k={k}: {us:.2} us, {gbs:.0} GB/s of weights");
            if m <= 8 {
                let us = time(&gpu, reps, || {
                    assert!(gpu.gemv(Dt::BF16, m, n, k, x.ptr, big.ptr, y.ptr, false).unwrap());
                });
                let gbs = (n * k * 2) as f64 / (us * 1e-6) / 1e9;
                println!("  gemv bf16 m={m}: {us:.2} us, {gbs:.0} GB/s of weights");
            }
        }
    }
    println!("copy floor: {:.0} GB/s", gpu.copy_bandwidth(1 << 30, 20).unwrap() / 1e9);
}
