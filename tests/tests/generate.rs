//! Generation through the transform pipeline, the paged KV cache and the demollm runtime,
//! against transformers' `generate`.

mod common;

use autodeploy_core::registry;
use autodeploy_core::runtime::{Detokenizer, FinishReason};
use autodeploy_core::sampling::SamplingParams;
use common::*;

/// (prompt, the 24 tokens transformers' greedy `generate` picked) for each fixture prompt.
fn references(fam: &str) -> Vec<(Vec<i64>, Vec<i64>)> {
    let r = Reference::load(fam);
    let mut v = Vec::new();
    let mut j = 0;
    while r.has(&format!("gen_prompt_{j}")) {
        v.push((r.i64(&format!("gen_prompt_{j}")).1, r.i64(&format!("gen_output_{j}")).1));
        j += 1;
    }
    assert!(v.len() >= 2, "{fam}: expected generation references");
    v
}

fn check_greedy(fam: &str, extra: &str, what: &str) {
    let refs = references(fam);
    let reqs: Vec<_> = refs.iter().map(|(p, w)| greedy(p, w.len())).collect();
    for (i, (res, (_, want))) in generate(fam, extra, &reqs).into_iter().zip(&refs).enumerate() {
        let got = res.unwrap_or_else(|e| panic!("{fam} {what} prompt {i}: {e}"));
        assert_eq!(&got.tokens, want, "{fam} {what} prompt {i}");
        assert_eq!(got.finish, FinishReason::Length);
    }
}

#[test]
fn greedy_through_the_kv_cache_matches_transformers_generate() {
    for fam in FAMILIES {
        let e = engine(fam, "");
        assert!(e.cache.is_some(), "{fam}: the default pipeline should insert cached attention");
        // Small pages so every sequence crosses page boundaries; decode reads the weights
        // through each CPU kernel path this CPU runs (portable, avx2, avx512vnni).
        for path in autodeploy_kernels::isa::CpuKernels::ALL.into_iter().filter(|p| p.supported()) {
            let extra = format!("attn_page_size = 4\ncpu_kernels = \"{}\"", path.name());
            check_greedy(fam, &extra, &format!("cached, {} kernels", path.name()));
        }
    }
}

