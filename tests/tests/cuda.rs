//! The CUDA executor against the CPU reference, on every fixture family in f32 and bf16, for
//! every compile backend and both CUDA attention backends (`flashinfer`, `triton`): logits of a ragged prefill and of decode steps crossing page
//! boundaries, and greedy generations through the runtime. Needs an NVIDIA GPU; where there is
//! none (CI) each test says it was skipped and why.
//!
//! Tolerances (|logit differences|, fed the same tokens): f32 against the CPU within `F32_TOL`;
//! bf16 against the f32 truth within `BF16_VS_CPU_*` times the CPU's own bf16 error, each set
//! from what an H200 measured, with a margin.

#[path = "cuda/attention.rs"]
mod attention;
mod common;
#[path = "cuda/moe.rs"]
mod moe;
#[path = "cuda/ranks.rs"]
mod ranks;
#[path = "cuda/sampling.rs"]
mod sampling;

use autodeploy_core::pipeline::Engine;
use autodeploy_core::Tensor;
use common::gpu::{gpu, launches};
use common::{engine, greedy, FAMILIES};

const BACKENDS: &[&str] = &["simple", "cudagraph", "compile", "opt"];
const ATTENTION: &[&str] = &["flashinfer", "triton"];
const PAGE: usize = 4;
/// Max |logit − CPU logit| in f32 (cuBLAS sums in another order): the bound the CPU itself gets
/// against transformers' f32 (`common::F32_MAX_ABS`), another summation order. H200, session
/// 19: at most 7.03e-5 (llama-rope-dynamic, every compile backend and both attention backends
/// 5.6-7.0e-5: that fixture amplifies rounding, no one kernel), the others at most 2.5e-5.
const F32_TOL: f32 = common::F32_MAX_ABS;

/// bf16 on the GPU against the f32 truth, as a multiple of the CPU's own bf16 error against it
/// (max and mean |logit error| over all steps). Set from the H200 measurements in tests/README.md.
const BF16_VS_CPU_MAX: f32 = 1.5;
const BF16_VS_CPU_MEAN: f32 = 1.25;
const BF16_ROUTED_MEAN: f32 = 2.0;

// Every test here is `#[ignore]`d with the reason "needs an NVIDIA GPU", so a run without a
// GPU (CI) counts and names them; on a GPU machine they run with `--include-ignored`.

/// Runs `steps` of a batch through the engine's cached forward at this file's page size
/// (`common::steps::run_paged_steps`).
fn run_steps(e: &mut Engine, prompts: &[Vec<i64>], decode: &[Vec<i64>]) -> Vec<Vec<Vec<f32>>> {
    common::steps::run_paged_steps(e, PAGE, prompts, decode)
}

/// Max |a − b| over all steps' logits, the largest |a|, and the mean |a − b|; shapes must agree
/// and a NaN fails.
fn max_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> (f32, f32, f32) {
    assert_eq!(a.len(), b.len(), "steps");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len(), "logits rows in a step");
    }
    let (x, y): (Vec<f32>, Vec<f32>) =
        a.iter().flatten().zip(b.iter().flatten()).flat_map(|(x, y)| x.iter().copied().zip(y.iter().copied())).unzip();
    let d = common::max_abs_diff(&x, &y, "logits");
    let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mean = x.iter().zip(&y).map(|(p, q)| (p - q).abs() as f64).sum::<f64>() / x.len() as f64;
    (d, m, mean as f32)
}

/// bf16 logits of the GPU (`got`) and the CPU (`cpu`) for the same tokens, each against the
/// f32 `truth`: the GPU may stray from it by at most `BF16_VS_CPU_*` times what the CPU does.
/// A mixture-of-experts fixture (`common::ROUTED`) is held to the mean only, at
/// `BF16_ROUTED_MEAN` times the CPU's: a router near-tie that rounding flips on one device and
/// not the other moves single logits past any per-logit bound (not yet measured on a GPU).
fn bf16_against_f32(
    what: &str,
    family: &str,
    truth: &[Vec<Vec<f32>>],
    cpu: &[Vec<Vec<f32>>],
    got: &[Vec<Vec<f32>>],
) -> Result<(), String> {
    let (c_max, _, c_mean) = max_diff(truth, cpu);
    let (g_max, _, g_mean) = max_diff(truth, got);
    let (tol_max, tol_mean) = match common::ROUTED.contains(&family) {
        true => (f32::INFINITY, BF16_ROUTED_MEAN * c_mean),
        false => (BF16_VS_CPU_MAX * c_max, BF16_VS_CPU_MEAN * c_mean),
    };
    eprintln!(
        "{what}: against f32, GPU max {g_max:.3e} mean {g_mean:.3e}, CPU max {c_max:.3e} mean {c_mean:.3e} \
         (tolerance max {tol_max:.3e}, mean {tol_mean:.3e})"
    );
    if g_max > tol_max || g_mean > tol_mean {
        return Err(format!(
            "{what}: bf16 against f32 max {g_max} > {tol_max} or mean {g_mean} > {tol_mean} (the CPU's bf16: {c_max}, {c_mean})"
        ));
    }
    Ok(())
}

