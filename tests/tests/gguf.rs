//! The GGUF importer on a small llama-architecture file written by llama.cpp's own `gguf`
//! package (tests/fixtures/make_gguf_fixtures.py): every tensor type, the Q/K permutation, the
//! logits, and bad files.

mod common;

use std::path::{Path, PathBuf};

use autodeploy_core::backend::ImportRequest;
use autodeploy_core::gguf::{dequantize, GgmlType};
use autodeploy_core::registry;
use autodeploy_core::DType;
use common::*;
use safetensors::SafeTensors;

fn tiny() -> PathBuf {
    fixture("gguf").join("tiny-mistral.gguf")
}

fn reference() -> Vec<u8> {
    std::fs::read(fixture("gguf").join("tiny-mistral.reference.safetensors")).unwrap()
}

/// The `tokens` and transformers' `logits` of a GGUF fixture's reference file.
fn reference_logits(file: &str) -> (Vec<i64>, Vec<f32>) {
    let bytes = std::fs::read(fixture("gguf").join(file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("tokens").unwrap();
    let ids = t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    (ids, f32s(st.tensor("logits").unwrap().data()))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn import(path: &Path) -> autodeploy_core::Result<autodeploy_core::Graph> {
    import_as(path, Some(DType::F32))
}

/// `dtype: None` is `dtype = "auto"`: block weights stay as stored.
fn import_as(path: &Path, dtype: Option<DType>) -> autodeploy_core::Result<autodeploy_core::Graph> {
    autodeploy_plugins::link();
    let req = ImportRequest { path: path.into(), dtype, max_batch_size: 2, max_seq_len: 64, dummy_weights: false };
    registry::importer("gguf").unwrap().import(&req)
}

#[test]
fn every_tensor_dequantizes_and_unpermutes_like_llama_cpp() {
    let g = import(&tiny()).unwrap();
    let bytes = reference();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut n = 0;
    for (name, view) in st.tensors() {
        let Some(hf) = name.strip_prefix("weight.") else { continue };
        let want = f32s(view.data());
        let got = g.weights.load(hf, DType::F32).unwrap();
        assert_eq!(got.shape(), view.shape(), "{hf}");
        assert_eq!(got.to_f32().as_ref(), want.as_slice(), "{hf} differs from the gguf package's dequantization");
        n += 1;
    }
    assert_eq!(n, 21);
}

#[test]
fn logits_match_transformers_with_the_dequantized_weights() {
    let g = import(&tiny()).unwrap();
    let mut m = compile(&g);
    let (ids, want) = reference_logits("tiny-mistral.reference.safetensors");
    let got = logits(m.as_mut(), &[1, ids.len()], &ids);
    let d = max_abs_diff(&got, &want, "tiny-mistral.gguf logits");
    assert!(d <= 1e-4, "max abs error {d}");
}

/// `dtype = "auto"` keeps the Q4_0, Q4_1 and Q8_0 tensors as stored (the kernels read the
/// blocks) and gives the dequantized model's logits, over the whole prompt (the GEMM path) and
/// for the first token alone (one row: the decode kernels).
#[test]
fn blocks_kept_as_stored_give_the_dequantized_logits() {
    let g = import_as(&tiny(), None).unwrap();
    let dump = g.dump();
    for block in ["q4_0[", "q4_1[", "q8_0["] {
        assert!(dump.contains(block), "no {block} weight kept as stored:\n{dump}");
    }
    let mut m = compile(&g);
    let (ids, want) = reference_logits("tiny-mistral.reference.safetensors");
    let got = logits(m.as_mut(), &[1, ids.len()], &ids);
    let d = max_abs_diff(&got, &want, "tiny-mistral.gguf logits, blocks kept");
    eprintln!("blocks kept, whole prompt: max abs error {d:.3e}");
    assert!(d <= 1e-4, "max abs error {d}");
    let vocab = want.len() / ids.len();
    let first = logits(m.as_mut(), &[1, 1], &ids[..1]);
    let d1 = max_abs_diff(&first, &want[..vocab], "first token alone, blocks kept");
    assert!(d1 <= 1e-4, "first token alone: max abs error {d1}");
}

/// A GGUF whose every matrix is Q4_K or Q6_K (tiny-kquant.gguf) imports, dequantizes at load
/// (with `dtype = "auto"` too: K-quants have no block kernels) and gives transformers' logits
/// with the weights the gguf package dequantizes.
#[test]
fn k_quant_tensors_in_a_gguf_file_give_transformers_logits() {
    let path = fixture("gguf").join("tiny-kquant.gguf");
    let bytes = std::fs::read(fixture("gguf").join("tiny-kquant.reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<i64> = st
        .tensor("tokens")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let want = f32s(st.tensor("logits").unwrap().data());
    for dtype in [Some(DType::F32), None] {
        let g = import_as(&path, dtype).unwrap();
        let dump = g.dump();
        assert!(!dump.contains("q4_k[") && !dump.contains("q6_k["), "K-quants are dequantized at load:\n{dump}");
        let mut m = compile(&g);
        let got = logits(m.as_mut(), &[1, ids.len()], &ids);
        let d = max_abs_diff(&got, &want, "tiny-kquant.gguf logits");
        eprintln!("tiny-kquant.gguf, dtype {dtype:?}: max abs error {d:.3e}");
        assert!(d <= 1e-4, "dtype {dtype:?}: max abs error {d}");
    }
}

#[test]
fn quantized_blocks_match_the_gguf_package() {
    let bytes = std::fs::read(fixture("gguf").join("blocks.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let types = [
        (GgmlType::Q4K, "Q4_K"),
        (GgmlType::Q6K, "Q6_K"),
        (GgmlType::Q5_0, "Q5_0"),
        (GgmlType::Q5_1, "Q5_1"),
        (GgmlType::Q2K, "Q2_K"),
        (GgmlType::Q3K, "Q3_K"),
        (GgmlType::Q5K, "Q5_K"),
    ];
    for (ty, name) in types {
        assert_eq!(ty.name(), name);
        let raw = st.tensor(&format!("raw.{name}")).unwrap().data().to_vec();
        let want = f32s(st.tensor(&format!("deq.{name}")).unwrap().data());
        let got = dequantize(ty, &raw);
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{name}[{i}]: {a} vs {b}");
        }
    }
}

fn import_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.gguf");
    std::fs::write(&p, bytes).unwrap();
    match import(&p) {
        Ok(g) => {
            // Parsing may succeed; loading every weight must then succeed or fail cleanly too.
            for prm in &g.params {
                if let Err(e) = g.weights.load(&prm.weight, DType::F32) {
                    return e.to_string();
                }
            }
            String::new()
        }
        Err(e) => e.to_string(),
    }
}

/// Rewrites one metadata key's string value in place (same length).
fn patch(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let pos = bytes.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
    let mut b = bytes.to_vec();
    b[pos..pos + to.len()].copy_from_slice(to.as_bytes());
    b
}

#[test]
fn bad_gguf_files_name_the_key_or_tensor() {
    let good = std::fs::read(tiny()).unwrap();
    let e = import_err(&good[..good.len() - 1000]);
    assert!(e.contains("model.gguf") && e.contains("past the end") && e.contains("tensor `"), "{e}");
    let e = import_err(&good[..200]);
    assert!(e.contains("model.gguf") && e.contains("truncated"), "{e}");
    // A block count far beyond the file's tensors (a flipped byte once made the importer size
    // a list of a hundred million layers' weights and die out of memory): refused by the key.
    let key = b"llama.block_count";
    let at = good.windows(key.len()).position(|w| w == key).expect("the fixture has llama.block_count");
    let mut huge = good.clone();
    // After the key: its value's type (u32, 4 bytes), then the value (u32, little-endian).
    huge[at + key.len() + 4..at + key.len() + 8].copy_from_slice(&0x0fff_ffffu32.to_le_bytes());
    let e = import_err(&huge);
    assert!(e.contains("block_count") && e.contains("268435455 blocks") && e.contains("blk.268435454"), "{e}");
    // An architecture we do not support.
    let e = import_err(&patch(
        &good,
        "general.architecture\u{8}\0\0\0\u{5}\0\0\0\0\0\0\0llama",
        "general.architecture\u{8}\0\0\0\u{5}\0\0\0\0\0\0\0gpt2x",
    ));
    assert!(e.contains("general.architecture") && e.contains("gpt2x") && e.contains("supported: llama"), "{e}");
    // An architecture mapped only with experts (Llama 4's), here a dense file: refused naming
    // the expert count, not run as Llama (the value is one byte longer, which shifts the
    // tensor data, never read).
    let (from, to) = ("\u{5}\0\0\0\0\0\0\0llama", "\u{6}\0\0\0\0\0\0\0llama4");
    let at = good.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
    let e = import_err(&[&good[..at], to.as_bytes(), &good[at + from.len()..]].concat());
    assert!(e.contains("llama4.expert_count") && e.contains("`llama4` GGUF files without experts"), "{e}");
    // A missing metadata key: rename it so it is no longer found.
    let e = import_err(&patch(&good, "llama.block_count", "llama.blockxcount"));
    assert!(e.contains("llama.block_count") && e.contains("missing"), "{e}");
    // An unknown tensor type id on the last tensor's info (its name is unique in the file).
    let h = autodeploy_core::gguf::Header::parse(&good).unwrap();
    let t = h.tensors.last().unwrap();
    let name_pos = good
        .windows(t.name.len() + 8)
        .position(|w| w[8..] == *t.name.as_bytes() && w[..8] == (t.name.len() as u64).to_le_bytes())
        .unwrap()
        + 8;
    let type_pos = name_pos + t.name.len() + 4 + 8 * t.dims.len();
    let mut b = good.clone();
    b[type_pos..type_pos + 4].copy_from_slice(&77u32.to_le_bytes());
    let e = import_err(&b);
    assert!(e.contains(&format!("tensor `{}`", t.name)) && e.contains("ggml type 77"), "{e}");
    // A type of the format this reader lacks is named as ggml names it.
    b[type_pos..type_pos + 4].copy_from_slice(&20u32.to_le_bytes());
    let e = import_err(&b);
    assert!(e.contains(&format!("tensor `{}`", t.name)) && e.contains("IQ4_NL (20) is not supported"), "{e}");
    // An offset off the file's alignment (once read shifted, silently wrong) is refused.
    let off_pos = type_pos + 4;
    let mut b = good.clone();
    let off = u64::from_le_bytes(b[off_pos..off_pos + 8].try_into().unwrap());
    b[off_pos..off_pos + 8].copy_from_slice(&(off + 4).to_le_bytes());
    let e = import_err(&b);
    assert!(
        e.contains(&format!("tensor `{}`", t.name)) && e.contains("not a multiple of the file's alignment 32"),
        "{e}"
    );
}

/// A fixture's own transformers logits from its GGUF (`tiny-<family>.gguf`).
fn gguf_matches_its_fixture(family: &str) -> autodeploy_core::Graph {
    let g = import(&fixture("gguf").join(format!("tiny-{family}.gguf"))).unwrap();
    let bytes = std::fs::read(fixture(family).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for i in 0..3 {
        let t = st.tensor(&format!("tokens_{i}")).unwrap();
        let ids: Vec<i64> = t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        let want = f32s(st.tensor(&format!("logits_f32_{i}")).unwrap().data());
        let mut m = compile(&g);
        let got = logits(m.as_mut(), t.shape(), &ids);
        let d = max_abs_diff(&got, &want, &format!("tiny-{family}.gguf logits {i}"));
        assert!(d <= F32_MAX_ABS, "{family} sequence {i}: max abs error {d}");
    }
    g
}

/// A granite-architecture GGUF (the granite fixture written as llama.cpp's converter writes it,
/// tests/fixtures/make_gguf_fixtures.py): the multipliers under llama.cpp's keys give the
/// granite fixture's transformers logits, and the graph shows each of them.
#[test]
fn a_granite_gguf_reads_its_multipliers_and_gives_transformers_logits() {
    let dump = gguf_matches_its_fixture("granite").dump();
    for scale in ["aten.mul.Scalar(%embed, 2.0)", "scale=0.2", "0.5)", "aten.div.Scalar(%lm_head, 4.0)"] {
        assert!(dump.contains(scale), "{scale} missing:\n{dump}");
    }
}

/// A Llama 3.1-style GGUF (the llama fixture: llama3 RoPE scaling, q/k/v/o biases with the Q/K
/// rows and biases permuted, tied embeddings) as llama.cpp's converter writes it, the scaling
/// baked into `rope_freqs.weight` (one divisor per frequency): the fixture's transformers logits.
/// A factors tensor of the wrong length is refused naming it.
#[test]
fn a_llama3_gguf_reads_its_rope_freqs_and_gives_transformers_logits() {
    let dump = gguf_matches_its_fixture("llama").dump();
    assert!(dump.contains("self_attn.q_proj.bias") && !dump.contains("lm_head.weight"), "{dump}");
    let good = std::fs::read(fixture("gguf").join("tiny-llama.gguf")).unwrap();
    let h = autodeploy_core::gguf::Header::parse(&good).unwrap();
    let t = h.tensor("rope_freqs.weight").expect("the fixture has rope_freqs.weight");
    assert_eq!(t.shape(), [8]);
    // The tensor's one dim is the u64 after its name (and its dim count).
    let name = b"rope_freqs.weight";
    let at = good.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4;
    let mut b = good.clone();
    b[at..at + 8].copy_from_slice(&4u64.to_le_bytes());
    let e = import_err(&b);
    assert!(e.contains("rope_freqs.weight") && e.contains("[8]") && e.contains("[4]"), "{e}");
}

/// OpenELM's and DeciLM's (Llama-Nemotron's) GGUFs, written as llama.cpp's converter writes them
/// (tests/fixtures/make_gguf_fixtures.py): per-block `head_count`, `head_count_kv` and
/// `feed_forward_length` lists give each layer its heads and MLP width, 0 skipping a DeciLM
/// block's attention or MLP; OpenELM's fused `attn_qkv` split with each layer's heads, its rows
/// as stored; DeciLM's Q/K rows unpermuted with each block's own KV heads. Both give their
/// fixtures' transformers-side logits. A list of the wrong length, and a linear replacement of
/// attention (query heads without KV heads), are refused naming the key and block.
#[test]
fn layerwise_openelm_and_deci_ggufs_give_their_fixtures_logits() {
    let dump = gguf_matches_its_fixture("openelm").dump();
    assert!(dump.contains("f32[batch, seq, 2, 16]") && dump.contains("self_attn.q_norm"), "{dump}");
    let dump = gguf_matches_its_fixture("nemotron-nas").dump();
    assert!(!dump.contains("layers.1.self_attn") && !dump.contains("layers.2.mlp"), "{dump}");
    assert!(dump.contains("layers.3.self_attn") && dump.contains("layers.1.mlp"), "{dump}");
    let good = std::fs::read(fixture("gguf").join("tiny-nemotron-nas.gguf")).unwrap();
    // Block 0's KV heads made 0 with its 4 query heads kept: a linear replacement.
    let key = b"deci.attention.head_count_kv";
    let at = good.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // After the key: the array's type (u32 9), element type (u32), length (u64), then elements.
    let elem = u32::from_le_bytes(good[at + 4..at + 8].try_into().unwrap());
    let width = match elem {
        4 | 5 => 4,
        10 | 11 => 8,
        other => panic!("head_count_kv elements of gguf type {other}"),
    };
    let first = at + 16;
    let mut b = good.clone();
    b[first..first + width].fill(0);
    let e = import_err(&b);
    assert!(
        e.contains("deci.attention.head_count_kv") && e.contains("block 0") && e.contains("linear replacement"),
        "{e}"
    );
    // The list one entry short (its last element cut out, the length said 3).
    let mut b = good.clone();
    b[at + 8..at + 16].copy_from_slice(&3u64.to_le_bytes());
    b.drain(first + 3 * width..first + 4 * width);
    let e = import_err(&b);
    assert!(e.contains("deci.attention.head_count_kv") && e.contains("3 entries for 4 blocks"), "{e}");
}

/// A `llama4` GGUF (the llama4_text fixture as llama.cpp's converter writes it: experts stacked
/// per projection, the shared expert as `ffn_*_shexp`, the sigmoid router, Q/K rows in Meta's
/// interleaved order, llama3 scaling in `rope_freqs.weight`) with llama.cpp's fixed Llama 4
/// blocks (no RoPE on every 4th layer, chunks of 8192, query temperature 8192 / 0.1, q/k L2
/// norm) gives transformers' logits for the fixture's weights with those values.
#[test]
fn a_llama4_gguf_gives_transformers_logits() {
    let g = import(&fixture("gguf").join("tiny-llama4.gguf")).unwrap();
    let bytes = std::fs::read(fixture("gguf").join("tiny-llama4.reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut m = compile(&g);
    for i in 0..3 {
        let t = st.tensor(&format!("tokens_{i}")).unwrap();
        let ids: Vec<i64> = t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        let want = f32s(st.tensor(&format!("logits_f32_{i}")).unwrap().data());
        let got = logits(m.as_mut(), t.shape(), &ids);
        let d = max_abs_diff(&got, &want, &format!("tiny-llama4.gguf logits {i}"));
        assert!(d <= F32_MAX_ABS, "llama4 sequence {i}: max abs error {d}");
    }
    let dump = g.dump();
    for want in ["torch_moe", "mlp.shared_expert.down_proj.weight", "sigmoid"] {
        assert!(dump.contains(want), "{want} missing:\n{dump}");
    }
}

/// Qwen2 and Qwen3 GGUFs of their own architectures (unpermuted Q/K rows; Qwen2's q/k/v
/// biases and tied embedding, Qwen3's q/k norms and `attention.key_length` head_dim) give their
/// fixtures' transformers logits.
#[test]
fn qwen2_and_qwen3_ggufs_give_transformers_logits() {
    let dump = gguf_matches_its_fixture("qwen2").dump();
    assert!(dump.contains("self_attn.q_proj.bias") && !dump.contains("lm_head.weight"), "{dump}");
    let dump = gguf_matches_its_fixture("qwen3").dump();
    assert!(dump.contains("self_attn.q_norm.weight: f32[32]") && dump.contains("f32[batch, seq, 4, 32]"), "{dump}");
}

/// Gemma, Gemma 2, StarCoder2 and Phi-3 GGUFs, their tensors named by the gguf package's own map
/// as llama.cpp's converter names them (tests/fixtures/make_gguf_fixtures.py), give their
/// fixtures' transformers logits: Gemma's norms stored as 1 + w, Gemma 2's sandwich norms,
/// soft-caps from the metadata and alternating windows, StarCoder2's LayerNorm biases and
/// ungated MLP, Phi-3's fused `attn_qkv` and gate/up `ffn_up` split into rows, and Phi-4-mini's
/// partial rotary with LongRoPE factors from `rope_factors_short.weight`.
#[test]
fn gemma_gemma2_starcoder2_and_phi3_ggufs_give_transformers_logits() {
    let dump = gguf_matches_its_fixture("gemma").dump();
    assert!(dump.contains("gelu") && !dump.contains("lm_head.weight"), "{dump}");
    let dump = gguf_matches_its_fixture("gemma2").dump();
    for want in ["post_feedforward_layernorm", "softcap=5", "window=8", "scale=0.2041"] {
        assert!(dump.contains(want), "gemma2: {want} missing:\n{dump}");
    }
    let dump = gguf_matches_its_fixture("starcoder2").dump();
    assert!(dump.contains("aten.layer_norm") && dump.contains("mlp.c_fc.bias") && dump.contains("window=12"), "{dump}");
    gguf_matches_its_fixture("phi3");
    let dump = gguf_matches_its_fixture("phi3-longrope").dump();
    assert!(dump.contains("%rope.emb: f32[batch, seq, 24]"), "{dump}");
}

/// Mixture-of-experts GGUFs (tests/fixtures/make_gguf_fixtures.py): Qwen3-MoE's `qwen3moe` file
/// and Mixtral's `llama` file with `expert_count`, each expert a slice of llama.cpp's stacked
/// `ffn_{gate,up,down}_exps`, give their fixtures' transformers logits; the Qwen3-MoE fixture's
/// dense layer (no `ffn_gate_inp`) stays dense.
#[test]
fn qwen3_moe_and_mixtral_ggufs_give_transformers_logits() {
    let dump = gguf_matches_its_fixture("qwen3_moe").dump();
    assert!(dump.contains("torch_moe") && dump.contains("model.layers.1.mlp.down_proj.weight"), "{dump}");
    assert!(dump.contains("norm=false"), "expert_weights_norm = false not read:\n{dump}");
    let dump = gguf_matches_its_fixture("mixtral").dump();
    assert!(dump.contains("torch_moe") && dump.contains("norm=true"), "{dump}");
}

/// A MoE file's `expert_count` must match its routers' rows (checked before anything is sized
/// from it), and an `expert_count` of 0 reads as a dense model (whose missing MLP tensors are then
/// named).
#[test]
fn a_moe_gguf_expert_count_is_checked_against_its_routers() {
    let good = std::fs::read(fixture("gguf").join("tiny-mixtral.gguf")).unwrap();
    // The key's length-prefixed name, its u32 type (4), then the value.
    let key = b"llama.expert_count";
    let at = good.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(u32::from_le_bytes(good[at..at + 4].try_into().unwrap()), 4, "expert_count's type is u32");
    let with = |n: u32| {
        let mut b = good.clone();
        b[at + 4..at + 8].copy_from_slice(&n.to_le_bytes());
        import_err(&b)
    };
    let e = with(5);
    assert!(e.contains("llama.expert_count") && e.contains("ffn_gate_inp") && e.contains("[4, 64]"), "{e}");
    let e = with(0);
    assert!(e.contains("ffn_gate.weight") || e.contains("ffn_up.weight"), "{e}");
}