/// `fuse_rope_attention` (compile stage, for the fusing compile backends): the graph that runs
/// shows the RoPEs inside the cached attentions, the tokens stay transformers' greedy ones, and
/// switching the transform off gives the unfused graph with the same tokens.
#[test]
fn compile_stage_fusions_are_transforms_the_graph_shows() {
    autodeploy_plugins::link();
    for fam in FAMILIES {
        let fused = engine(fam, "compile_backend = \"opt\"");
        let dump = fused.graph.dump();
        let layers = dump.matches("= attention_with_kv_cache(").count();
        let rotating =
            dump.lines().filter(|l| l.contains("= attention_with_kv_cache(") && l.contains("rope=true")).count();
        if PARTIAL_ROTARY.contains(fam) {
            // The rotated part is concatenated with the rest before attention: nothing to fuse.
            assert!(layers > 0 && rotating == 0, "{fam}: {dump}");
            assert_eq!(dump.matches("= torch_rope_with_explicit_cos_sin(").count(), 2 * layers, "{fam}: {dump}");
        } else {
            assert!(layers > 0 && rotating == layers - common::nope_layers(fam), "{fam}: {dump}");
            assert!(!dump.contains("torch_rope_with_explicit_cos_sin("), "{fam}: a RoPE was left");
            assert!(
                fused
                    .graph
                    .history
                    .iter()
                    .any(|h| h.contains(&format!("fused the q/k RoPEs into {rotating} cached attentions"))),
                "{fam}: {:?}",
                fused.graph.history
            );
        }
        check_greedy(fam, "compile_backend = \"opt\"\nattn_page_size = 4", "rope fused");
        let off = engine(fam, "compile_backend = \"opt\"\n[transforms.fuse_rope_attention]\nenabled = false");
        assert!(!off.graph.dump().contains("rope=true"), "{fam}: fused while disabled");
        check_greedy(fam, "compile_backend = \"opt\"\n[transforms.fuse_rope_attention]\nenabled = false", "rope apart");
        // The SwiGLU epilogue: marked on every fused SiLU MLP under opt (GeGLU has none),
        // switched off by its table.
        let mlps = dump.matches("= torch_swiglu_mlp(").count()
            + dump.matches("= torch_mlp(").count()
            + dump.matches("= torch_moe(").count();
        let silu = dump.lines().filter(|l| l.contains("= torch_swiglu_mlp(") && !l.contains("act=")).count();
        // A shared expert (Llama 4) is one more gated MLP beside its layer's MoE.
        let shared = dump.lines().filter(|l| l.contains(".shared.") && l.contains("= torch_swiglu_mlp(")).count();
        assert!(mlps == layers + shared && dump.matches("fused=true, epilogue=true)").count() == silu, "{fam}: {dump}");
        let off = engine(fam, "compile_backend = \"opt\"\n[transforms.fuse_swiglu_epilogue]\nenabled = false");
        assert!(!off.graph.dump().contains("epilogue=true"), "{fam}: epilogue while disabled");
        // Residual adds into the RMSNorms reading them: two per layer (before attention after
        // the first layer's, before the MLP) and the final norm; the first layer's input norm
        // reads the embedding and stays a plain RMSNorm, as do the norms of branch outputs
        // (Gemma 2/3's post-attention and post-MLP norms) and of q/k heads.
        // LayerNorm families (StarCoder2) keep their norms apart: no residual fusion for them.
        let fused_norms = dump.matches("= fused_add_rmsnorm(").count();
        let layer_norms = dump.matches("= aten.layer_norm(").count();
        if layer_norms > 0 {
            assert_eq!((fused_norms, layer_norms), (0, 2 * layers + 1), "{fam}: {dump}");
        } else {
            assert_eq!(fused_norms, 2 * layers, "{fam}: {dump}");
            let plain = 1 + qk_norms(&dump) + branch_norms(&dump);
            assert_eq!(dump.matches("= torch_rmsnorm(").count(), plain, "{fam}: {dump}");
            // The one add left: a shared expert's output plus the routed experts'.
            let adds = dump.lines().filter(|l| l.contains("= aten.add.Tensor(")).count();
            let moe_sums =
                dump.lines().filter(|l| l.contains(".moe_sum: ") && l.contains("= aten.add.Tensor(")).count();
            assert!(adds == moe_sums && moe_sums == shared, "{fam}: an add was left: {dump}");
        }
        let off = engine(fam, "compile_backend = \"opt\"\n[transforms.fuse_add_rmsnorm]\nenabled = false");
        assert!(!off.graph.dump().contains("fused_add_rmsnorm"), "{fam}: fused while disabled");
        check_greedy(fam, "compile_backend = \"opt\"\n[transforms.fuse_add_rmsnorm]\nenabled = false", "add apart");
        // `simple` does not fuse.
        let simple = engine(fam, "").graph.dump();
        assert!(
            !simple.contains("rope=true") && !simple.contains("epilogue=true") && !simple.contains("fused_add_rmsnorm"),
            "{fam}: simple fused"
        );
    }
}

/// RMSNorms of q and k heads (qwen3's q/k norm) in a dump: two per attention when present.
fn qk_norms(dump: &str) -> usize {
    // The q/k heads' values are named `l<i>.q.norm…` / `l<i>.k.norm…` by the importers.
    let head = |l: &&str| l.contains(".q.norm") || l.contains(".k.norm");
    dump.lines().filter(|l| l.contains("= torch_rmsnorm(")).filter(head).count()
}

/// RMSNorms of the attention and MLP outputs before their residual adds (Gemma 2/3).
fn branch_norms(dump: &str) -> usize {
    let branch = |l: &&str| l.contains("post_attn_norm") || l.contains("post_mlp_norm");
    dump.lines().filter(|l| l.contains("= torch_rmsnorm(")).filter(branch).count()
}