/// The GPU's greedy tokens `gpu` after `prompt` against the CPU's `cpu`. In f32 they must be
/// equal. In bf16 the two may part only where the CPU's own logits, given the tokens both
/// picked so far, have the two tokens within `BF16_TIE` (a near-tie that a bf16 rounding can
/// flip); afterwards they follow different texts and are not compared.
fn same_greedy_path(cpu: &mut Engine, prompt: &[i64], cpu_t: &[i64], gpu_t: &[i64], bf16: bool) -> Result<(), String> {
    let Some(j) = cpu_t.iter().zip(gpu_t).position(|(a, b)| a != b) else {
        return if cpu_t.len() == gpu_t.len() { Ok(()) } else { Err(format!("{gpu_t:?} vs the CPU's {cpu_t:?}")) };
    };
    if !bf16 {
        return Err(format!("greedy tokens {gpu_t:?} differ from the CPU's {cpu_t:?} at {j}"));
    }
    let steps: Vec<Vec<i64>> = cpu_t[..j].iter().map(|&t| vec![t]).collect();
    let logits = run_steps(cpu, &[prompt.to_vec()], &steps);
    let row = &logits.last().expect("a step")[0];
    let margin = row[cpu_t[j] as usize] - row[gpu_t[j] as usize];
    eprintln!(
        "bf16 greedy paths part at token {j}: {} vs {} ({margin:.3} apart in the CPU's logits)",
        cpu_t[j], gpu_t[j]
    );
    if margin > common::BF16_TIE {
        return Err(format!(
            "greedy tokens part at {j} ({} vs the CPU's {}) where the CPU's logits are {margin} apart, not a near-tie",
            gpu_t[j], cpu_t[j]
        ));
    }
    Ok(())
}

/// Runs one family in one dtype on every backend pair; returns what failed (all of it, so one
/// GPU run reports every family).
fn check_family_dtype(family: &str, dtype: &str) -> Vec<String> {
    check_family_config(family, dtype, "")
}

