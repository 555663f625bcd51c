//! Sampling on the GPU (`forward_sampled`, `sample.cu`) against the CPU sampler: whole requests
//! through the engine, and the kernel alone over large vocabularies.

use crate::common;
use crate::common::gpu::gpu;
use crate::common::{engine, greedy};

/// Seeded sampled requests (temperature, top-k, top-p) picked on the GPU (`forward_sampled`,
/// no logits copied back) generate the tokens the CPU samples from its own logits: the same
/// uniform draw per token, the same filters. f32, so the logits agree to ~1e-5 and no draw
/// lands on a boundary between two tokens.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn gpu_sampling_matches_the_cpu_sampler() {
    let _turn = gpu();
    use autodeploy_core::sampling::SamplingParams;
    let req = |prompt: &[i64], t: f32, k: usize, p: f32, seed: u64| autodeploy_core::runtime::Request {
        prompt: prompt.to_vec(),
        sampling: SamplingParams {
            max_new_tokens: 16,
            temperature: t,
            top_k: k,
            top_p: p,
            seed: Some(seed),
            ..Default::default()
        },
    };
    let sampled = [
        req(&[1, 17, 42, 99, 5], 0.8, 0, 1.0, 1),
        req(&[1, 200, 3], 1.0, 20, 1.0, 2),
        req(&[1, 7, 7, 7], 1.2, 0, 0.9, 3),
        req(&[1, 50], 0.7, 40, 0.8, 4),
    ];
    // Each sampled request, then the greedy continuation of the same prompt.
    let mut requests = sampled.to_vec();
    requests.extend(sampled.iter().map(|r| greedy(&r.prompt, 16)));
    for family in ["llama", "qwen3"] {
        let base = "dtype = \"float32\"\nmax_batch_size = 8\nmax_seq_len = 128\n";
        let run = |device: &str| {
            let toml =
                format!("model = {:?}\n{base}device = \"{device}\"\n", common::fixture(family).display().to_string());
            let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
            let mut e = engine(family, &format!("{base}device = \"{device}\"\n"));
            autodeploy_core::registry::runtime(&cfg)
                .unwrap()
                .generate(&mut e, &requests)
                .0
                .into_iter()
                .map(|r| r.unwrap().tokens)
                .collect::<Vec<_>>()
        };
        let (cpu, cuda) = (run("cpu"), run("cuda"));
        eprintln!("{family}: sampled on the GPU {cuda:?}");
        assert_eq!(cuda, cpu, "{family}: GPU-sampled tokens differ from the CPU sampler's");
        // Sampling really happened: every sampled request leaves its prompt's greedy path.
        for i in 0..sampled.len() {
            assert_ne!(cpu[i], cpu[sampled.len() + i], "{family}: sampled request {i} is its greedy continuation");
        }
    }
}

/// The sampling kernel against the CPU sampler's `pick` with the same uniform draws:
/// temperature, top-k, top-p and their mix, greedy; vocabularies of 1000 and 128256 (Llama 3's);
/// f32 and bf16 logits. A pick may differ only where the draw (or top_p) lies within 2e-5 of a
/// boundary between two tokens' cumulative mass: the GPU sums f32 in a tree, the CPU in f64.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn the_sampling_kernel_picks_what_the_cpu_sampler_picks() {
    let _turn = gpu();
    use autodeploy_core::sampling::{pick, RowDraw};
    use autodeploy_kernels::cuda::exec::{Dt, Gpu, RowSampling};
    let g = Gpu::open(0).unwrap();
    let to_bf16 = |x: f32| -> u16 {
        let u = x.to_bits();
        ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
    };
    let mut seed = 0x1234_5678u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32
    };
    for bf in [false, true] {
        for vocab in [1000usize, 128_256] {
            let mut draws = Vec::new();
            for (t, k, p) in [
                (0.8f32, 0usize, 1.0f32),
                (1.0, 5, 1.0),
                (1.3, 0, 0.9),
                (0.5, 40, 0.8),
                (0.0, 0, 1.0),
                (2.0, 1000, 0.95),
            ] {
                for _ in 0..6 {
                    draws.push(RowDraw { temperature: t, top_k: k, top_p: p, u: next() });
                }
            }
            let rows = draws.len();
            // A model-like spread: most logits small, a few large.
            let mut logits: Vec<f32> = (0..rows * vocab)
                .map(|i| (next() - 0.5) * 6.0 + if i % 97 == 0 { 8.0 * next() } else { 0.0 })
                .collect();
            if bf {
                logits.iter_mut().for_each(|x| *x = f32::from_bits((to_bf16(*x) as u32) << 16));
            }
            let raw: Vec<u8> = if bf {
                logits.iter().flat_map(|&x| to_bf16(x).to_le_bytes()).collect()
            } else {
                logits.iter().flat_map(|x| x.to_le_bytes()).collect()
            };
            let params: Vec<u8> = draws
                .iter()
                .flat_map(|d| {
                    RowSampling { temperature: d.temperature, top_k: d.top_k as i32, top_p: d.top_p, u: d.u }
                        .to_le_bytes()
                })
                .collect();
            let (dl, dp, di) = (
                g.alloc(raw.len(), "logits").unwrap(),
                g.alloc(params.len(), "params").unwrap(),
                g.alloc(8 * rows, "ids").unwrap(),
            );
            g.upload(dl.ptr, &raw).unwrap();
            g.upload(dp.ptr, &params).unwrap();
            let t0 = std::time::Instant::now();
            g.sample_rows(dl.ptr, if bf { Dt::BF16 } else { Dt::F32 }, dp.ptr, di.ptr, rows, vocab).unwrap();
            g.sync().unwrap();
            let took = t0.elapsed();
            let mut ids = vec![0u8; 8 * rows];
            g.download(di.ptr, &mut ids).unwrap();
            let ids: Vec<i64> = ids.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
            let (mut exact, mut boundary) = (0, 0);
            for (r, d) in draws.iter().enumerate() {
                let row = &logits[r * vocab..(r + 1) * vocab];
                let want = pick(row, d);
                if ids[r] == want {
                    exact += 1;
                    continue;
                }
                let near = [-2e-5f32, 2e-5].iter().any(|e| {
                    let u = (d.u + e).clamp(0.0, 0.999_99);
                    pick(row, &RowDraw { u, ..*d }) == ids[r]
                        || pick(row, &RowDraw { top_p: (d.top_p + e).min(1.0), ..*d }) == ids[r]
                });
                assert!(near, "vocab {vocab} bf16 {bf} row {r} {d:?}: GPU picked {}, the CPU {want}", ids[r]);
                boundary += 1;
            }
            eprintln!(
                "sample_rows vocab {vocab} {}: {exact}/{rows} exact, {boundary} at a boundary; {:.0} us for {rows} rows",
                if bf { "bf16" } else { "f32" },
                took.as_secs_f64() * 1e6
            );
        }
    }
}