#[test]
fn disabling_any_single_transform_keeps_greedy_output() {
    autodeploy_plugins::link();
    let names: Vec<&str> = registry::transforms().iter().map(|t| t.name).collect();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        for fam in ["llama", "qwen3"] {
            // Under `opt`, so the compile-stage fusions run and their absence is what is tried.
            let extra = format!("compile_backend = \"opt\"\n[transforms.{name}]\nenabled = false\n");
            check_greedy(fam, &extra, &format!("without {name}"));
        }
    }
}

#[test]
fn unrecognised_attention_falls_back_to_the_uncached_path() {
    // Without the attention matcher the graph keeps aten.scaled_dot_product_attention, which cache
    // insertion does not know: it leaves the graph uncached and says which node stopped it.
    let e = engine("mistral", "[transforms.match_attention]\nenabled = false\n");
    assert!(e.cache.is_none());
    let note = e.graph.history.iter().find(|h| h.contains("insert_cached_attention")).unwrap();
    assert!(note.contains("kept uncached") && note.contains("aten.scaled_dot_product_attention"), "{note}");
    check_greedy("mistral", "[transforms.match_attention]\nenabled = false\n", "uncached fallback");
}

#[test]
fn a_batch_generates_what_each_prompt_generates_alone() {
    for fam in FAMILIES {
        let refs = references(fam);
        let prompts: Vec<Vec<i64>> = vec![
            refs[0].0.clone(),
            refs[1].0.clone(),
            vec![5, 9, 200, 31, 7, 7, 100, 3, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53],
            vec![17],
        ];
        let reqs: Vec<_> = prompts.iter().map(|p| greedy(p, 12)).collect();
        let batched = generate(fam, "attn_page_size = 4\nmax_batch_size = 4", &reqs);
        for (i, p) in prompts.iter().enumerate() {
            let alone = generate(fam, "attn_page_size = 4", &[greedy(p, 12)]).remove(0).unwrap();
            assert_eq!(batched[i].as_ref().unwrap().tokens, alone.tokens, "{fam} prompt {i}");
        }
        // With room for only two sequences at a time, later prompts wait and still match.
        let queued = generate(fam, "attn_page_size = 4\nmax_batch_size = 2", &reqs);
        for i in 0..prompts.len() {
            assert_eq!(queued[i].as_ref().unwrap().tokens, batched[i].as_ref().unwrap().tokens, "{fam} queued {i}");
        }
    }
}

#[test]
fn sampling_is_seeded_and_stops_where_asked() {
    let prompt = vec![3, 14, 15, 92];
    let sampled = |seed: u64| SamplingParams {
        max_new_tokens: 16,
        temperature: 1.5,
        top_k: 50,
        top_p: 0.95,
        seed: Some(seed),
        ..Default::default()
    };
    let req = |s: SamplingParams| autodeploy_core::runtime::Request { prompt: prompt.clone(), sampling: s };
    let a = generate("qwen2", "", &[req(sampled(1)), req(sampled(1)), req(sampled(2))]);
    let (a0, a1, a2) = (a[0].as_ref().unwrap(), a[1].as_ref().unwrap(), a[2].as_ref().unwrap());
    assert_eq!(a0.tokens, a1.tokens, "same seed, same tokens (even batched together)");
    assert_ne!(a0.tokens, a2.tokens, "different seeds should differ over 16 tokens");
    // Stop at the third greedy token.
    let g = generate("qwen2", "", &[greedy(&prompt, 8)]).remove(0).unwrap();
    let stop = g.tokens[2];
    assert!(!g.tokens[..2].contains(&stop), "the fixture should not repeat its third token earlier: {:?}", g.tokens);
    let s = SamplingParams { max_new_tokens: 8, stop_token_ids: vec![stop], ..Default::default() };
    let c = generate("qwen2", "", &[req(s)]).remove(0).unwrap();
    assert_eq!(c.finish, FinishReason::Stop);
    assert_eq!(c.tokens, g.tokens[..3].to_vec());
    // Greedy, sampled and stopped requests in one batch each keep their own result.
    let both = generate("qwen2", "", &[req(sampled(1)), greedy(&prompt, 8)]);
    assert_eq!(both[0].as_ref().unwrap().tokens, a0.tokens);
    assert_eq!(both[1].as_ref().unwrap().tokens, g.tokens);
}