/// The same with `extra` config lines on every engine.
fn check_family_config(family: &str, dtype: &str, extra: &str) -> Vec<String> {
    let mut failed = Vec::new();
    let base = format!("dtype = \"{dtype}\"\nattn_page_size = {PAGE}\nmax_batch_size = 4\n{extra}");
    let mut cpu = engine(family, &format!("{base}device = \"cpu\"\n"));
    // A 9-token and a 3-token prompt (ragged prefill), then 6 decode steps: the first sequence
    // crosses from page 3 into page 4, the second from page 1 into page 2.
    let prompts = vec![vec![1, 17, 42, 99, 5, 7, 250, 3, 11], vec![1, 200, 3]];
    let first = run_steps(&mut cpu, &prompts, &[]);
    let mut decode = vec![];
    let mut last = first[0].clone();
    for _ in 0..6 {
        let next: Vec<i64> = last.iter().map(|r| common::argmax(r) as i64).collect();
        decode.push(next.clone());
        let all = run_steps(&mut cpu, &prompts, &decode);
        last = all.last().unwrap().clone();
    }
    let reference = run_steps(&mut cpu, &prompts, &decode);
    // bf16: both devices are measured against the f32 truth for the same tokens; the GPU may
    // stray from it about as far as the CPU's bf16 does, not further.
    let truth = (dtype == "bfloat16").then(|| {
        let mut f32_cpu = engine(
            family,
            &format!("dtype = \"float32\"\nattn_page_size = {PAGE}\nmax_batch_size = 4\ndevice = \"cpu\"\n{extra}"),
        );
        run_steps(&mut f32_cpu, &prompts, &decode)
    });
    let requests: Vec<_> = prompts.iter().map(|p| greedy(p, 12)).collect();
    let cfg_text = |extra: &str| {
        format!("model = {:?}\n{base}max_seq_len = 128\n{extra}", common::fixture(family).display().to_string())
    };
    let cpu_cfg =
        autodeploy_core::config::PipelineConfig::from_toml_str(&cfg_text("device = \"cpu\"\n"), None).unwrap();
    let cpu_tokens: Vec<Vec<i64>> = autodeploy_core::registry::runtime(&cpu_cfg)
        .unwrap()
        .generate(&mut cpu, &requests)
        .0
        .into_iter()
        .map(|r| r.unwrap().tokens)
        .collect();
    let scored = common::scored_with(family, extra);
    for (backend, attn) in BACKENDS.iter().flat_map(|b| ATTENTION.iter().map(move |a| (b, a))) {
        let extra = format!("device = \"cuda\"\ncompile_backend = \"{backend}\"\nattn_backend = \"{attn}\"\n");
        if scored && *attn == "triton" {
            common::refused_scoring(family, &format!("{base}{extra}"), attn);
            continue;
        }
        let mut gpu = engine(family, &format!("{base}{extra}"));
        let got = run_steps(&mut gpu, &prompts, &decode);
        let what = format!("{family} {dtype} {backend} {attn}");
        let (d, m, mean) = max_diff(&reference, &got);
        match &truth {
            None => {
                eprintln!("{what}: max |logit diff| {d:.3e} (max |logit| {m:.2}, tolerance {F32_TOL:.1e})");
                if d > F32_TOL {
                    failed.push(format!("{what}: logits differ from the CPU by {d} > {F32_TOL}"));
                }
            }
            Some(truth) => {
                eprintln!("{what}: against the CPU's bf16 max {d:.3e} mean {mean:.3e} (max |logit| {m:.2})");
                failed.extend(bf16_against_f32(&what, family, truth, &reference, &got).err());
            }
        }
        let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&cfg_text(&extra), None).unwrap();
        let tokens: Vec<Vec<i64>> = autodeploy_core::registry::runtime(&cfg)
            .unwrap()
            .generate(&mut gpu, &requests)
            .0
            .into_iter()
            .map(|r| r.unwrap().tokens)
            .collect();
        for ((p, g), c) in prompts.iter().zip(&tokens).zip(&cpu_tokens) {
            if let Err(e) = same_greedy_path(&mut cpu, p, c, g, dtype == "bfloat16") {
                failed.push(format!("{what}: {e}"));
            }
        }
    }
    failed
}

