//! Tensor parallelism on the CPU: every fixture family's graph split over 2 and 4 ranks by the
//! `sharding` stage's `detect_sharding`, the ranks run as threads of this process sharing one
//! communicator (`comm::local_group`), against the same engine unsharded: logits within the f32
//! tolerance (the partial sums meet in another order) and generations equal (rank 0 runs the
//! runtime, the other ranks follow its steps: comm/steps.rs). Each rank's
//! layer weights are reported against the whole model's.

mod common;

use autodeploy_core::comm;
use autodeploy_core::config::PipelineConfig;
use autodeploy_core::pipeline;
use autodeploy_sdk::Stage;
use common::{greedy, ranked_tokens as tokens, FAMILIES};

fn config(family: &str, extra: &str, world: usize, rank: usize) -> PipelineConfig {
    let text = common::config_text(family, &format!("world_size = {world}\n{extra}"));
    let mut cfg = PipelineConfig::from_toml_str(&text, None).unwrap();
    cfg.rank = rank;
    cfg.validate(std::path::Path::new("test.toml")).unwrap();
    cfg
}

/// `f(rank's config)` on one thread a rank, each with its communicator; results in rank order.
fn on_ranks<T: Send + 'static>(
    family: &str,
    extra: &str,
    world: usize,
    f: impl Fn(PipelineConfig) -> T + Send + Sync + 'static,
) -> Vec<T> {
    common::on_ranks((0..world).map(|rank| config(family, extra, world, rank)).collect(), f)
}

/// Logits of a 2 x 7 batch through the graph after the sharding stage (uncached attention).
fn logits(cfg: PipelineConfig) -> Vec<f32> {
    let g = pipeline::graph_after(&cfg, Stage::Sharding).unwrap();
    let mut m = common::compile(&g);
    let ids: Vec<i64> = [1, 17, 42, 99, 5, 7, 250, 1, 200, 3, 3, 90, 12, 64].to_vec();
    common::logits(m.as_mut(), &[2, 7], &ids)
}

/// Bytes of the weights the graph's layers and LM head read (the embedding table left out unless
/// the LM head reads it too), and what `detect_sharding` said.
fn layer_bytes_and_summary(cfg: &PipelineConfig) -> (u64, String) {
    let g = pipeline::graph_after(cfg, Stage::Sharding).unwrap();
    let bytes = g
        .params
        .iter()
        .filter(|p| {
            let lookup =
                |n: &autodeploy_core::ir::Node| ["aten.embedding", "vocab_parallel_embedding"].contains(&n.op.name);
            g.nodes.iter().any(|n| !lookup(n) && n.inputs.contains(&p.value))
        })
        .map(|p| pipeline::param_bytes(&g, p).unwrap())
        .sum();
    let summary = g.history.iter().find(|h| h.contains("detect_sharding")).cloned().unwrap_or_default();
    (bytes, summary)
}