#[test]
fn bad_requests_fail_alone_with_the_field_named() {
    let ok = greedy(&[5, 6, 7], 4);
    let zero = greedy(&[5, 6, 7], 0);
    let bad_p = autodeploy_core::runtime::Request {
        prompt: vec![5, 6, 7],
        sampling: SamplingParams { top_p: 1.5, temperature: 1.0, ..Default::default() },
    };
    let too_long = greedy(&vec![9; 40], 4);
    let bad_id = greedy(&[5, 99999, 7], 4);
    let out = generate("llama", "max_seq_len = 32", &[ok.clone(), zero, bad_p, too_long, ok.clone(), bad_id]);
    // The good requests complete with what they generate alone.
    let alone = generate("llama", "max_seq_len = 32", &[ok]).remove(0).unwrap();
    for i in [0, 4] {
        let c = out[i].as_ref().unwrap_or_else(|e| panic!("good request {i} failed beside bad ones: {e}"));
        assert_eq!(c.tokens, alone.tokens, "request {i}");
        assert_eq!(c.tokens.len(), 4);
    }
    let msg = |i: usize| out[i].as_ref().unwrap_err().to_string();
    assert!(msg(1).contains("max_new_tokens"), "{}", msg(1));
    assert!(msg(2).contains("top_p"), "{}", msg(2));
    assert!(msg(3).contains("prompt") && msg(3).contains("40 tokens") && msg(3).contains("32"), "{}", msg(3));
    assert!(msg(5).contains("prompt") && msg(5).contains("99999") && msg(5).contains("256"), "{}", msg(5));
}

#[test]
fn generation_stops_at_the_longest_sequence() {
    let c = generate("qwen2", "max_seq_len = 12", &[greedy(&[4; 8], 100)]).remove(0).unwrap();
    assert_eq!(c.tokens.len(), 4);
    assert_eq!(c.finish, FinishReason::Length);
}

/// A stand-in tokenizer for the fixtures (their vocabulary has no text): id → one letter.
struct Letters;
impl autodeploy_core::runtime::Detokenizer for Letters {
    fn decode(&self, ids: &[i64]) -> String {
        ids.iter().map(|&i| (b'a' + (i % 26) as u8) as char).collect()
    }
}

#[test]
fn stop_strings_match_decoded_text_across_tokens() {
    let prompt = vec![3, 14, 15, 92, 65];
    let mut e = engine("qwen3", "");
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str("model = \"x\"", None).unwrap();
    let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
    // Without a tokenizer, stop strings are refused by name (and other requests still run).
    let req = |stop: Vec<String>| autodeploy_core::runtime::Request {
        prompt: prompt.clone(),
        sampling: SamplingParams { max_new_tokens: 10, stop_strings: stop, ..Default::default() },
    };
    let (out, _) = rt.generate(&mut e, &[req(vec!["ab".into()]), req(vec![])]);
    let msg = out[0].as_ref().unwrap_err().to_string();
    assert!(msg.contains("stop_strings") && msg.contains("tokenizer"), "{msg}");
    let full = out[1].as_ref().unwrap().tokens.clone();
    e.detokenizer = Some(std::sync::Arc::new(Letters));
    let text = Letters.decode(&full);
    // A stop string spanning generated tokens 3 and 4.
    let stop = text[3..5].to_string();
    let first = text.find(&stop).unwrap();
    let (out, _) = rt.generate(&mut e, &[req(vec!["not-there".into(), stop.clone()])]);
    let c = out[0].as_ref().unwrap();
    assert_eq!(c.finish, FinishReason::Stop);
    assert_eq!(c.tokens, full[..first + stop.len()].to_vec());
    assert_eq!(c.text.as_deref(), Some(&text[..first]));
}