/// `check_family_config` for each (family, extra) in f32 and bf16, a panic (an engine that did
/// not build, a step that failed) reported as that case's failure, so one GPU run names every
/// failing case instead of stopping at the first.
fn check_cases(cases: &[(&str, &str)]) -> Vec<String> {
    let mut failed = Vec::new();
    for (f, extra) in cases {
        for d in ["float32", "bfloat16"] {
            match std::panic::catch_unwind(|| check_family_config(f, d, extra)) {
                Ok(v) => failed.extend(v),
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failed.push(format!("{f} {d} {extra:?}: panicked: {msg}"));
                }
            }
        }
    }
    failed
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn cuda_matches_cpu_f32() {
    let _turn = gpu();
    let failed: Vec<String> = FAMILIES.iter().flat_map(|f| check_family_dtype(f, "float32")).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn cuda_matches_cpu_bf16() {
    let _turn = gpu();
    let failed: Vec<String> = FAMILIES.iter().flat_map(|f| check_family_dtype(f, "bfloat16")).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The ModelOpt FP8 and NVFP4 fixtures (tests/quant.rs holds them to their Python reference on
/// the CPU), and `quantize = "fp8"` on the llama fixture, on CUDA against the CPU, f32 and bf16,
/// every backend pair: the FP8 GEMV for decode
/// rows, the dequantize + cuBLAS path for prefill, both for NVFP4; the FP8 KV cache.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn quantized_checkpoints_on_cuda_match_the_cpu() {
    // The folds (`fuse_gated_act`, `fuse_fp8_input_quant`) are on by default: the cases
    // without them switch them off (each linear quantizes its own input).
    const NO_FOLDS: &str =
        "transforms.fuse_gated_act.enabled = false\ntransforms.fuse_fp8_input_quant.enabled = false\n";
    const EPILOGUE: &str = "transforms.fuse_quant_gated_epilogue.enabled = true\n";
    const ATTN_OUT: &str = "transforms.fuse_fp8_attention_out.enabled = true\n";
    let _turn = gpu();
    let (failed, ran) = launches(|| {
        // The FP8 decode GEMV on tensor cores (the default on sm_89+), and once the CUDA-core one.
        let checkpoints = [
            ("llama-fp8", NO_FOLDS),
            ("llama-fp8", &format!("{NO_FOLDS}kernels.fp8_gemv_tensor_cores = false\n")),
            ("qwen3-fp8", NO_FOLDS),
            // The NVFP4 GEMV on tensor cores (the default; k % 64 == 0: q/k/v, o, gate/up; the
            // down projection's k = 96 stays on the CUDA-core one), and once the CUDA-core one.
            ("mistral-nvfp4", NO_FOLDS),
            ("mistral-nvfp4", &format!("{NO_FOLDS}kernels.nvfp4_gemv_tensor_cores = false\n")),
            ("llama", "quantize = \"fp8\"\n"),
            // (cuBLASLt's FP8 GEMM runs the bf16 prefills above, the default.) The dequantizing
            // path for them instead.
            ("llama-fp8", &format!("{NO_FOLDS}kernels.fp8_gemm_cublaslt = false\n")),
            // cuBLASLt's f32 sums and the epilogue kernel, not its own scales and bf16 output.
            ("llama-fp8", &format!("{NO_FOLDS}kernels.fp8_gemm_cublaslt_scales = false\n")),
            ("llama", "quantize = \"fp8\"\nkernels.fp8_gemm_cublaslt = false\n"),
            // The FP8 KV cache (E4M3 codes at the checkpoint's k/v scales) against the CPU's
            // reference (tests/quant.rs): the logits move by up to 2.2 with it, so a cache
            // kept in the model's dtype fails here.
            ("llama-fp8-kv", "kv_cache_dtype = \"fp8\"\n"),
            // The defaults: the quantized MLPs' activation as one op, and the input
            // quantization folded into the norms and activations (under opt): they write
            // codes, the GEMV stages them, cuBLASLt reads them, the dequantizing path takes
            // their values.
            ("llama-fp8", ""),
            ("qwen3-fp8", ""),
            ("llama-fp8", "kernels.fp8_gemm_cublaslt = false\n"),
            ("llama-fp8", "transforms.fuse_gated_act.enabled = false\n"),
            ("mistral-nvfp4", ""),
            // The gated activation inside the FP8 (and NVFP4) gate/up linear: the tensor-core
            // GEMV's gated build for decode rows, the whole output into scratch and silu_mul for prefills
            // and for the CUDA-core GEMV; without the folds and with them (the norms' codes
            // into it), and over quantize = "fp8"'s per-token scales.
            ("llama-fp8", &format!("{EPILOGUE}transforms.fuse_fp8_input_quant.enabled = false\n")),
            ("qwen3-fp8", EPILOGUE),
            ("llama-fp8", &format!("{EPILOGUE}kernels.fp8_gemv_tensor_cores = false\n")),
            ("llama", &format!("{EPILOGUE}quantize = \"fp8\"\n")),
            ("mistral-nvfp4", EPILOGUE),
            ("mistral-nvfp4", &format!("{EPILOGUE}kernels.nvfp4_gemv_tensor_cores = false\n")),
            // The attention writing the codes its o_proj reads (`e4m3_heads` after it, whatever
            // its layout: a prefill's heads-major rows, a decode's token-major ones); the GEMV
            // and cuBLASLt read them, the dequantizing path takes their values; with every
            // fold, and over an FP8 cache.
            ("llama-fp8", ATTN_OUT),
            ("llama-fp8", &format!("{ATTN_OUT}kernels.fp8_gemm_cublaslt = false\n")),
            ("llama-fp8", &format!("{ATTN_OUT}kernels.fp8_gemv_tensor_cores = false\n")),
            ("qwen3-fp8", &format!("{ATTN_OUT}{EPILOGUE}")),
            ("llama-fp8-kv", &format!("{ATTN_OUT}kv_cache_dtype = \"fp8\"\n")),
        ];
        check_cases(&checkpoints)
    });
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    for k in [
        "e4m3_codes",
        "e4m3_codes_rows",
        "gemv_fp8",
        "gemv_fp8_tc",
        "fp8_values",
        "gemv_nvfp4",
        "gemv_nvfp4_tc",
        "nvfp4_values",
        "lowbit_epilogue",
        "e4m3_bytes_rows",
        "cublaslt_fp8",
        "cublaslt_fp8_scaled",
        "rmsnorm_bf16x8_fp8",
        "rmsnorm_fp8",
        "gemv_fp8_tc_codes",
        "silu_mul_fp8",
        "silu_mul_bf16x8_fp8",
        "silu_mul",
        "silu_mul_bf16x8",
        "gemv_fp8_tc_gated",
        "gemv_nvfp4_tc_gated",
        "e4m3_heads",
    ] {
        assert!(ran.contains_key(k), "{k} never ran: {ran:?}");
    }
}

/// The q/k norms folded into the RoPE-fused attention (`fuse_qk_norm_attention`, on by
/// default): the latency decode build normalises each head row in registers, other steps run
/// `rope_norm_write_kv` (a warp a row) before the attention; every fixture it folds in, over a
/// cache in the model's dtype and over an FP8 one, against the CPU (which computes the same
/// numbers as the unfused graph, tests/transforms.rs).
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn fused_qk_norms_on_cuda_match_the_cpu() {
    const ON: &str = "transforms.fuse_qk_norm_attention.enabled = true\n";
    let _turn = gpu();
    let fp8 = format!("{ON}kv_cache_dtype = \"fp8\"\n");
    let (failed, ran) = launches(|| {
        check_cases(&[("qwen3", ON), ("qwen3_moe", ON), ("openelm", ON), ("llama4_text", ON), ("gemma3_text", ON)])
            .into_iter()
            .chain(check_cases(&[("qwen3-fp8", ON), ("qwen3", &fp8)]))
            .collect::<Vec<String>>()
    });
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(ran.contains_key("rope_norm_write_kv"), "rope_norm_write_kv never ran: {ran:?}");
}

/// The router's linear folded into the MoE op (`fuse_moe_router`, off by default): in bf16 one
/// kernel computes each token's logits and routes it (`moe_router_route`, the last of its blocks
/// routing), in f32 cuBLAS then `moe_route`; every MoE fixture against the CPU (which computes
/// the unfused graph's numbers, tests/transforms.rs), under every backend pair.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn a_fused_moe_router_on_cuda_matches_the_cpu() {
    const ON: &str = "transforms.fuse_moe_router.enabled = true\n";
    let _turn = gpu();
    let (failed, ran) = launches(|| check_cases(&[("qwen3_moe", ON), ("mixtral", ON), ("llama4_text", ON)]));
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(ran.contains_key("moe_router_route"), "moe_router_route never ran: {ran:?}");
}

/// torch.export archives whose graph after `post_load_fusion` is not the HF import's op for op
/// (tests/pt2.rs), on CUDA against the CPU in f32, every backend pair: OpenELM's module; Llama
/// 4's export, its interleaved RoPE made plain by `deinterleave_rope`, q/k normed after RoPE,
/// the temperature a [batch, seq] table, the experts' weights read transposed at load.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn exported_archives_on_cuda_match_the_cpu() {
    let _turn = gpu();
    let failed: Vec<String> =
        ["pt2/openelm.pt2", "pt2/llama4_text.pt2"].iter().flat_map(|f| check_family_config(f, "float32", "")).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// A decode batch larger than every captured bucket runs uncaptured, and a batch between
/// buckets pads: both give the CPU's greedy tokens.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn cudagraph_buckets_pad_and_fall_back() {
    let _turn = gpu();
    let prompts: Vec<Vec<i64>> = (0..5).map(|i| vec![1, 10 + i, 20 + 2 * i, 30]).collect();
    // 10, 8, 6, 4, 2 new tokens: decode batches of 5 (uncaptured), 4 (uncaptured), 3 (bucket 3), 2
    // (padded to 3) and 1 (bucket 1).
    let requests: Vec<_> = prompts.iter().enumerate().map(|(i, p)| greedy(p, 10 - 2 * i)).collect();
    let base = "max_batch_size = 5\nattn_page_size = 4\n";
    let cpu = common::generate("llama", &format!("{base}device = \"cpu\"\n"), &requests);
    let t = |v: Vec<autodeploy_core::Result<autodeploy_core::runtime::Completion>>| -> Vec<Vec<i64>> {
        v.into_iter().map(|r| r.unwrap().tokens).collect()
    };
    let cpu = t(cpu);
    for attn in ATTENTION {
        let (gpu, ran) = launches(|| {
            common::generate(
                "llama",
                &format!(
                    "{base}device = \"cuda\"\ncompile_backend = \"opt\"\nattn_backend = \"{attn}\"\ncuda_graph_batch_sizes = [1, 3]\n"
                ),
                &requests,
            )
        });
        assert_eq!(t(gpu), cpu, "{attn}");
        // Buckets 1 and 3 captured once each, then replayed (batch 3 twice more, 2 padded to 3
        // three times, 1 once more).
        assert_eq!(ran.get("cuda_graph_capture"), Some(&2), "{attn}: {ran:?}");
        assert!(ran.get("cuda_graph_replay").is_some_and(|&n| n >= 4), "{attn}: {ran:?}");
    }
}

