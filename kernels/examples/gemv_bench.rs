//! The decode GEMVs of a Llama-shaped model streamed from memory, as a decode step runs them:
//! every layer's weights are distinct (nothing stays in L2), launched back to back under
//! programmatic dependent launch and replayed as one CUDA graph. Prints, for each L2 prefetch
//! size (`Gpu::prefetch_row`) and warps a row of the GEMVs (`Gpu::gemv_split`, `swiglu_split`), the time
//! of a step's GEMVs and of each kind alone, with their weight bandwidth next to the copy floor
//! of the same run; and the split-KV decode attention alone (the "us/GEMV" column: µs a layer)
//! and between the GEMVs that feed and read it.
//!
//!   cargo run --release -p autodeploy-kernels --example gemv_bench [-- HIDDEN INTER Q KV LAYERS]
//!
//! Defaults: the Llama-3.1-8B shape (4096 14336 4096 1024 32).

use autodeploy_kernels::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use autodeploy_kernels::cuda::exec::{Buffer, Dt, Gpu, HeadRows, Split, StepMeta};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Qkv,
    O,
    GateUp,
    Down,
    /// RMSNorm with the residual add over one row of `hidden`.
    Norm,
    /// The split-KV decode attention's latency build (with its RoPE and KV write), as the
    /// executor runs it at batch 1: one token at position `POS`, head dim 128, over the layer's
    /// own paged cache; q/k/v from the q/k/v GEMV's output, its output the o GEMV's input.
    Attn,
}

/// The decode token's position in the attention sets (the 8B bench's steps run at 128-255).
const POS: usize = 192;
/// Positions the caches hold (`max_seq_len` of benches/gpu/*.toml).
const MAX_LEN: usize = 512;
const PAGE: usize = 16;
const HEAD_DIM: usize = 128;

struct Layer {
    qkv: Buffer,
    o: Buffer,
    gate_up: Buffer,
    down: Buffer,
    k_cache: Buffer,
    v_cache: Buffer,
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
            k_cache: gpu.alloc(bytes(MAX_LEN, kv), "k cache").unwrap(),
            v_cache: gpu.alloc(bytes(MAX_LEN, kv), "v cache").unwrap(),
        })
        .collect();
    // One sequence at POS (POS cached), its pages in reverse order (scattered, as after churn).
    let (heads, kv_heads) = (q / HEAD_DIM, kv / HEAD_DIM);
    let pages = MAX_LEN / PAGE;
    let i64s = |v: &[i64]| -> Buffer {
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b = gpu.alloc(raw.len(), "step metadata").unwrap();
        gpu.upload(b.ptr, &raw).unwrap();
        b
    };
    let (seq, pos, indptr) = (i64s(&[0]), i64s(&[POS as i64]), i64s(&[0, pages as i64]));
    let (start, cached) = (i64s(&[0]), i64s(&[POS as i64]));
    let page_list: Vec<u8> = (0..pages as i32).rev().flat_map(|p| p.to_le_bytes()).collect();
    let page_indices = gpu.alloc(page_list.len(), "page indices").unwrap();
    gpu.upload(page_indices.ptr, &page_list).unwrap();
    let meta = StepMeta {
        tokens: 1,
        page_size: PAGE,
        token_seq: seq.ptr,
        token_pos: pos.ptr,
        page_indptr: indptr.ptr,
        page_indices: page_indices.ptr,
        seq_start: start.ptr,
        cached_len: cached.ptr,
        tiles: 0,
        tile_slots: 0,
        decode_prefix: 0,
    };
    let (chunk, splits) = Split::plan(MAX_LEN, gpu.split_min_chunk());
    let partial = gpu.alloc(4 * splits * heads * (HEAD_DIM + 2) + 4 * heads, "split-KV partials").unwrap();
    let split = Split {
        chunk,
        splits,
        partial: partial.ptr,
        counters: partial.ptr + (4 * splits * heads * (HEAD_DIM + 2)) as u64,
    };
    let (cos, sin) = (gpu.alloc(bytes(1, HEAD_DIM), "cos").unwrap(), gpu.alloc(bytes(1, HEAD_DIM), "sin").unwrap());
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
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
                    Kind::Attn => gpu
                        .paged_decode_split_fused(
                            Dt::BF16,
                            (y.ptr, y.ptr + bytes(1, q) as u64, y.ptr + bytes(1, q + kv) as u64),
                            Some((cos.ptr, sin.ptr)),
                            None,
                            (l.k_cache.ptr, l.v_cache.ptr),
                            (x.ptr, HeadRows::tokens_major(heads, HEAD_DIM)),
                            &meta,
                            heads,
                            kv_heads,
                            HEAD_DIM,
                            scale,
                            split,
                            None,
                        )
                        .map(|_| true),
                    Kind::Norm => gpu
                        .rmsnorm(
                            (y.ptr, Dt::BF16),
                            Some((r.ptr, r2.ptr)),
                            (nw.ptr, Dt::BF16),
                            (x.ptr, Dt::BF16),
                            None,
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
                Kind::Norm | Kind::Attn => 0,
            })
            .sum::<usize>()
            * layers
    };
    use Kind::{Attn, Norm};
    // The attention's cost between the GEMVs that feed and read it: "qkv, attention, o" less
    // "qkv, o"; "layer" is a decode step's kernels (less RoPE tables, LM head, argmax).
    let sets: [(&str, Vec<Kind>); 10] = [
        ("step (qkv, o, gate/up, down)", vec![Kind::Qkv, Kind::O, Kind::GateUp, Kind::Down]),
        ("step with 4 norms between", vec![Norm, Kind::Qkv, Norm, Norm, Kind::O, Norm, Kind::GateUp, Kind::Down]),
        ("layer (norm qkv attn o norm mlp)", vec![Norm, Kind::Qkv, Attn, Kind::O, Norm, Kind::GateUp, Kind::Down]),
        ("attention", vec![Attn]),
        ("qkv, attention, o", vec![Kind::Qkv, Attn, Kind::O]),
        ("qkv, o", vec![Kind::Qkv, Kind::O]),
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
            let gemvs = kinds.iter().filter(|k| !matches!(k, Kind::Norm | Kind::Attn)).count().max(1);
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