/// `max_num_tokens` caps the tokens of one step: three 10-token prompts under a cap of 16 are
/// prefilled one per step (3 prefill steps instead of 1), generate what they generate without
/// the cap, and a prompt longer than the cap is refused naming it.
#[test]
fn max_num_tokens_splits_prefills_and_refuses_longer_prompts() {
    let prompts: Vec<Vec<i64>> = (0..3).map(|r| (0..10).map(|i| 3 + (i * 31 + r * 17) % 250).collect()).collect();
    let reqs: Vec<_> = prompts.iter().map(|p| greedy(p, 4)).collect();
    let run = |extra: &str, reqs: &[autodeploy_core::runtime::Request]| {
        let toml = format!("model = {:?}\ndtype = \"float32\"\n{extra}", fixture("llama").display().to_string());
        let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
        cfg.validate(std::path::Path::new("test.toml")).unwrap();
        let mut e = autodeploy_core::pipeline::build(&cfg).unwrap();
        autodeploy_core::registry::runtime(&cfg).unwrap().generate(&mut e, reqs)
    };
    let (free, free_stats) = run("max_batch_size = 4\n", &reqs);
    let (capped, capped_stats) = run("max_batch_size = 4\nmax_num_tokens = 16\n", &reqs);
    for (i, (a, b)) in free.iter().zip(&capped).enumerate() {
        assert_eq!(a.as_ref().unwrap().tokens, b.as_ref().unwrap().tokens, "prompt {i}");
    }
    // Uncapped: one prefill of 30 tokens, then 3 decode steps. Capped: 3 prefills of 10 (each
    // followed by decodes of the sequences admitted so far).
    assert_eq!(free_stats.prefill_tokens, 30);
    assert_eq!(free_stats.steps, 4, "{free_stats:?}");
    assert!(capped_stats.steps > free_stats.steps, "{capped_stats:?} vs {free_stats:?}");
    let (long, _) = run("max_num_tokens = 8\n", &[greedy(&prompts[0], 4), greedy(&prompts[0][..8], 4)]);
    let e = long[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("prompt") && e.contains("10 tokens") && e.contains("max_num_tokens = 8"), "{e}");
    assert!(long[1].is_ok(), "an 8-token prompt fits a cap of 8");
}

/// The engine core is a loop: requests join while others decode, one is aborted mid-way (its
/// pages back in the pool at once), and each that finishes generates what it generates alone.
#[test]
fn requests_join_and_leave_the_engine_core_between_steps() {
    use autodeploy_core::engine_core::{EngineCore, Event, Limits};
    let refs = references("llama");
    let mut e = engine("llama", "attn_page_size = 4\nmax_batch_size = 4");
    let limits =
        Limits { max_batch_size: 4, max_num_tokens: 512, page_size: 4, max_seq_len: 128, prefix_caching: false };
    let mut core = EngineCore::new(&e, limits);
    let (pa, pb, pc) = (refs[0].0.clone(), refs[1].0.clone(), vec![7, 8, 9, 10, 11, 12]);
    let a = core.add_request(&e, greedy(&pa, 20)).unwrap();
    let c = core.add_request(&e, greedy(&pc, 20)).unwrap();
    let mut tokens: std::collections::HashMap<u64, Vec<i64>> = Default::default();
    let mut done: std::collections::HashMap<u64, Vec<i64>> = Default::default();
    let mut step = |core: &mut EngineCore, e: &mut autodeploy_core::pipeline::Engine| {
        for ev in core.step(e) {
            match ev {
                Event::Token { id, token, .. } => tokens.entry(id).or_default().push(token),
                Event::Finished { id, result } => {
                    done.insert(id, result.unwrap().tokens);
                }
                Event::Scheduled { .. } => {}
            }
        }
    };
    for _ in 0..3 {
        step(&mut core, &mut e);
    }
    let in_use = core.pages_in_use();
    assert!(core.abort(c), "c is running");
    assert!(core.pages_in_use() < in_use, "aborting c returns its pages");
    assert!(!core.abort(c), "c is gone");
    let b = core.add_request(&e, greedy(&pb, 12)).unwrap();
    while core.has_unfinished() {
        step(&mut core, &mut e);
    }
    assert_eq!(core.pages_in_use(), 0, "every page back once all requests ended");
    assert!(!done.contains_key(&c), "an aborted request does not finish");
    assert_eq!(done[&a], refs[0].1[..20].to_vec(), "a, with c aborted and b joining beside it");
    assert_eq!(done[&b], refs[1].1[..12].to_vec(), "b, joining mid-way");
    assert_eq!(tokens[&a], done[&a], "a's streamed tokens are its completion");
    // A bad request is refused at add_request and the core is unaffected.
    let e2 = core.add_request(&e, greedy(&[1, 99999], 4)).unwrap_err().to_string();
    assert!(e2.contains("99999"), "{e2}");
    assert!(!core.has_unfinished());
}