/// Bad token ids on the GPU (past the vocabulary, negative) fail their request with the op
/// named, not the process.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn bad_token_id_is_an_error_on_cuda() {
    let _turn = gpu();
    let r = common::generate(
        "llama",
        "device = \"cuda\"\n",
        &[greedy(&[1, 99999, 3], 4), greedy(&[1, 2, 3], 4), greedy(&[1, -1, 3], 4)],
    );
    let e = r[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("out of range") && e.contains("99999"), "{e}");
    let e = r[2].as_ref().unwrap_err().to_string();
    assert!(e.contains("out of range") && e.contains("-1"), "{e}");
    // The good request beside it completes with the CPU's tokens.
    let cpu = common::generate("llama", "device = \"cpu\"\n", &[greedy(&[1, 2, 3], 4)]).remove(0).unwrap();
    let good = r[1].as_ref().unwrap_or_else(|e| panic!("the good request failed too: {e}"));
    assert_eq!(good.tokens, cpu.tokens);
}

/// Dummy weights made on the GPU (`fill_uniform`, `fill_const`) are the values the CPU makes
/// for the same `Synthetic` and casts to the same dtype, bit for bit: f32, bf16 and f16, a
/// length that ends inside a chunk.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn generated_weights_are_the_cpus_bit_for_bit() {
    let _turn = gpu();
    use autodeploy_core::weights::{Synthetic, SYNTHETIC_CHUNK};
    use autodeploy_core::DType;
    use autodeploy_kernels::cuda::exec::{Dt, Gpu};
    let g = Gpu::open(0).unwrap();
    let n = 2 * SYNTHETIC_CHUNK + 77;
    for (dtype, dt) in [(DType::F32, Dt::F32), (DType::BF16, Dt::BF16), (DType::F16, Dt::F16)] {
        // The first value at `at` on the GPU that differs from `want`: both widened to f32 (exact
        // from bf16 and f16), compared as bits.
        let first_bad = |at: u64, want: &Tensor| {
            let n = want.numel();
            let mut got = vec![0u8; n * dt.size()];
            g.download(at, &mut got).unwrap();
            let got = Tensor::from_le_bytes(dtype, vec![n], &got).unwrap();
            got.to_f32().iter().zip(want.to_f32().iter()).position(|(x, y)| x.to_bits() != y.to_bits())
        };
        for v in [Synthetic::uniform_named("model.layers.0.mlp.down_proj.weight", 0.0083), Synthetic::Const(1.0)] {
            let mut cpu = vec![0f32; n];
            v.fill(&mut cpu);
            let want = Tensor::from_f32(vec![n], cpu).unwrap().cast(dtype).unwrap();
            let buf = g.alloc(n * dt.size(), "generated").unwrap();
            match v {
                Synthetic::Const(c) => g.fill_const(buf.ptr, dt, n, c),
                Synthetic::Uniform { seed, scale } => g.fill_uniform(buf.ptr, dt, &[(n, seed, scale)], SYNTHETIC_CHUNK),
            }
            .unwrap();
            assert_eq!(first_bad(buf.ptr, &want), None, "{v:?} as {dtype:?}: first differing value");
        }
        // Three parts in one launch (a MoE weight's experts): each the CPU's values of its own.
        let parts = [(SYNTHETIC_CHUNK + 5, 7u32, 0.02f32), (3, 11, 0.5), (SYNTHETIC_CHUNK, 13, 0.01)];
        let mut cpu = Vec::new();
        for &(n, seed, scale) in &parts {
            let mut v = vec![0f32; n];
            Synthetic::Uniform { seed, scale }.fill(&mut v);
            cpu.extend(v);
        }
        let total = cpu.len();
        let want = Tensor::from_f32(vec![total], cpu).unwrap().cast(dtype).unwrap();
        let buf = g.alloc(total * dt.size(), "generated").unwrap();
        g.fill_uniform(buf.ptr, dt, &parts, SYNTHETIC_CHUNK).unwrap();
        assert_eq!(first_bad(buf.ptr, &want), None, "three parts as {dtype:?}: first differing value");
    }
}

