//! The decode GEMVs of a Llama-shaped model streamed from memory, as a decode step runs them:
//! every layer's weights are distinct (nothing stays in L2), launched back to back under
//! programmatic dependent launch and replayed as one CUDA graph. Prints, for each L2 prefetch
//! size (`Gpu::prefetch_row`) and warps a row of the GEMVs (`Gpu::gemv_split`, `swiglu_split`), the time
//! of a step's GEMVs and of each kind alone, with their weight bandwidth next to the copy floor
//! of the same run.
//!
//!   cargo run --release -p autodeploy-kernels --example gemv_bench [-- HIDDEN INTER Q KV LAYERS]
//!
//! Defaults: the Llama-3.1-8B shape (4096 14336 4096 1024 32).

use autodeploy_kernels::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use autodeploy_kernels::cuda::exec::{Buffer, Dt, Gpu};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Qkv,
    O,
    GateUp,
    Down,
    /// RMSNorm with the residual add over one row of `hidden`: the small kernels between the
    /// GEMVs of a real step (norms, RoPE, attention) stand in as this.
    Norm,
}

struct Layer {
    qkv: Buffer,
    o: Buffer,
    gate_up: Buffer,
    down: Buffer,
}

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().expect("sizes are integers")).collect();
    let get = |i: usize, d: usize| a.get(i).copied().unwrap_or(d);
    let (hidden, inter, q, kv, layers) = (get(0, 4096), get(1, 14336), get(2, 4096), get(3, 1024), get(4, 32));
    let mut gpu = Gpu::open(0).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let qkv_rows = q + 2 * kv;
    println!(
        "{}: hidden {hidden} inter {inter} q {q} kv {kv}, {layers} layers, bf16, batch 1, pdl {}",
        gpu.dev.name, gpu.pdl
    );
    let bytes = |n: usize, k: usize| n * k * 2;
    let ws: Vec<Layer> = (0..layers)
        .map(|_| Layer {
            qkv: gpu.alloc(bytes(qkv_rows, hidden), "qkv").unwrap(),
            o: gpu.alloc(bytes(hidden, q), "o").unwrap(),
            gate_up: gpu.alloc(bytes(2 * inter, hidden), "gate_up").unwrap(),
            down: gpu.alloc(bytes(hidden, inter), "down").unwrap(),
        })
        .collect();
    let x = gpu.alloc(bytes(1, inter.max(hidden).max(qkv_rows)), "x").unwrap();
    let y = gpu.alloc(bytes(1, 2 * inter.max(hidden).max(qkv_rows)), "y").unwrap();
    let (r, r2, nw) = (
        gpu.alloc(bytes(1, hidden), "res").unwrap(),
        gpu.alloc(bytes(1, hidden), "res out").unwrap(),
        gpu.alloc(bytes(1, hidden), "norm weight").unwrap(),
    );
    let floor = gpu.copy_bandwidth(1 << 30, 20).unwrap();
    println!("copy floor: {:.0} GB/s", floor / 1e9);

    let run = |gpu: &Gpu, kinds: &[Kind]| {
        for l in &ws {
            for &k in kinds {
                let ok = match k {
                    Kind::Qkv => gpu.gemv(Dt::BF16, 1, qkv_rows, hidden, x.ptr, l.qkv.ptr, y.ptr, false),
                    Kind::O => gpu.gemv(Dt::BF16, 1, hidden, q, x.ptr, l.o.ptr, y.ptr, true),
                    Kind::GateUp => gpu.gemv_swiglu(Dt::BF16, 1, inter, hidden, x.ptr, l.gate_up.ptr, y.ptr),
                    Kind::Down => gpu.gemv(Dt::BF16, 1, hidden, inter, x.ptr, l.down.ptr, y.ptr, true),
                    Kind::Norm => gpu
                        .rmsnorm(
                            (y.ptr, Dt::BF16),
                            Some((r.ptr, r2.ptr)),
                            (nw.ptr, Dt::BF16),
                            (x.ptr, Dt::BF16),
                            Dt::BF16,
                            1,
                            hidden,
                            1e-5,
                        )
                        .map(|_| true),
                };
                assert!(ok.unwrap(), "the GEMV does not apply");
            }
        }
    };
    let weight_bytes = |kinds: &[Kind]| -> usize {
        kinds
            .iter()
            .map(|k| match k {
                Kind::Qkv => bytes(qkv_rows, hidden),
                Kind::O => bytes(hidden, q),
                Kind::GateUp => bytes(2 * inter, hidden),
                Kind::Down => bytes(hidden, inter),
                Kind::Norm => 0,
            })
            .sum::<usize>()
            * layers
    };
    use Kind::Norm;
    let sets: [(&str, Vec<Kind>); 6] = [
        ("step (qkv, o, gate/up, down)", vec![Kind::Qkv, Kind::O, Kind::GateUp, Kind::Down]),
        ("step with 4 norms between", vec![Norm, Kind::Qkv, Norm, Norm, Kind::O, Norm, Kind::GateUp, Kind::Down]),
        ("qkv", vec![Kind::Qkv]),
        ("o", vec![Kind::O]),
        ("gate/up+swiglu", vec![Kind::GateUp]),
        ("down", vec![Kind::Down]),
    ];
    // (L2 prefetch bytes a row, warps a row of the one-row GEMV, of the gate/up + SwiGLU GEMV).
    let variants = [
        (1024usize, 1, 1, "s1 glu1"),
        (0, 1, 1, "pf0"),
        (1024, 2, 1, "s2 glu1"),
        (1024, 4, 1, "s4 glu1"),
        (1024, 2, 2, "s2 glu2"),
        (1024, 2, 4, "s2 glu4"),
    ];
    for (prefetch, split, glu, name) in variants {
        gpu.prefetch_row = prefetch;
        (gpu.gemv_split, gpu.swiglu_split) = (split, glu);
        for (what, kinds) in &sets {
            run(&gpu, kinds);
            gpu.sync().unwrap();
            gpu.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
            run(&gpu, kinds);
            let graph = gpu
                .stream
                .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
                .unwrap()
                .expect("the capture recorded launches");
            graph.launch().unwrap();
            gpu.sync().unwrap();
            let reps = 20;
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t0 = std::time::Instant::now();
                for _ in 0..reps {
                    graph.launch().unwrap();
                }
                gpu.sync().unwrap();
                best = best.min(t0.elapsed().as_secs_f64() / reps as f64);
            }
            let bw = weight_bytes(kinds) as f64 / best;
            let gemvs = kinds.iter().filter(|k| **k != Kind::Norm).count();
            println!(
                "gemv {name:<7} {what:<30} {:8.1} us/step {:8.2} us/GEMV {:6.0} GB/s {:5.1}% of floor",
                best * 1e6,
                best * 1e6 / (layers * gemvs) as f64,
                bw / 1e9,
                100.0 * bw / floor
            );
        }
    }
}
