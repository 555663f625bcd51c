//! The real `config.json` of every model family in the support matrix
//! (tests/fixtures/model-configs, SOURCES.md there says where each came from), imported with
//! dummy weights: the supported families build a graph whose parameter count is the model's
//! published one (worked out by hand from the config where noted), and the others are refused at
//! import naming their `model_type` and the supported families, never run as the wrong model.

mod common;

use autodeploy_core::backend::{ImportRequest, ModelImporter};
use autodeploy_plugins::importers::hf::HfImporter;
use common::*;

/// Parameters of each supported model: the count its model card or safetensors index gives
/// (Qwen3's and Granite's cards round, so those three were summed by hand from the config: embedding, 36 or 28
/// layers of q/k/v/o, q/k norms, SwiGLU MLP and two norms, the final norm, the LM head unless
/// tied; their non-embedding parts match the cards' 6.95B and 0.44B).
const PUBLISHED: &[(&str, u64)] = &[
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1_100_048_384),
    ("meta-llama/Llama-2-7b-chat-hf", 6_738_415_616),
    ("meta-llama/Llama-3.2-1B-Instruct", 1_235_814_400),
    ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248),
    ("meta-llama/Llama-3.3-70B-Instruct", 70_553_706_496),
    // The 70B FP8 sibling's config (SOURCES.md): its weights as parameters, the scales aside.
    ("nvidia/Llama-3.1-8B-Instruct-FP8", 70_553_706_496),
    ("mistralai/Mistral-7B-Instruct-v0.3", 7_248_023_552),
    ("Qwen/Qwen2.5-0.5B-Instruct", 494_032_768),
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),
    ("Qwen/Qwen3-0.6B", 596_049_920),
    ("Qwen/Qwen3-8B", 8_190_735_360),
    ("ibm-granite/granite-3.1-2b-instruct", 2_533_531_648),
    ("microsoft/Phi-3-medium-4k-instruct", 13_960_238_080),
    ("microsoft/phi-4", 14_659_507_200),
    // Phi-4-mini, summed from the config (tied 200,064-token embedding, GQA 24:8, fused
    // projections split at load): the card's 3.8B.
    ("microsoft/Phi-4-mini-instruct", 3_836_021_760),
    // Gemma's (summed from the config as above, equal to the safetensors totals the model
    // pages give): tied embeddings, (1+w) norms, Gemma 2/3's four norms a layer, Gemma 3's q/k
    // norms.
    ("google/gemma-2b", 2_506_172_416),
    ("google/gemma-2-2b-it", 2_614_341_888),
    ("google/gemma-3-1b-it", 999_885_952),
    // StarCoder2-7B, tied (transformers' default; its config has no key), LayerNorms with
    // bias, biases on every projection: the model page's 7.17B.
    ("bigcode/starcoder2-7b", 7_173_923_840),
    // Mixture of experts, summed from the config as above (a router and each expert's three
    // projections a sparse layer): Qwen3-30B-A3B's card says 30.5B; Mixtral-8x22B's 141B.
    ("Qwen/Qwen3-30B-A3B", 30_532_122_624),
    // OpenELM-270M: per-layer heads (12-20) and MLP widths (768-5120), fused qkv and GLU
    // projections, tied: the model page's 0.27B, summed from the config.
    ("apple/OpenELM-270M-Instruct", 271_527_168),
    // Llama-Nemotron Super 49B: DeciLM blocks (49 layers with attention, 80 with an MLP of
    // each block's width), the safetensors total the model page gives.
    ("nvidia/Llama-3_3-Nemotron-Super-49B-v1", 49_867_145_216),
    ("mistralai/Mixtral-8x22B-Instruct-v0.1", 140_620_634_112),
    // Llama-4-Scout's text model, summed from its `text_config`: untied 202,048-token embedding
    // and LM head (2 × 1,034,485,760), 48 layers of attention (62,914,560) and two norms
    // (10,240), each a MoE layer (router 81,920; 16 experts' gate/up 1,342,177,280 and down
    // 671,088,640; the shared expert 125,829,120), the final norm (5,120): 107,769,861,120; plus
    // 9,216, the weights of ones the importer makes for the weightless q/k norms of the 36 RoPE
    // layers (2 × 128 each). The card's 109B total includes the vision tower, not built.
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", 107_769_870_336),
];

fn import(dir: &std::path::Path) -> autodeploy_core::Result<autodeploy_core::Graph> {
    let req = ImportRequest {
        path: dir.to_path_buf(),
        dtype: None,
        max_batch_size: 1,
        max_seq_len: 128,
        dummy_weights: true,
    };
    HfImporter.import(&req)
}

fn model_type(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["model_type"].as_str().unwrap_or("?").to_string()
}

#[test]
fn every_matrix_config_builds_with_its_parameter_count_or_is_refused_by_name() {
    let root = fixture("model-configs");
    let mut dirs: Vec<_> = walk(&root).into_iter().filter(|p| p.ends_with("config.json")).collect();
    dirs.sort();
    assert!(dirs.len() >= 20, "{} configs under {}", dirs.len(), root.display());
    let mut built = Vec::new();
    for cfg in dirs {
        let dir = cfg.parent().unwrap();
        let name = dir.strip_prefix(&root).unwrap().display().to_string();
        let mt = model_type(dir);
        let supported = autodeploy_plugins::importers::families::family(&mt).is_some();
        match import(dir) {
            Ok(g) => {
                assert!(supported, "{name}: model_type `{mt}` is not a supported family but imported");
                let params: u64 = g
                    .params
                    .iter()
                    .filter(|p| {
                        use autodeploy_plugins::importers::decoder::{INV_FREQ, INV_FREQ_LOCAL};
                        p.weight != INV_FREQ && p.weight != INV_FREQ_LOCAL
                    })
                    .map(|p| g.meta(p.value).shape.iter().map(|d| d.as_static().unwrap() as u64).product::<u64>())
                    .sum();
                match PUBLISHED.iter().find(|(n, _)| *n == name) {
                    Some(&(_, want)) => assert_eq!(params, want, "{name}: parameters"),
                    None => panic!("{name} ({mt}) builds ({params} parameters) but has no published count here"),
                }
                eprintln!("{name} ({mt}): builds, {params} parameters");
                built.push(name);
            }
            Err(e) => {
                let e = e.to_string();
                eprintln!("{name} ({mt}): refused: {e}");
                if supported {
                    // A supported family's checkpoint that asks for what its blocks lack is
                    // refused naming the key.
                    assert!(e.contains("key `"), "{name}: {e}");
                } else {
                    assert!(
                        e.contains(&format!("unsupported model_type `{mt}`"))
                            && e.contains(&format!("supported: {}", autodeploy_plugins::importers::families::names())),
                        "{name}: {e}"
                    );
                }
            }
        }
    }
    let missing: Vec<_> = PUBLISHED.iter().filter(|(n, _)| !built.iter().any(|b| b == n)).collect();
    assert!(missing.is_empty(), "these supported models did not build: {missing:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