/// A dummy model (`load_format = "dummy"`: the SmolLM2-135M config alone) made on the GPU, its
/// fused q/k/v and gate/up weights included, generates the CPU's greedy tokens in f32.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn a_dummy_model_on_the_gpu_is_the_cpus() {
    let _turn = gpu();
    let dir = common::fixture("configs/SmolLM2-135M-Instruct");
    let toml = |device: &str| {
        format!(
            "model = {:?}\nload_format = \"dummy\"\ndtype = \"float32\"\ndevice = \"{device}\"\nmax_batch_size = 1\nmax_seq_len = 64\n",
            dir.display().to_string()
        )
    };
    let mut tokens = Vec::new();
    for device in ["cpu", "cuda"] {
        let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml(device), None).unwrap();
        let mut e = autodeploy_core::pipeline::build(&cfg).unwrap();
        let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
        let req = autodeploy_core::runtime::Request {
            prompt: vec![1, 2, 3, 4, 5, 6, 7, 8],
            sampling: autodeploy_core::sampling::SamplingParams { max_new_tokens: 8, ..Default::default() },
        };
        let (r, _) = rt.generate(&mut e, &[req]);
        tokens.push(r[0].as_ref().unwrap().tokens.clone());
    }
    assert_eq!(tokens[0], tokens[1], "greedy tokens, CPU then CUDA");
}