/// Generates with the runtime `runtime` on an engine whose KV cache holds `kv_pages` pages
/// (all the engine plans when `None`); returns the completions and the run's stats.
fn run_with(
    fam: &str,
    runtime: &str,
    extra: &str,
    kv_pages: Option<usize>,
    reqs: &[autodeploy_core::runtime::Request],
) -> (Vec<autodeploy_core::runtime::Completion>, autodeploy_core::runtime::RunStats) {
    let extra = format!("runtime = \"{runtime}\"\n{extra}");
    let toml =
        format!("model = {:?}\ndtype = \"float32\"\nmax_seq_len = 128\n{extra}", fixture(fam).display().to_string());
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
    let mut e = engine(fam, &extra);
    if let Some(n) = kv_pages {
        e.kv_pages = n;
    }
    let (out, stats) = autodeploy_core::registry::runtime(&cfg).unwrap().generate(&mut e, reqs);
    (out.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{fam} {runtime}: {e}"))).collect(), stats)
}

/// `trtllm` (in-flight batching) gives `demollm`'s tokens, and transformers' for the reference
/// prompts, with a token budget small enough that long prompts are prefilled in chunks beside
/// the other sequences' decodes; seeded sampling draws the same.
#[test]
fn trtllm_chunks_prefills_beside_decodes_and_matches_demollm() {
    for fam in FAMILIES {
        let refs = references(fam);
        let mut reqs: Vec<_> = refs.iter().map(|(p, w)| greedy(p, w.len())).collect();
        reqs.push(greedy(&(0..18).map(|i| 3 + (i * 13) % 250).collect::<Vec<i64>>(), 10));
        reqs.push(greedy(&[42], 6));
        reqs.push(autodeploy_core::runtime::Request {
            prompt: vec![3, 14, 15, 92, 65, 35, 89, 79, 32],
            sampling: SamplingParams {
                max_new_tokens: 8,
                temperature: 1.0,
                top_k: 40,
                seed: Some(11),
                ..Default::default()
            },
        });
        let base = "attn_page_size = 4\nmax_batch_size = 4\n";
        let (demo, demo_stats) = run_with(fam, "demollm", base, None, &reqs);
        let (inflight, stats) = run_with(fam, "trtllm", &format!("{base}max_num_tokens = 8\n"), None, &reqs);
        for (i, (a, b)) in demo.iter().zip(&inflight).enumerate() {
            assert_eq!(a.tokens, b.tokens, "{fam} request {i}: trtllm vs demollm");
        }
        for (i, (_, want)) in refs.iter().enumerate() {
            assert_eq!(&inflight[i].tokens, want, "{fam} reference prompt {i} through trtllm");
        }
        // 11- and 18-token prompts under a budget of 8: no step above 8 tokens (demollm
        // prefilled four prompts in one step), and no preemption with room to spare.
        assert!(demo_stats.max_step_tokens > 8, "{demo_stats:?}");
        assert_eq!(stats.max_step_tokens, 8, "{stats:?}");
        assert_eq!(stats.preemptions, 0, "{stats:?}");
    }
}

/// When the KV cache cannot hold every running sequence, `trtllm` preempts one (frees its
/// pages, recomputes it later) instead of failing or hanging, and every request still gets
/// the tokens it gets with room to spare.
#[test]
fn trtllm_preempts_when_pages_run_out_and_recomputes() {
    let reqs: Vec<_> =
        (0..4).map(|r| greedy(&(0..10).map(|i| 3 + (i * 7 + r * 29) % 250).collect::<Vec<i64>>(), 20)).collect();
    let base = "attn_page_size = 4\nmax_batch_size = 4\n";
    let (roomy, roomy_stats) = run_with("qwen3", "trtllm", base, None, &reqs);
    assert_eq!(roomy_stats.preemptions, 0);
    // Each sequence reaches 30 tokens (8 pages of 4); 14 pages hold fewer than two of them.
    let (tight, stats) = run_with("qwen3", "trtllm", base, Some(14), &reqs);
    assert!(stats.preemptions > 0, "{stats:?}");
    assert!(stats.peak_pages <= 14, "{stats:?}");
    // With the prefix cache on (the default), a recomputed sequence starts from its own pages
    // that the cache kept, and cached pages nobody uses are evicted to make room.
    assert!(stats.prefix_hit_tokens > 0, "{stats:?}");
    for (i, (a, b)) in roomy.iter().zip(&tight).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i} after preemption");
    }
}

