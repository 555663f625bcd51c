//! The attention schedules on the GPU against the CPU: prefills past the split-KV decode's
//! reach (the ragged kernel, on CUDA and tensor cores), batched decodes on tensor cores, decode
//! steps past the split partials, mixed steps, chunked prefill and shared prefixes.

use crate::common::gpu::{gpu, launches};
use crate::common::{self, engine, greedy};
use crate::{bf16_against_f32, max_diff, run_steps, ATTENTION, BACKENDS, F32_TOL, PAGE};
use autodeploy_core::pipeline::Engine;

/// What `run` gives on the CPU for qwen3 under a bf16 config `base` (the reference), and under
/// the same config in f32 (the truth `bf16_against_f32` measures both against).
fn on_the_cpu<T>(base: &str, run: impl Fn(&mut Engine) -> T) -> (T, T) {
    let reference = run(&mut engine("qwen3", &format!("{base}device = \"cpu\"\n")));
    let f32_base = base.replace("bfloat16", "float32");
    (reference, run(&mut engine("qwen3", &format!("{f32_base}device = \"cpu\"\n"))))
}

/// A prefill of more than 256 tokens runs the ragged paged kernel (shorter steps take the
/// split-KV one; `triton` its own): greedy tokens still equal the CPU's.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn long_prefill_matches_cpu() {
    let _turn = gpu();
    let prompts: Vec<Vec<i64>> = (0..3).map(|r| (0..100).map(|i| 1 + (i * 37 + r * 11) % 250).collect()).collect();
    let requests: Vec<_> = prompts.iter().map(|p| greedy(p, 8)).collect();
    let base = "max_batch_size = 4\nattn_page_size = 16\n";
    let t = |v: Vec<autodeploy_core::Result<autodeploy_core::runtime::Completion>>| -> Vec<Vec<i64>> {
        v.into_iter().map(|r| r.unwrap().tokens).collect()
    };
    let cpu = t(common::generate("qwen3", &format!("{base}device = \"cpu\"\n"), &requests));
    for (backend, attn) in BACKENDS.iter().flat_map(|b| ATTENTION.iter().map(move |a| (b, a))) {
        let extra = format!("{base}device = \"cuda\"\ncompile_backend = \"{backend}\"\nattn_backend = \"{attn}\"\n");
        let (gpu, ran) = launches(|| common::generate("qwen3", &extra, &requests));
        assert_eq!(t(gpu), cpu, "{backend} {attn}");
        let kernel = if *attn == "triton" { "slot_attention" } else { "paged_attention" };
        assert!(ran.contains_key(kernel), "{backend} {attn}: the 300-token step did not run {kernel}: {ran:?}");
        assert!(
            !ran.keys().any(|k| k.starts_with("paged_prefill_tc")),
            "{backend} {attn}: f32 took the tensor-core kernel: {ran:?}"
        );
    }
}