/// Head dims past the powers of two, on a dummy SmolLM2-shaped model with `head_dim` edited:
/// 96 (Phi-3 mini's, a kernel of its own) and 80, 48, 136 (kernels of 128, 64 and 256 taking
/// the row length at run time; at 136 a lane's RoPE partners sit across a lane boundary). Each
/// gives the CPU's logits (f32, within `F32_TOL`) through prefill and decode steps and the CPU's
/// greedy tokens through both attention backends; bf16 prefill of 300 tokens at 96 runs on the
/// tensor cores. A head dim that is no multiple of 8 (84) is refused when the engine is built,
/// naming it.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn general_head_dims_match_the_cpu_and_others_are_refused_at_build() {
    use common::edit::{copy_fixture, edit_config};
    let _turn = gpu();
    let (_t, dir) = copy_fixture("configs/SmolLM2-135M-Instruct");
    let build = |head_dim: usize, extra: &str| {
        edit_config(&dir, |m| drop(m.insert("head_dim".into(), head_dim.into())));
        let toml = format!(
            "model = {:?}\nload_format = \"dummy\"\nattn_page_size = {PAGE}\nmax_batch_size = 2\nmax_seq_len = 320\n{extra}",
            dir.display().to_string()
        );
        let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
        autodeploy_core::pipeline::build(&cfg).map(|e| (e, cfg))
    };
    let prompt: Vec<i64> = (0..40).map(|i| 1 + (i * 37) % 250).collect();
    let prompts = vec![prompt.clone(), vec![1, 5, 9]];
    let decode: Vec<Vec<i64>> = (0..5).map(|i| vec![3 + i, 100 + 7 * i]).collect();
    for d in [96, 80, 48, 136] {
        let tokens = |extra: &str| {
            let (mut e, cfg) = build(d, extra).unwrap_or_else(|e| panic!("head_dim {d} {extra}: {e}"));
            let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
            let (r, _) = rt.generate(&mut e, &[greedy(&prompt, 8)]);
            r[0].as_ref().unwrap().tokens.clone()
        };
        let f32_cpu = "dtype = \"float32\"\ndevice = \"cpu\"\n";
        let cpu = tokens(f32_cpu);
        let cpu_logits = run_steps(&mut build(d, f32_cpu).unwrap().0, &prompts, &decode);
        for attn in ATTENTION {
            let extra = format!("dtype = \"float32\"\ndevice = \"cuda\"\nattn_backend = \"{attn}\"\n");
            assert_eq!(tokens(&extra), cpu, "{attn}: greedy tokens at head_dim {d}");
            let got = run_steps(&mut build(d, &extra).unwrap().0, &prompts, &decode);
            let (diff, m, _) = max_diff(&cpu_logits, &got);
            eprintln!("head_dim {d} {attn}: max |logit diff| {diff:.3e} (max |logit| {m:.2})");
            assert!(diff <= F32_TOL, "head_dim {d} {attn}: logits differ from the CPU by {diff}");
        }
    }
    let long: Vec<i64> = (0..300).map(|i| 1 + (i * 37) % 250).collect();
    let (_, ran) = launches(|| {
        let (mut e, cfg) =
            build(96, "dtype = \"bfloat16\"\ndevice = \"cuda\"\nattn_backend = \"flashinfer\"\n").unwrap();
        let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
        let (r, _) = rt.generate(&mut e, &[greedy(&long, 2)]);
        r[0].as_ref().unwrap().tokens.len()
    });
    assert!(ran.keys().any(|k| k.contains("prefill_tc")), "no tensor-core prefill ran: {ran:?}");
    for attn in ATTENTION {
        let err = match build(84, &format!("device = \"cuda\"\nattn_backend = \"{attn}\"\n")) {
            Ok(_) => panic!("{attn}: head_dim 84 built"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("head_dim 84") && err.contains(attn) && err.contains("multiple of 8"), "{err}");
    }
}