/// Under random mixes of prompt lengths, token budgets and pool sizes (from one longest
/// sequence up), `trtllm` finishes every request with the tokens it gets with room to spare,
/// preempting as it must, and gives every page back. A sequence that outgrows the whole pool
/// fails alone (naming the pages) instead of leaving every later step empty.
#[test]
fn trtllm_never_stalls_when_pages_run_out() {
    use autodeploy_core::engine_core::{EngineCore, Event, Limits, Policy};
    use rand::{Rng, SeedableRng};
    let base = "attn_page_size = 4\nmax_batch_size = 4\n";
    let mut e = engine("llama", base);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut preemptions = 0;
    for trial in 0..30 {
        let reqs: Vec<_> = (0..6)
            .map(|_| {
                let len = rng.random_range(5..40);
                let prompt: Vec<i64> = (0..len).map(|_| rng.random_range(3..250)).collect();
                greedy(&prompt, rng.random_range(1..8))
            })
            .collect();
        let longest = reqs.iter().map(|r| r.prompt.len() + r.sampling.max_new_tokens).max().unwrap();
        let pool = longest.div_ceil(4) + rng.random_range(0..12);
        let budget = [5, 8, 13, 32, 64][rng.random_range(0..5)];
        let (roomy, _) = run_with("llama", "trtllm", base, None, &reqs);
        e.kv_pages = pool;
        let limits = Limits {
            max_batch_size: 4,
            max_num_tokens: budget,
            page_size: 4,
            max_seq_len: 128,
            prefix_caching: trial % 2 == 0,
        };
        let mut core = EngineCore::with_policy(&e, limits, Policy::InFlight);
        let ids: Vec<u64> = reqs.iter().map(|r| core.add_request(&e, r.clone()).unwrap()).collect();
        let mut done = std::collections::HashMap::new();
        let mut steps = 0;
        while core.has_unfinished() {
            steps += 1;
            assert!(
                steps < 2000,
                "trial {trial} (pool {pool}, budget {budget}): stalled with {} of 6 finished",
                done.len()
            );
            for ev in core.step(&mut e) {
                if let Event::Finished { id, result } = ev {
                    done.insert(id, result.unwrap().tokens);
                }
            }
        }
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(done[id], roomy[i].tokens, "trial {trial}: request {i}");
        }
        assert_eq!(core.pages_in_use() - core.prefix_cached_pages(), 0, "trial {trial}");
        preemptions += core.stats().preemptions;
    }
    assert!(preemptions > 0, "the pools were tight enough to preempt");
    // 8 pages of 4 hold 32 tokens: a 40-token prompt never fits, a 20-token one does.
    e.kv_pages = 8;
    let limits = Limits { max_batch_size: 4, max_num_tokens: 16, page_size: 4, max_seq_len: 128, prefix_caching: true };
    let mut core = EngineCore::with_policy(&e, limits, Policy::InFlight);
    let big = core.add_request(&e, greedy(&(3..43).collect::<Vec<i64>>(), 4)).unwrap();
    let small = core.add_request(&e, greedy(&(3..23).collect::<Vec<i64>>(), 4)).unwrap();
    let mut results = std::collections::HashMap::new();
    for _ in 0..200 {
        for ev in core.step(&mut e) {
            if let Event::Finished { id, result } = ev {
                results.insert(id, result);
            }
        }
    }
    assert!(!core.has_unfinished(), "stalled");
    let err = results[&big].as_ref().unwrap_err().to_string();
    assert!(err.contains("pages") && err.contains("8 in all"), "{err}");
    assert_eq!(results[&small].as_ref().unwrap().tokens.len(), 4);
}