#[test]
fn tensor_parallel_ranks_match_one_rank_on_every_family() {
    let mut failed = Vec::new();
    for family in FAMILIES {
        let one = logits(config(family, "", 1, 0));
        let one_tokens = tokens(config(family, "", 1, 0));
        assert!(one_tokens[0].is_ok() && one_tokens[1].is_ok(), "{family}: {one_tokens:?}");
        assert!(one_tokens[2].as_ref().is_err_and(|e| e.contains("out of range")), "{family}: {one_tokens:?}");
        let (whole, _) = layer_bytes_and_summary(&config(family, "", 1, 0));
        // MoE fixtures also with their experts spread over the ranks (expert parallelism), in
        // one group a rank and, at 4 ranks, in 2 groups of 2.
        let moe = common::ROUTED.contains(family);
        let layouts: &[(usize, usize)] =
            if moe { &[(2, 1), (2, 2), (4, 1), (4, 4), (4, 2)] } else { &[(2, 1), (4, 1)] };
        for &(world, ep) in layouts {
            let extra = format!("ep_size = {ep}\n");
            let (part, summary) = layer_bytes_and_summary(&config(family, &extra, world, 0));
            println!("{family} TP={world} EP={ep}: rank 0 holds {part} of {whole} layer weight bytes; {summary}");
            if moe && !summary.contains("MoE") {
                failed.push(format!("{family} TP={world} EP={ep}: MoE not split: {summary}"));
            }
            for (rank, l) in on_ranks(family, &extra, world, logits).into_iter().enumerate() {
                let d = common::max_abs_diff(&one, &l, family);
                if d > common::F32_MAX_ABS {
                    failed.push(format!("{family} TP={world} EP={ep} rank {rank}: logits differ by {d}"));
                }
            }
            let t = on_ranks(family, &extra, world, tokens).swap_remove(0);
            if t != one_tokens {
                failed.push(format!("{family} TP={world} EP={ep}: tokens {t:?} vs {one_tokens:?}"));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Attention, MLPs, the LM head and the embedding split on a family whose shapes allow it: the
/// summary says so and a rank holds about half the layer weights.
#[test]
fn llama_over_two_ranks_splits_attention_mlps_and_the_lm_head() {
    let (whole, _) = layer_bytes_and_summary(&config("llama", "", 1, 0));
    let (part, summary) = layer_bytes_and_summary(&config("llama", "", 2, 1));
    assert!(summary.contains("2 attention (2 query heads each), 2 MLPs, 1 LM head, 1 embedding split"), "{summary}");
    assert!(!summary.contains("replicated"), "{summary}");
    // Norm weights stay whole: a little over half.
    let frac = part as f64 / whole as f64;
    assert!((0.5..0.55).contains(&frac), "rank 1 holds {part} of {whole} bytes ({frac:.3})");
    let dump = pipeline::graph_after(&config("llama", "", 2, 1), Stage::Sharding).unwrap().dump();
    assert_eq!(dump.matches("= all_reduce(").count(), 5, "{dump}");
    // The tied table: one slice for the lookup and the LM head.
    assert!(
        dump.contains("vocab_parallel_embedding(%model.embed_tokens.weight.tp1of2, %input_ids, start=128, vocab=256)"),
        "{dump}"
    );
    assert_eq!(dump.matches("= all_gather(").count(), 1, "{dump}");
    assert!(dump.contains("q_proj.weight.tp1of2: f32[32, 64]"), "{dump}");
}

/// A sharded engine whose rank has no communicator fails its step saying how to launch it,
/// and ranks whose peers stop fail with the missing ranks named instead of hanging.
#[test]
fn a_rank_without_its_peers_fails_clearly() {
    let cfg = config("llama", "", 2, 0);
    let g = pipeline::graph_after(&cfg, Stage::Sharding).unwrap();
    let mut m = common::compile(&g);
    let ids = autodeploy_core::Tensor::from_i64(vec![1, 2], vec![1, 2]).unwrap();
    let pos = autodeploy_core::Tensor::from_i64(vec![1, 2], vec![0, 1]).unwrap();
    let Err(e) = m.forward(&[ids.clone(), pos.clone()], None) else { panic!("ran without a communicator") };
    let e = e.to_string();
    assert!(e.contains("mpirun") && e.contains("all_reduce"), "{e}");
    let group = comm::local_group(2, std::time::Duration::from_millis(300));
    let e = comm::with_thread(group[0].clone(), || m.forward(&[ids, pos], None)).err().unwrap().to_string();
    assert!(e.contains("ranks [1]"), "{e}");
}

/// A follower that goes away (built its slice, then stopped following): rank 0's next step
/// fails naming the missing rank, its engine reports the failure (the server answers 503 on
/// it) and refuses later steps at once instead of waiting again.
#[test]
fn a_follower_that_stops_fails_rank_zero_loudly() {
    use autodeploy_core::runtime::ModelRunner;
    let group = comm::local_group(2, std::time::Duration::from_millis(500));
    let c1 = group[1].clone();
    let cfg1 = config("llama", "", 2, 1);
    let gone = std::thread::spawn(move || comm::with_thread(c1, || drop(pipeline::build(&cfg1).unwrap())));
    let cfg = config("llama", "", 2, 0);
    comm::with_thread(group[0].clone(), || {
        let mut e = pipeline::build(&cfg).unwrap();
        gone.join().unwrap();
        assert!(e.failure().is_none());
        let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
        let (res, _) = rt.generate(&mut e, &[greedy(&[1, 17, 42], 4)]);
        let err = res[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("ranks [1]") && err.contains("restart"), "{err}");
        assert!(e.failure().is_some_and(|f| f.contains("ranks [1]")), "{:?}", e.failure());
        let t0 = std::time::Instant::now();
        let (res, _) = rt.generate(&mut e, &[greedy(&[1, 5], 2)]);
        assert!(res[0].is_err() && t0.elapsed() < std::time::Duration::from_millis(400), "{res:?}");
    });
}

/// The manual override (`[sharding]`): a kind of layer left whole, and layers named by weight
/// patterns kept whole; the ranks still give one rank's logits, and a bad key names itself.
#[test]
fn the_manual_override_keeps_what_it_names_whole() {
    let extra = "[sharding]\nmlp = false\nreplicate = [\"model.layers.1.self_attn.*\"]\n";
    let (_, summary) = layer_bytes_and_summary(&config("llama", extra, 2, 0));
    assert!(summary.contains("1 attention (2 query heads each), 0 MLPs"), "{summary}");
    assert!(summary.contains("`model.layers.1.self_attn.q_proj.weight` matches [sharding] replicate"), "{summary}");
    let one = logits(config("llama", "", 1, 0));
    for (rank, l) in on_ranks("llama", extra, 2, logits).into_iter().enumerate() {
        let d = common::max_abs_diff(&one, &l, "llama");
        assert!(d <= common::F32_MAX_ABS, "rank {rank}: logits differ by {d}");
    }
    for (bad, what) in [("replicate = \"x\"", "replicate"), ("mlps = false", "mlps")] {
        let text = common::config_text("llama", &format!("world_size = 2\n[sharding]\n{bad}\n"));
        let e = PipelineConfig::from_toml_str(&text, None)
            .and_then(|c| c.validate(std::path::Path::new("bad.toml")))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(what), "{bad}: {e}");
    }
}

/// Quantized checkpoints over 2 ranks: FP8 linears split as float ones (their E4M3 weights by
/// rows with a per-row scale and bias, or by columns with the scales whole), NVFP4 ones with
/// their block scales (rows, or columns in whole blocks), the MLPs the matchers leave as
/// linears found through their activation and product; logits within the f32 tolerance of one
/// rank's and the same generations. What a split would change stays whole and the summary says
/// why: `quantize = "fp8"`'s per-token scales of o_proj and down (a rank sees only its columns).
#[test]
fn quantized_checkpoints_split_over_ranks_or_say_why_not() {
    let cases = [
        ("llama-fp8", "", "2 attention (2 query heads each), 2 MLPs", None),
        ("qwen3-fp8", "", "2 attention (", None),
        ("llama-fp8-kv", "", "2 attention (2 query heads each), 2 MLPs", None),
        // Random weights in the checkpoint's layout (the GPU benches' dummy FP8 models).
        ("llama-fp8", "load_format = \"dummy\"\n", "2 attention (2 query heads each), 2 MLPs", None),
        ("llama", "quantize = \"fp8\"\n", "0 attention", Some("quantizes each token at its own scale")),
        ("mistral-nvfp4", "", "2 attention (2 query heads each), 2 MLPs", None),
    ];
    for (name, extra, splits, why) in cases {
        let one = logits(config(name, extra, 1, 0));
        let one_tokens = tokens(config(name, extra, 1, 0));
        let (whole, _) = layer_bytes_and_summary(&config(name, extra, 1, 0));
        let (part, summary) = layer_bytes_and_summary(&config(name, extra, 2, 1));
        println!("{name}: rank 1 holds {part} of {whole} layer weight bytes; {summary}");
        assert!(summary.contains(splits), "{name}: {summary}");
        match why {
            None => {
                assert!(!summary.contains("replicated"), "{name}: {summary}");
                assert!(part * 10 < whole * 6, "{name}: rank 1 holds {part} of {whole} bytes");
                let dump = pipeline::graph_after(&config(name, extra, 2, 1), Stage::Sharding).unwrap().dump();
                let codes = if name.contains("nvfp4") { "f4e2m1" } else { "f8e4m3" };
                assert!(dump.contains(&format!("down_proj.weight.tp1of2: {codes}[")), "{name}\n{dump}");
            }
            Some(why) => assert!(summary.contains(why), "{name}: {summary}"),
        }
        for (rank, l) in on_ranks(name, extra, 2, logits).into_iter().enumerate() {
            let d = common::max_abs_diff(&one, &l, name);
            assert!(d <= common::F32_MAX_ABS, "{name} rank {rank}: logits differ by {d}");
        }
        assert_eq!(on_ranks(name, extra, 2, tokens).swap_remove(0), one_tokens, "{name}: generations");
    }
}

/// An FP8 checkpoint with a scale a weight row (static input scales): split by rows, each
/// rank's weight rows take their own scales (`llama-fp8` rewritten with each linear's one scale
/// spread into varied per-row values); logits within the f32 tolerance of one rank's.
#[test]
fn per_row_fp8_scales_split_with_their_rows() {
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    let src = common::fixture("llama-fp8");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "hf_quant_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut spread = 0;
    for (name, t) in st.tensors() {
        let rows =
            name.strip_suffix("weight_scale").and_then(|w| st.tensor(&format!("{w}weight")).ok()).map(|w| w.shape()[0]);
        match rows {
            Some(r) if t.dtype() == Dtype::F32 => {
                let s = f32::from_le_bytes(t.data()[..4].try_into().unwrap());
                let v: Vec<u8> = (0..r).flat_map(|i| (s * (0.8 + 0.1 * (i % 5) as f32)).to_le_bytes()).collect();
                owned.push((name.clone(), Dtype::F32, vec![r], v));
                spread += 1;
            }
            _ => owned.push((name.clone(), t.dtype(), t.shape().to_vec(), t.data().to_vec())),
        }
    }
    assert_eq!(spread, 14, "every linear's weight scale");
    let views: Vec<(String, TensorView)> =
        owned.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let cfg = |world: usize, rank: usize| {
        let text = format!(
            "model = {:?}\ndtype = \"float32\"\nmax_seq_len = 128\nworld_size = {world}\n",
            dir.path().display().to_string()
        );
        let mut c = PipelineConfig::from_toml_str(&text, None).unwrap();
        c.rank = rank;
        c.validate(std::path::Path::new("test.toml")).unwrap();
        c
    };
    let one = logits(cfg(1, 0));
    let g = pipeline::graph_after(&cfg(2, 1), Stage::Sharding).unwrap();
    let dump = g.dump();
    assert!(dump.contains("q_proj.weight_scale.tp1of2: f32[32]"), "{dump}");
    assert!(dump.contains("gate_proj.weight_scale.tp1of2: f32[48]"), "{dump}");
    // Split by columns, o_proj and down keep their scales whole.
    assert!(dump.contains("%model.layers.0.mlp.down_proj.weight_scale)"), "{dump}");
    for (rank, l) in common::on_ranks(vec![cfg(2, 0), cfg(2, 1)], logits).into_iter().enumerate() {
        let d = common::max_abs_diff(&one, &l, "per-row FP8");
        assert!(d <= common::F32_MAX_ABS, "rank {rank}: logits differ by {d}");
    }
    let want = tokens(cfg(1, 0));
    assert_eq!(common::on_ranks(vec![cfg(2, 0), cfg(2, 1)], tokens).swap_remove(0), want);
}