/// bf16 prompts of 100 tokens, three in one 300-token step, take the ragged kernel on tensor
/// cores (head dim 32, sm_80+; f32 keeps the CUDA-core kernel), one warp a block and a GQA
/// group's heads a block (`[kernels] prefill_group_heads`): the logits of that step and of a
/// decode step after it stay within bf16's tolerance of the CPU's.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn long_bf16_prefill_on_tensor_cores_matches_cpu() {
    let _turn = gpu();
    let prompts: Vec<Vec<i64>> = (0..3).map(|r| (0..100).map(|i| 1 + (i * 37 + r * 11) % 250).collect()).collect();
    let decode = [vec![5, 6, 7]];
    let base = format!("dtype = \"bfloat16\"\nattn_page_size = {PAGE}\nmax_batch_size = 4\nmax_seq_len = 256\n");
    let (reference, truth) = on_the_cpu(&base, |e| run_steps(e, &prompts, &decode));
    let mut failed = Vec::new();
    for (backend, group) in [("simple", false), ("opt", false), ("simple", true), ("opt", true)] {
        let extra = format!(
            "{base}device = \"cuda\"\ncompile_backend = \"{backend}\"\nattn_backend = \"flashinfer\"\n\
             kernels.prefill_group_heads = {group}\n"
        );
        let mut gpu = engine("qwen3", &extra);
        let (got, ran) = launches(|| run_steps(&mut gpu, &prompts, &decode));
        let kernel = if group { "paged_prefill_tc_grp" } else { "paged_prefill_tc" };
        assert!(ran.contains_key(kernel), "{backend}: {kernel} did not run: {ran:?}");
        let (d, m, mean) = max_diff(&reference, &got);
        let what = format!("qwen3 bf16 300-token prefill, {backend}, {kernel}");
        eprintln!("{what}: against the CPU's bf16 max {d:.3e} mean {mean:.3e} (max |logit| {m:.2})");
        failed.extend(bf16_against_f32(&what, "qwen3", &truth, &reference, &got).err());
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// A decode batch of 6 sequences at 100-123 positions (the fixture's 128 at most) takes the
/// split-KV decode's tensor-core
/// build (bf16, head dim 32, a GQA group of at most 8; its warps make several 16-position passes
/// over the one 256-position chunk), and with `decode_tensor_cores = false` the CUDA-core
/// grouped build, and with `decode_ldmatrix = true` the tensor-core build's ldmatrix fragment
/// loads: the logits of the prefill step and of three decode steps stay within bf16's tolerance
/// of the CPU's (against f32) each way.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn batched_bf16_decode_on_tensor_cores_matches_cpu() {
    let _turn = gpu();
    let prompts: Vec<Vec<i64>> =
        (0..6).map(|r| (0..100 + 4 * r).map(|i| 1 + (i * 37 + r * 11) % 250).collect()).collect();
    let decode: Vec<Vec<i64>> = (0..3).map(|s| (0..6).map(|r| 1 + (s * 7 + r * 13) % 250).collect()).collect();
    let base = format!("dtype = \"bfloat16\"\nattn_page_size = {PAGE}\nmax_batch_size = 8\nmax_seq_len = 128\n");
    let (reference, truth) = on_the_cpu(&base, |e| run_steps(e, &prompts, &decode));
    let mut failed = Vec::new();
    for (tc, ldsm) in [(true, false), (true, true), (false, false)] {
        let extra = format!(
            "{base}device = \"cuda\"\ncompile_backend = \"opt\"\nattn_backend = \"flashinfer\"\nkernels.decode_tensor_cores = {tc}\nkernels.decode_ldmatrix = {ldsm}\n"
        );
        let mut gpu = engine("qwen3", &extra);
        let (got, ran) = launches(|| run_steps(&mut gpu, &prompts, &decode));
        let kernel = if ldsm { "paged_decode_tc_ldsm" } else { "paged_decode_tc" };
        assert_eq!(ran.contains_key(kernel), tc, "decode_tensor_cores = {tc}, ldmatrix {ldsm}: {ran:?}");
        assert!(ran.contains_key("paged_decode_split") != tc, "decode_tensor_cores = {tc}: {ran:?}");
        let what = format!("qwen3 bf16 decode batch of 6, decode_tensor_cores = {tc}, decode_ldmatrix = {ldsm}");
        failed.extend(bf16_against_f32(&what, "qwen3", &truth, &reference, &got).err());
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Decode steps of 2 sequences (at most 4 tokens) take the split-KV decode's latency build
/// (`paged_decode_split`: RoPE, the KV write and attention in one launch) by default, and with
/// `decode_latency_build = false` `rope_write_kv` and the throughput build on tensor cores
/// (`paged_decode_tc`, which the prefill step runs either way) instead; the logits of the
/// prefill step and three decode steps stay within bf16's tolerance of the CPU's (against f32)
/// each way.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn small_decode_steps_run_either_decode_build() {
    let _turn = gpu();
    let prompts: Vec<Vec<i64>> =
        (0..2).map(|r| (0..90 + 7 * r).map(|i| 1 + (i * 29 + r * 17) % 250).collect()).collect();
    let decode: Vec<Vec<i64>> = (0..3).map(|s| (0..2).map(|r| 1 + (s * 5 + r * 19) % 250).collect()).collect();
    let base = format!("dtype = \"bfloat16\"\nattn_page_size = {PAGE}\nmax_batch_size = 4\nmax_seq_len = 128\n");
    let (reference, truth) = on_the_cpu(&base, |e| run_steps(e, &prompts, &decode));
    let mut failed = Vec::new();
    for latency in [true, false] {
        let extra = format!(
            "{base}device = \"cuda\"\ncompile_backend = \"opt\"\nattn_backend = \"flashinfer\"\nkernels.decode_latency_build = {latency}\n"
        );
        let mut gpu = engine("qwen3", &extra);
        let (got, ran) = launches(|| run_steps(&mut gpu, &prompts, &decode));
        // (The prefill step's short prompts take the tensor-core build either way: only the
        // latency build's kernel tells the decode steps apart.)
        assert_eq!(ran.contains_key("paged_decode_split"), latency, "decode_latency_build = {latency}: {ran:?}");
        assert!(ran.contains_key("paged_decode_tc"), "decode_latency_build = {latency}: {ran:?}");
        let what = format!("qwen3 bf16 decode of 2, decode_latency_build = {latency}");
        failed.extend(bf16_against_f32(&what, "qwen3", &truth, &reference, &got).err());
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Decode steps of 300 sequences (past the split-KV decode's 256 tokens of partials) take the
/// split kernels in fewer chunks, not the ragged prefill kernel (session 37: the 8B's decode step
/// at batch 512 was 3.4 times the step at 256 through it); `opt` replays them in the CUDA graph
/// of bucket 512 (padded rows). f32 logits of the prefill and two decode steps within F32_TOL of
/// the CPU's, both compile backends.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn a_decode_step_past_the_split_partials_stays_split() {
    let _turn = gpu();
    let n = 300;
    let prompts: Vec<Vec<i64>> =
        (0..n).map(|r| (0..4 + r % 9).map(|i| 1 + (i * 37 + r * 11) % 250).collect()).collect();
    let decode: Vec<Vec<i64>> = (0..2).map(|s| (0..n).map(|r| 1 + (s * 7 + r * 13) % 250).collect()).collect();
    let base = format!("attn_page_size = {PAGE}\nmax_batch_size = 512\nmax_seq_len = 32\nmax_num_tokens = 4096\n");
    let reference = run_steps(&mut engine("qwen3", &format!("{base}device = \"cpu\"\n")), &prompts, &decode);
    let mut failed = Vec::new();
    for backend in ["simple", "opt"] {
        let extra =
            format!("{base}device = \"cuda\"\ncompile_backend = \"{backend}\"\nattn_backend = \"flashinfer\"\n");
        let mut gpu = engine("qwen3", &extra);
        let (got, ran) = launches(|| run_steps(&mut gpu, &prompts, &decode));
        assert!(ran.contains_key("paged_decode_split"), "{backend}: the 300-token decode steps did not split: {ran:?}");
        let (d, m, _) = max_diff(&reference, &got);
        eprintln!("qwen3 f32 decode of {n}, {backend}: max |logit diff| {d:.3e} (max |logit| {m:.2})");
        if d > F32_TOL {
            failed.push(format!("{backend}: logits differ from the CPU by {d} > {F32_TOL}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// A mixed step as the in-flight runtime makes them: four decodes queued first, then three
/// prompts of 90 tokens (274 tokens: past the split-KV decode's 256). bf16, `flashinfer`: with
/// `mixed_step_split_decodes` the decodes take the split-KV decode and the prompts alone the
/// tensor-core prefill; without, every token the prefill. The logits of the first prompts, the
/// mixed step and a decode step of all seven stay within bf16's tolerance of the CPU's (against
/// f32) both ways, and the split-KV decode runs in the mixed step only with the setting.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn a_mixed_steps_decodes_take_the_split_kv_decode() {
    let _turn = gpu();
    let prompt = |r: usize, n: usize| -> Vec<i64> { (0..n).map(|i| 1 + ((i * 37 + r * 11) % 250) as i64).collect() };
    let first: Vec<(usize, Vec<i64>)> = (0..4).map(|r| (r, prompt(r, 40 + 5 * r))).collect();
    let mut mixed: Vec<(usize, Vec<i64>)> = (0..4).map(|r| (r, vec![3 + r as i64])).collect();
    mixed.extend((4..7).map(|r| (r, prompt(r, 90))));
    let last: Vec<(usize, Vec<i64>)> = (0..7).map(|r| (r, vec![9 + 2 * r as i64])).collect();
    let schedule = [first, mixed, last];
    let base = format!("dtype = \"bfloat16\"\nattn_page_size = {PAGE}\nmax_batch_size = 8\nmax_seq_len = 128\n");
    let run = |e: &mut Engine| common::steps::run_paged_schedule(e, PAGE, &schedule);
    let (reference, truth) = on_the_cpu(&base, run);
    let mut failed = Vec::new();
    let mut decodes = Vec::new();
    for on in [false, true] {
        let extra = format!(
            "{base}device = \"cuda\"\ncompile_backend = \"opt\"\nattn_backend = \"flashinfer\"\nkernels.mixed_step_split_decodes = {on}\n"
        );
        let mut gpu = engine("qwen3", &extra);
        let (got, ran) = launches(|| run(&mut gpu));
        assert!(
            ran.keys().any(|k| k.starts_with("paged_prefill_tc")),
            "mixed_step_split_decodes = {on}: no tensor-core prefill: {ran:?}"
        );
        decodes.push(ran.iter().filter(|(k, _)| k.starts_with("paged_decode")).map(|(_, &v)| v).sum::<u64>());
        let what = format!("qwen3 bf16 mixed step, mixed_step_split_decodes = {on}");
        failed.extend(bf16_against_f32(&what, "qwen3", &truth, &reference, &got).err());
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(decodes[1] > decodes[0], "split-KV decode launches off/on: {decodes:?}: the mixed step did not split");
}

/// `trtllm` on the GPU: steps that mix decodes with prefill chunks (a budget of 8 tokens, so the
/// 19- and 11-token prompts are chunked over cached positions) give the CPU's greedy tokens, for
/// both attention backends, with and without CUDA graphs.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn trtllm_chunked_prefill_on_cuda_matches_cpu() {
    let _turn = gpu();
    let prompts: Vec<Vec<i64>> =
        vec![(0..19).map(|i| 3 + (i * 37) % 250).collect(), (0..11).map(|i| 5 + (i * 11) % 250).collect(), vec![9, 4]];
    let requests: Vec<_> = prompts.iter().map(|p| greedy(p, 10)).collect();
    let base = "runtime = \"trtllm\"\nmax_num_tokens = 8\nmax_batch_size = 4\nattn_page_size = 4\n";
    let t = |v: Vec<autodeploy_core::Result<autodeploy_core::runtime::Completion>>| -> Vec<Vec<i64>> {
        v.into_iter().map(|r| r.unwrap().tokens).collect()
    };
    let cpu = t(common::generate("qwen3", &format!("{base}device = \"cpu\"\n"), &requests));
    let demo = t(common::generate("qwen3", "device = \"cpu\"\n", &requests));
    assert_eq!(cpu, demo, "trtllm vs demollm on the CPU");
    for (backend, attn) in ["simple", "opt"].iter().flat_map(|b| ATTENTION.iter().map(move |a| (b, a))) {
        let extra = format!("{base}device = \"cuda\"\ncompile_backend = \"{backend}\"\nattn_backend = \"{attn}\"\n");
        assert_eq!(t(common::generate("qwen3", &extra, &requests)), cpu, "{backend} {attn}");
    }
}

/// The prefix cache on the GPU: a request that starts from another's cached prefix pages (3
/// pages of 4 tokens, read by the GPU kernels through its page table) generates the CPU's
/// tokens, with both attention kernels' paths (`opt` and `simple`).
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn a_shared_prefix_on_cuda_matches_cpu() {
    use autodeploy_core::engine_core::{EngineCore, Event, Limits, Policy};
    let _turn = gpu();
    let prefix: Vec<i64> = (0..13).map(|i| 3 + (i * 41) % 250).collect();
    let a: Vec<i64> = prefix.iter().copied().chain([17, 18, 19, 20, 21]).collect();
    let b: Vec<i64> = prefix.iter().copied().chain([90, 91, 92, 93, 94, 95, 96]).collect();
    let run = |extra: &str| {
        let mut e = engine("qwen3", &format!("attn_page_size = 4\nmax_batch_size = 4\n{extra}"));
        let limits =
            Limits { max_batch_size: 4, max_num_tokens: 64, page_size: 4, max_seq_len: 128, prefix_caching: true };
        let mut core = EngineCore::with_policy(&e, limits, Policy::InFlight);
        let mut out = Vec::new();
        for p in [&a, &b] {
            core.add_request(&e, greedy(p, 12)).unwrap();
            while core.has_unfinished() {
                for ev in core.step(&mut e) {
                    if let Event::Finished { result, .. } = ev {
                        out.push(result.unwrap().tokens);
                    }
                }
            }
        }
        (out, core.stats().prefix_hit_tokens)
    };
    let (cpu, cpu_hits) = run("device = \"cpu\"\n");
    assert_eq!(cpu_hits, 12);
    for backend in ["simple", "opt"] {
        let (gpu, hits) = run(&format!("device = \"cuda\"\ncompile_backend = \"{backend}\"\n"));
        assert_eq!(hits, 12, "{backend}");
        assert_eq!(gpu, cpu, "{backend}");
    }
}