/// Prefix caching (`trtllm`, on by default): a request sharing a 13-token prefix with one that
/// ran before starts from the 3 full pages (page 4) that one left in the cache, computes only
/// the rest, and generates what it generates with caching off; afterwards only the cache holds
/// pages. (Eviction when the pool runs dry: `trtllm_preempts_when_pages_run_out_and_recomputes`
/// runs with the cache on and 14 pages.)
#[test]
fn a_shared_prefix_is_computed_once() {
    use autodeploy_core::engine_core::{EngineCore, Event, Limits, Policy};
    let prefix: Vec<i64> = (0..13).map(|i| 3 + (i * 41) % 250).collect();
    let a: Vec<i64> = prefix.iter().copied().chain([17, 18, 19, 20, 21]).collect();
    let b: Vec<i64> = prefix.iter().copied().chain([90, 91, 92, 93, 94, 95, 96]).collect();
    let run = |caching: bool| {
        let mut e = engine("mistral", "attn_page_size = 4\nmax_batch_size = 4");
        let limits =
            Limits { max_batch_size: 4, max_num_tokens: 64, page_size: 4, max_seq_len: 128, prefix_caching: caching };
        let mut core = EngineCore::with_policy(&e, limits, Policy::InFlight);
        let mut out = Vec::new();
        let mut prefill_before_b = 0;
        for (i, p) in [&a, &b].into_iter().enumerate() {
            if i == 1 {
                prefill_before_b = core.stats().prefill_tokens;
            }
            core.add_request(&e, greedy(p, 12)).unwrap();
            while core.has_unfinished() {
                for ev in core.step(&mut e) {
                    if let Event::Finished { result, .. } = ev {
                        out.push(result.unwrap().tokens);
                    }
                }
            }
        }
        let stats = core.stats();
        (out, stats.prefill_tokens - prefill_before_b, stats, core.pages_in_use(), core.prefix_cached_pages())
    };
    let (off, b_prefill_off, off_stats, in_use_off, _) = run(false);
    let (on, b_prefill_on, on_stats, in_use_on, cached) = run(true);
    assert_eq!(on, off, "the same tokens with and without the cache");
    assert_eq!((off_stats.prefix_hit_tokens, b_prefill_off, in_use_off), (0, 20, 0), "{off_stats:?}");
    assert_eq!(on_stats.prefix_hit_tokens, 12, "{on_stats:?}");
    assert_eq!(b_prefill_on, 8, "b computes the prefix's 13th token (its page is not full) and its own 7");
    assert!(cached > 0 && in_use_on == cached, "only the prefix cache holds pages: {in_use_on} vs {cached}");
}

/// `kv_cache_budget_mib` sizes the page pool (the CPU cache holds f32: the llama fixture's two
/// layers of 2 KV heads of 16 are 2048 bytes a page of 4 tokens, so 1 MiB is 512 pages), and
/// the runtime stays within it.
#[test]
fn kv_cache_budget_sizes_the_page_pool() {
    let base = "attn_page_size = 4\nmax_batch_size = 4\n";
    let e = engine("llama", &format!("{base}kv_cache_budget_mib = 1\n"));
    assert_eq!(e.kv_pages, 512);
    let worst = engine("llama", base);
    assert_eq!(worst.kv_pages, 4 * 128 / 4, "without a budget: max_batch_size sequences of max_seq_len");
    let bad = autodeploy_core::config::PipelineConfig::from_toml_str(
        &format!(
            "model = {:?}\nkv_cache_budget_mib = 0\nfree_mem_ratio = 1.5\n",
            fixture("llama").display().to_string()
        ),
        None,
    )
    .unwrap()
    .validate("x.toml".as_ref())
    .unwrap_err()
    .to_string();
    assert!(bad.contains("free_mem_ratio") || bad.contains("kv_cache_budget_mib"), "{bad}");
}
