//! Collectives and sharded engines on the GPU: a one-rank NCCL communicator, tensor and expert
//! parallelism over two ranks against one, and NCCL calls captured in CUDA graphs.

use crate::common;
use crate::common::gpu::{gpu, launches};
use crate::common::FAMILIES;

/// The NCCL path on one GPU: a one-rank communicator initialises, and its sum all-reduce (f32
/// into another buffer, bf16 in place) leaves the values exactly as they are.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn nccl_one_rank_all_reduce() {
    use autodeploy_kernels::cuda::{exec::Dt, nccl};
    let _turn = gpu();
    let g = autodeploy_kernels::cuda::exec::Gpu::open(0).unwrap();
    let id = nccl::unique_id().unwrap();
    let c = nccl::Nccl::init(&g, id, 0, 1).unwrap();
    let n = 4096;
    let bytes: Vec<u8> = (0..n).flat_map(|i| (i as f32 * 0.37 - 700.0).to_le_bytes()).collect();
    let (a, b) = (g.alloc(bytes.len(), "x").unwrap(), g.alloc(bytes.len(), "y").unwrap());
    g.upload(a.ptr, &bytes).unwrap();
    c.all_reduce_sum(&g, a.ptr, b.ptr, n, Dt::F32).unwrap();
    c.all_reduce_sum(&g, a.ptr, a.ptr, 2 * n, Dt::BF16).unwrap();
    g.sync().unwrap();
    for buf in [&b, &a] {
        let mut out = vec![0u8; bytes.len()];
        g.download(buf.ptr, &mut out).unwrap();
        assert!(out == bytes, "a one-rank all-reduce changed the values");
    }
}

/// Tensor parallelism on the GPU: every fixture family split over 2 ranks (threads of this
/// process; with one GPU they share it, so their collectives go through the host, and with
/// several each rank takes its own and NCCL), f32, through rank 0's runtime with the other rank
/// following: the same tokens as one rank on the GPU, greedy and sampled, and a bad request
/// failing alone. MoE fixtures also with expert parallelism (each rank's routing skips the
/// other rank's experts).
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn sharded_ranks_on_the_gpu_match_one_rank() {
    let _turn = gpu();
    let cfg = |family: &str, backend: &str, (world, ep): (usize, usize), rank: usize| {
        let extra =
            format!("device = \"cuda\"\ncompile_backend = \"{backend}\"\nworld_size = {world}\nep_size = {ep}\n");
        let mut c =
            autodeploy_core::config::PipelineConfig::from_toml_str(&common::config_text(family, &extra), None).unwrap();
        c.rank = rank;
        c.validate(std::path::Path::new("test.toml")).unwrap();
        c
    };
    let mut failed = Vec::new();
    for family in FAMILIES {
        // MoE fixtures also with their experts spread over the two ranks.
        let eps: &[usize] = if common::ROUTED.contains(family) { &[1, 2] } else { &[1] };
        for backend in ["simple", "opt"] {
            let one = common::ranked_tokens(cfg(family, backend, (1, 1), 0));
            assert!(one[2].is_err(), "{family}: {one:?}");
            for &ep in eps {
                let ranks = vec![cfg(family, backend, (2, ep), 0), cfg(family, backend, (2, ep), 1)];
                let two = common::on_ranks(ranks, common::ranked_tokens);
                if two[0] != one {
                    failed.push(format!("{family} {backend} TP=2 EP={ep}: {:?} vs one rank's {one:?}", two[0]));
                }
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// For `one_rank_collectives_on_nccl_are_captured_in_cuda_graphs`: an `all_reduce` after every
/// MLP and an `all_gather` of the logits, as a sharded graph has them, in a one-rank graph
/// (where both leave the values as they are). Off unless a config enables it.
struct OneRankCollectives;

impl autodeploy_core::transform::Transform for OneRankCollectives {
    fn apply(
        &self,
        g: &mut autodeploy_core::Graph,
        _: &autodeploy_core::transform::TransformContext,
    ) -> autodeploy_core::error::Result<String> {
        use autodeploy_core::ops::collective::Gather;
        use autodeploy_core::Op;
        let mlps: Vec<usize> = (0..g.nodes.len())
            .filter(|&n| ["torch_swiglu_mlp", "torch_mlp", "torch_moe"].contains(&g.nodes[n].op.name))
            .collect();
        let mut targets: Vec<(usize, autodeploy_core::ValueId, bool)> =
            mlps.iter().map(|&n| (n, g.nodes[n].outputs[0], false)).collect();
        let producers = g.producers();
        for &o in &g.outputs {
            targets.push((producers[o.0 as usize].unwrap(), o, true));
        }
        targets.sort_by_key(|t| std::cmp::Reverse(t.0));
        for &(n, v, gather) in &targets {
            let op = if gather { Op::all_gather(Gather { dim: -1, world: 1 }) } else { Op::all_reduce() };
            let out = g.insert_node(n + 1, &format!("{}.collective", g.value(v).name), op, &[v])?;
            g.replace_uses_from(v, out, n + 2);
            if gather {
                for o in g.outputs.iter_mut().filter(|o| **o == v) {
                    *o = out;
                }
            }
        }
        Ok(format!("{} all_reduce, {} all_gather", mlps.len(), targets.len() - mlps.len()))
    }
}

autodeploy_core::inventory::submit! {
    autodeploy_core::registry::TransformPlugin {
        name: "test_one_rank_collectives",
        stage: autodeploy_sdk::Stage::Sharding,
        order: 50,
        enabled_by_default: false,
        options: &[],
        version: "test",
        origin: "tests/tests/cuda/ranks.rs",
        make: || Box::new(OneRankCollectives),
    }
}

/// NCCL inside captured CUDA graphs: a one-rank graph with collectives where a sharded one has
/// them (one rank's NCCL communicator; on one GPU the only NCCL run possible) gives the tokens
/// the same graph without them gives, through decode steps captured and replayed, the NCCL calls
/// recorded into the graphs.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn one_rank_collectives_on_nccl_are_captured_in_cuda_graphs() {
    let _turn = gpu();
    for backend in ["cudagraph", "opt"] {
        let cfg = |extra: &str| {
            let text =
                common::config_text("llama", &format!("device = \"cuda\"\ncompile_backend = \"{backend}\"\n{extra}"));
            let c = autodeploy_core::config::PipelineConfig::from_toml_str(&text, None).unwrap();
            c.validate(std::path::Path::new("test.toml")).unwrap();
            c
        };
        let plain = common::ranked_tokens(cfg(""));
        let with = cfg("[transforms.test_one_rank_collectives]\nenabled = true\n");
        let group = autodeploy_core::comm::local_group(1, std::time::Duration::from_secs(60));
        let (got, ran) =
            launches(|| autodeploy_core::comm::with_thread(group[0].clone(), || common::ranked_tokens(with)));
        assert_eq!(got, plain, "{backend}");
        for k in ["nccl_all_reduce", "nccl_all_gather", "cuda_graph_capture", "cuda_graph_replay"] {
            assert!(ran.contains_key(k), "{backend}: no {k}: {ran:?}");
        }
    }
}
