//! Tensor parallelism on the CPU: every fixture family's graph split over 2 and 4 ranks by the
//! `sharding` stage's `detect_sharding`, the ranks run as threads of this process sharing one
//! communicator (`comm::local_group`), against the same engine unsharded: logits within the f32
//! tolerance (the partial sums meet in another order) and greedy generations equal. Each rank's
//! layer weights are reported against the whole model's.

mod common;

use std::sync::Arc;

use autodeploy_core::comm::{self, Communicator};
use autodeploy_core::config::PipelineConfig;
use autodeploy_core::pipeline;
use autodeploy_sdk::Stage;
use common::{greedy, FAMILIES};

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
    let f = Arc::new(f);
    let group = comm::local_group(world, std::time::Duration::from_secs(60));
    let handles: Vec<_> = group
        .into_iter()
        .enumerate()
        .map(|(rank, c): (usize, Arc<dyn Communicator>)| {
            let (f, cfg) = (f.clone(), config(family, extra, world, rank));
            std::thread::spawn(move || comm::with_thread(c, || f(cfg)))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
}

/// Logits of a 2 x 7 batch through the graph after the sharding stage (uncached attention).
fn logits(cfg: PipelineConfig) -> Vec<f32> {
    let g = pipeline::graph_after(&cfg, Stage::Sharding).unwrap();
    let mut m = common::compile(&g);
    let ids: Vec<i64> = [1, 17, 42, 99, 5, 7, 250, 1, 200, 3, 3, 90, 12, 64].to_vec();
    common::logits(m.as_mut(), &[2, 7], &ids)
}

fn tokens(cfg: PipelineConfig) -> Vec<Vec<i64>> {
    let mut e = pipeline::build(&cfg).unwrap_or_else(|err| panic!("build rank {}: {err}", cfg.rank));
    let requests = vec![greedy(&[1, 17, 42, 99, 5], 10), greedy(&[1, 200, 3], 10)];
    let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
    rt.generate(&mut e, &requests).0.into_iter().map(|r| r.unwrap().tokens).collect()
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
        let (whole, _) = layer_bytes_and_summary(&config(family, "", 1, 0));
        for world in [2, 4] {
            let (part, summary) = layer_bytes_and_summary(&config(family, "", world, 0));
            println!("{family} TP={world}: rank 0 holds {part} of {whole} layer weight bytes; {summary}");
            for (rank, l) in on_ranks(family, "", world, logits).into_iter().enumerate() {
                let d = common::max_abs_diff(&one, &l, family);
                if d > common::F32_MAX_ABS {
                    failed.push(format!("{family} TP={world} rank {rank}: logits differ by {d}"));
                }
            }
            for (rank, t) in on_ranks(family, "", world, tokens).into_iter().enumerate() {
                if t != one_tokens {
                    failed.push(format!("{family} TP={world} rank {rank}: tokens {t:?} vs {one_tokens:?}"));
                }
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