/// `device = "cuda:N"` past the machine's GPUs is refused at validation, naming the index, how
/// many there are, and the CPU option.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn a_gpu_index_past_the_last_is_refused() {
    let _turn = gpu();
    let toml = format!("model = {:?}\ndevice = \"cuda:99\"\n", common::fixture("llama").display().to_string());
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
    let e = cfg.validate(std::path::Path::new("gpu.toml")).unwrap_err().to_string();
    assert!(e.contains("gpu.toml") && e.contains("device") && e.contains("cuda:99"), "{e}");
    assert!(e.contains("CUDA device(s)") && e.contains("device = \"cpu\""), "{e}");
}

/// GGUF block weights kept as stored have no CUDA kernels: the build says so and names the
/// setting that dequantizes them; dequantized (f32, so no bf16 near-tie can flip a token) the
/// same file runs on the GPU and gives the CPU's greedy tokens.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn gguf_blocks_on_cuda_are_refused_until_dequantized() {
    let _turn = gpu();
    let model = common::fixture("gguf/tiny-mistral.gguf").display().to_string();
    let build = |extra: &str| {
        let toml = format!("model = {model:?}\nmax_seq_len = 64\n{extra}");
        let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
        cfg.validate(std::path::Path::new("gguf.toml")).unwrap();
        autodeploy_core::pipeline::build(&cfg).map(|e| (cfg, e))
    };
    let e = build("device = \"cuda\"\ndtype = \"auto\"\n").err().expect("blocks on CUDA must be refused").to_string();
    assert!(e.contains("block-quantized") && e.contains("dtype = \"bfloat16\""), "{e}");
    let mut tokens = Vec::new();
    for device in ["cpu", "cuda"] {
        let (cfg, mut e) = build(&format!("device = \"{device}\"\ndtype = \"float32\"\n")).unwrap();
        let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
        let (r, _) = rt.generate(&mut e, &[greedy(&[1, 17, 42, 99, 5], 8)]);
        tokens.push(r[0].as_ref().unwrap().tokens.clone());
    }
    assert_eq!(tokens[0], tokens[1], "greedy tokens, CPU then CUDA");
}

/// The fixtures' reference generations (transformers' greedy `generate`, 24 tokens) through the
/// runtime on the GPU, f32, both attention backends, with and without CUDA graphs: compared
/// with transformers itself rather than the CPU, so a bug the devices share (the runtime's
/// positions, its page tables) fails here too.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn greedy_on_cuda_matches_transformers_generate() {
    let _turn = gpu();
    for family in FAMILIES {
        let r = common::Reference::load(family);
        let refs: Vec<(Vec<i64>, Vec<i64>)> =
            (0..2).map(|j| (r.i64(&format!("gen_prompt_{j}")).1, r.i64(&format!("gen_output_{j}")).1)).collect();
        let requests: Vec<_> = refs.iter().map(|(p, w)| greedy(p, w.len())).collect();
        let scored = common::scored(family);
        for (backend, attn) in ["simple", "opt"].iter().flat_map(|b| ATTENTION.iter().map(move |a| (b, a))) {
            let extra = format!(
                "attn_page_size = {PAGE}\nmax_batch_size = 4\ndevice = \"cuda\"\ncompile_backend = \"{backend}\"\nattn_backend = \"{attn}\"\n"
            );
            if scored && *attn == "triton" {
                common::refused_scoring(family, &extra, attn);
                continue;
            }
            for (i, (got, (_, want))) in common::generate(family, &extra, &requests).into_iter().zip(&refs).enumerate()
            {
                assert_eq!(&got.unwrap().tokens, want, "{family} {backend} {attn} prompt {i}");
            }
        }
    }
}
