//! The torch-export importer (issue 7): weights read without Python equal the checkpoint they
//! were exported from; exported transformers give transformers' logits, generate what the HF
//! importer generates, and reach the same canonical graph; masks other than causal, unknown ops
//! and corrupt archives fail with errors naming what is at fault (fuzzed in tests/fuzz.rs).

mod common;

use autodeploy_core::pt2::Pt2Archive;
use autodeploy_core::DType;
use common::*;

/// The transformer exports: (fixture family, archive). `llama-legacy.pt2` is the llama
/// fixture exported by torch 2.7 (the legacy layout); the others by torch 2.15 (PT2 archive).
/// `scripts/export.py` on each fixture (tests/fixtures/make_pt2_fixtures.py): every dense family
/// whose transformers modeling exports (Gemma 2 with its eager attention: the soft-capped
/// scores plus an additive mask the importer evaluates; the MoE families through the script's
/// `autodeploy::torch_moe` patch of their sparse blocks; Phi-4-mini's LongRoPE with its short
/// factors up to `original_max_position_embeddings`, where the script stops the export), and
/// the remote-code families' reference modules (openelm, nemotron-nas) exported as they are.
const EXPORTS: &[(&str, &str)] = &[
    ("llama", "llama.pt2"),
    ("qwen3", "qwen3.pt2"),
    ("llama", "llama-legacy.pt2"),
    ("qwen2", "qwen2.pt2"),
    ("qwen2-window", "qwen2-window.pt2"),
    ("granite", "granite.pt2"),
    ("phi3", "phi3.pt2"),
    ("phi3-longrope", "phi3-longrope.pt2"),
    ("gemma", "gemma.pt2"),
    ("gemma2", "gemma2.pt2"),
    ("gemma3_text", "gemma3_text.pt2"),
    ("starcoder2", "starcoder2.pt2"),
    ("qwen3_moe", "qwen3_moe.pt2"),
    ("mixtral", "mixtral.pt2"),
    ("openelm", "openelm.pt2"),
    ("nemotron-nas", "nemotron-nas.pt2"),
    ("llama4_text", "llama4_text.pt2"),
];

#[test]
fn exported_weights_equal_the_checkpoints() {
    for &(family, file) in EXPORTS {
        let a = Pt2Archive::open(&fixture(&format!("pt2/{file}"))).unwrap();
        assert_eq!(a.model_name, "model");
        let targets = a.node_targets();
        assert!(targets.iter().any(|t| t == "torch.ops.aten.linear.default"), "{targets:?}");
        // The checkpoint's tensors as stored (the HF import permutes some: Llama 4's q/k rows).
        let mut ckpt = autodeploy_core::weights::WeightStore::new(family);
        for e in std::fs::read_dir(fixture(family)).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("model") && name.ends_with(".safetensors") {
                ckpt.add_file(autodeploy_core::weights::SafetensorsFile::open(&path).unwrap(), None);
            }
        }
        let mut checked = 0;
        for w in &a.weights {
            // scripts/export.py wraps the HF model, so its weights gain a `model.` prefix; a
            // module exported as it is (openelm, nemotron-nas) keeps its names.
            let hf = match w.name.strip_prefix("model.") {
                Some(h) if !ckpt.contains(&w.name) => h,
                _ => &w.name,
            };
            if !ckpt.contains(hf) {
                continue;
            }
            let got = a.load(&w.name).unwrap();
            let want = ckpt.load(hf, DType::F32).unwrap();
            assert_eq!(got.shape(), want.shape(), "{family} {hf}");
            assert_eq!(got.to_f32(), want.to_f32(), "{family} {hf}");
            checked += 1;
        }
        assert!(
            checked >= 12 && 2 * checked >= a.weights.len(),
            "{family}: only {checked} of {} weights matched by name",
            a.weights.len()
        );
    }
}

#[test]
fn a_module_that_is_not_a_transformer_reads_too() {
    let a = Pt2Archive::open(&fixture("pt2/mlp.pt2")).unwrap();
    let names: Vec<&str> = a.weights.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    let e = a.load("embed.weight").unwrap();
    assert_eq!(e.shape(), &[64, 16]);
    assert_eq!(
        a.node_targets(),
        [
            "torch.ops.aten.embedding.default",
            "torch.ops.aten.linear.default",
            "torch.ops.aten.gelu.default",
            "torch.ops.aten.linear.default",
            "torch.ops.aten.log_softmax.int"
        ]
    );
}

/// An export saved under an 8-character file name (torch names the archive's inner folder
/// after the file) opens, and holds the same weights and graph as the same export saved as
/// `mlp.pt2`: such archives were once refused as "Invalid Central Directory header".
#[test]
fn an_archive_with_an_eight_character_name_opens() {
    let a = Pt2Archive::open(&fixture("pt2/mlp_8chr.pt2")).unwrap();
    let b = Pt2Archive::open(&fixture("pt2/mlp.pt2")).unwrap();
    assert_eq!(a.node_targets(), b.node_targets());
    assert_eq!(a.weights.len(), b.weights.len());
    for w in &b.weights {
        assert_eq!(a.load(&w.name).unwrap().to_f32(), b.load(&w.name).unwrap().to_f32(), "{}", w.name);
    }
}

#[test]
fn corrupt_archives_fail_naming_the_file_and_entry() {
    let src = std::fs::read(fixture("pt2/mlp.pt2")).unwrap();
    let dir = std::env::temp_dir().join(format!("adpt2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Truncated: the zip directory is gone.
    let p = dir.join("truncated.pt2");
    std::fs::write(&p, &src[..src.len() / 2]).unwrap();
    let e = Pt2Archive::open(&p).err().unwrap().to_string();
    assert!(e.contains("truncated.pt2") && e.contains("zip"), "{e}");
    // Rewritten archives: bad JSON in the graph, a missing weight storage.
    let rewrite = |name: &str, edit: &EntryEdit<'_>| rewrite_archive(&src, &dir.join(name), edit);
    let p =
        rewrite("badjson.pt2", &|n, b| Some(if n.ends_with("models/model.json") { b"{not json".to_vec() } else { b }));
    let e = Pt2Archive::open(&p).err().unwrap().to_string();
    assert!(e.contains("badjson.pt2") && e.contains("models/model.json") && e.contains("invalid JSON"), "{e}");
    // A zip bomb: a valid graph padded with 200 MB of spaces deflates to a few hundred KB; it
    // is refused by the inflation cap before its entry is read whole.
    let p = rewrite("bomb.pt2", &|n, mut b| {
        if n.ends_with("models/model.json") {
            b.resize(b.len() + (200 << 20), b' ');
        }
        Some(b)
    });
    assert!(std::fs::metadata(&p).unwrap().len() < 4 << 20, "the bomb should be small");
    let e = Pt2Archive::open(&p).err().unwrap().to_string();
    assert!(e.contains("bomb.pt2") && e.contains("models/model.json") && e.contains("refused past"), "{e}");
    let p = rewrite("noweight.pt2", &|n, b| (!n.ends_with("weights/weight_1")).then_some(b));
    let a = Pt2Archive::open(&p).unwrap();
    let e = a.load("up.weight").err().unwrap().to_string();
    assert!(e.contains("noweight.pt2") && e.contains("weights/weight_1"), "{e}");
    let p = rewrite("short.pt2", &|n, b| Some(if n.ends_with("weights/weight_0") { b[..10].to_vec() } else { b }));
    let e = Pt2Archive::open(&p).unwrap().load("embed.weight").err().unwrap().to_string();
    assert!(e.contains("reach past its storage"), "{e}");
    // The legacy layout: the state dict missing, or not a torch.save container.
    let legacy = std::fs::read(fixture("pt2/llama-legacy.pt2")).unwrap();
    let p = rewrite_archive(&legacy, &dir.join("nostate.pt2"), &|n, b| (n != "serialized_state_dict.pt").then_some(b));
    let e = Pt2Archive::open(&p).err().unwrap().to_string();
    assert!(e.contains("nostate.pt2") && e.contains("missing entry `serialized_state_dict.pt`"), "{e}");
    let p = rewrite_archive(&legacy, &dir.join("badstate.pt2"), &|n, b| {
        Some(if n == "serialized_state_dict.pt" { b"not a container".to_vec() } else { b })
    });
    let e = Pt2Archive::open(&p).err().unwrap().to_string();
    assert!(e.contains("badstate.pt2") && e.contains("serialized_state_dict.pt") && e.contains("torch.save"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn import_pt2(name: &str) -> autodeploy_core::Result<autodeploy_core::Graph> {
    let req = autodeploy_core::backend::ImportRequest {
        path: fixture(&format!("pt2/{name}")),
        dtype: None,
        max_batch_size: 8,
        max_seq_len: 128,
        dummy_weights: false,
    };
    autodeploy_core::registry::importer("torch-export").unwrap().import(&req)
}

/// A user's own nn.Module (embedding → linear → tanh GELU → linear → log_softmax, dynamic
/// sequence length) exported by torch.export runs end to end and matches torch's output.
#[test]
fn a_non_transformer_export_runs_end_to_end() {
    let g = import_pt2("mlp.pt2").unwrap();
    // The sequence dim of `input_ids` (`s70` in the export) is the host's `seq`.
    assert_eq!(g.symbols.get("seq").map(|r| (r.min, r.max)), Some((1, 512)));
    let r = safetensors::SafeTensors::deserialize(&std::fs::read(fixture("pt2/mlp.reference.safetensors")).unwrap())
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.shape().to_vec(), t.data().to_vec())))
        .collect::<std::collections::HashMap<_, _>>();
    let (ids_shape, ids) = &r["input_ids"];
    let ids: Vec<i64> = ids.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let (out_shape, want) = &r["output"];
    let want: Vec<f32> = want.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let mut m = compile(&g);
    let out = m.forward(&[autodeploy_core::Tensor::from_i64(ids_shape.clone(), ids).unwrap()], None).unwrap();
    assert_eq!(out[0].shape(), out_shape.as_slice());
    let err = max_abs_diff(&out[0].to_f32(), &want, "mlp.pt2 output");
    assert!(err <= 1e-5, "max |error| against torch: {err}");
    // Outside the exported range, the symbol check refuses the input by name.
    let long = autodeploy_core::Tensor::from_i64(vec![2, 600], vec![1; 1200]).unwrap();
    let e = m.forward(&[long], None).err().unwrap().to_string();
    assert!(e.contains("seq") && e.contains("[1, 512]"), "{e}");
}

/// An op the importer does not know fails the import naming the op, the node, and where in
/// the user's source it came from.
#[test]
fn an_unknown_op_is_named_with_its_node_and_source_line() {
    let e = import_pt2("topk.pt2").err().unwrap().to_string();
    assert!(e.contains("torch.ops.aten.topk.default") && e.contains("node `topk`"), "{e}");
    assert!(e.contains("exported from") && e.contains("make_pt2_fixtures.py"), "{e}");
}

/// The transformer exports give transformers' logits (the Foundation's f32 bound).
#[test]
fn exported_transformers_match_transformers_logits() {
    for &(family, file) in EXPORTS {
        let g = import_pt2(file).unwrap();
        let mut model = compile(&g);
        let r = Reference::load(family);
        let mut i = 0;
        while r.has(&format!("tokens_{i}")) {
            let (shape, ids) = r.i64(&format!("tokens_{i}"));
            let (lshape, want) = r.f32(&format!("logits_f32_{i}"));
            let got = logits(model.as_mut(), &shape, &ids);
            assert_eq!(got.len(), want.len());
            let err = max_abs_diff(&got, &want, file);
            eprintln!("{file} seq {i} {shape:?}: max |logit error| {err:.3e}");
            assert!(err <= 1e-4, "{file} seq {i}: max abs error {err}");
            for (row_g, row_w) in got.chunks(lshape[2]).zip(want.chunks(lshape[2])) {
                assert_eq!(argmax(row_g), argmax(row_w), "{file} seq {i}: argmax differs");
            }
            i += 1;
        }
        assert!(i >= 3, "{family}: reference sequences");
    }
}

/// Greedy generation through the KV cache (the runtime, cached attention, logits gather) from
/// the export equals the HF importer's, token for token, and transformers' `generate`.
#[test]
fn exported_transformers_generate_what_the_hf_import_generates() {
    for &(family, file) in EXPORTS {
        let r = Reference::load(family);
        let mut reqs = Vec::new();
        let mut want = Vec::new();
        let mut j = 0;
        while r.has(&format!("gen_prompt_{j}")) {
            reqs.push(greedy(&r.i64(&format!("gen_prompt_{j}")).1, 24));
            want.push(r.i64(&format!("gen_output_{j}")).1);
            j += 1;
        }
        assert!(j >= 2, "{family}: generation references");
        let extra = "attn_page_size = 4\nmax_batch_size = 4";
        let from_pt2 = generate(&format!("pt2/{file}"), extra, &reqs);
        let from_hf = generate(family, extra, &reqs);
        for (k, ((p, h), w)) in from_pt2.into_iter().zip(from_hf).zip(&want).enumerate() {
            let (p, h) = (p.unwrap().tokens, h.unwrap().tokens);
            assert_eq!(p, h, "{file} prompt {k}: export vs HF importer");
            assert_eq!(&p, w, "{file} prompt {k}: export vs transformers generate");
        }
    }
}

/// After `post_load_fusion` the export's graph has the HF importer's ops with the same dtypes
/// and shapes (only value and weight names differ), in the same order, or, where the modeling
/// code orders independent ops otherwise, the same ops (Gemma 3 forms the q, k and v heads
/// before it norms q and k, the HF importer norms each as it forms it; Phi-3's partial rotary
/// slices q and k before rotating either).
#[test]
fn the_export_reaches_the_hf_imports_canonical_graph() {
    use autodeploy_core::config::PipelineConfig;
    for &(family, file) in EXPORTS {
        let ops = |model: &std::path::Path| {
            let toml = format!(
                "model = {:?}\ndtype = \"float32\"\nmax_seq_len = 128\ndevice = \"cpu\"\n",
                model.display().to_string()
            );
            let cfg = PipelineConfig::from_toml_str(&toml, None).unwrap();
            let g = autodeploy_core::pipeline::graph_after(&cfg, autodeploy_sdk::Stage::PostLoadFusion).unwrap();
            g.nodes
                .iter()
                .map(|n| {
                    let m = g.meta(n.outputs[0]);
                    format!("{} -> {m}", n.op.name())
                })
                .collect::<Vec<_>>()
        };
        let (hf, pt2) = (ops(&fixture(family)), ops(&fixture(&format!("pt2/{file}"))));
        assert!(hf.iter().any(|o| o.starts_with("torch_attention")), "{hf:?}");
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        // Modeling code that orders independent ops otherwise: Gemma 3 forms q, k and v before
        // it norms q and k; Phi-3's partial rotary slices q and k both before rotating either.
        let reordered = ["gemma3_text", "phi3-longrope"].contains(&family);
        // OpenELM's module (its remote code's layout: one q/k/v reshape into heads, split after
        // the transpose, a RoPE table per layer) reaches the same canonical ops and linears
        // with the same shapes up to the order of dims (it norms the q and k heads after moving
        // heads before positions), in another order. So does Llama 4's (transformers norms q and
        // k after RoPE, the HF import before it: the same values for its weightless L2 norm;
        // its query temperature is a [batch, seq] table there, [batch, seq, 1] here).
        if ["openelm", "llama4_text"].contains(&family) {
            let canonical = |v: &[String]| {
                let v: Vec<String> = v
                    .iter()
                    .filter(|o| o.starts_with("torch_") || o.starts_with("aten.linear"))
                    .map(|o| {
                        let (op, shape) = o.split_once('[').unwrap_or((o, ""));
                        let mut dims: Vec<&str> = shape.trim_end_matches(']').split(", ").collect();
                        dims.sort();
                        format!("{op}{dims:?}")
                    })
                    .collect();
                sorted(&v)
            };
            assert_eq!(canonical(&hf), canonical(&pt2), "{file}: canonical ops after post_load_fusion");
            continue;
        }
        if hf != pt2 && (!reordered || sorted(&hf) != sorted(&pt2)) {
            let at = hf.iter().zip(&pt2).position(|(a, b)| a != b).unwrap_or(hf.len().min(pt2.len()));
            let window = |v: &[String]| v[at.saturating_sub(2)..(at + 3).min(v.len())].to_vec();
            panic!(
                "{file}: canonical ops after post_load_fusion differ from node {at} (of {} vs {}): HF {:?}, export {:?}",
                hf.len(),
                pt2.len(),
                window(&hf),
                window(&pt2)
            );
        }
    }
}

/// A mask that is not causal (here the export's `le` made `lt`: a token no longer attends to
/// itself) is refused at the SDPA that reads it, saying where it differs.
#[test]
fn a_mask_that_is_not_causal_is_refused_at_its_sdpa() {
    let src = std::fs::read(fixture("pt2/llama.pt2")).unwrap();
    let dir = std::env::temp_dir().join(format!("adpt2-mask-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = rewrite_archive(&src, &dir.join("strict.pt2"), &|n, b| {
        Some(if n.ends_with("models/model.json") {
            String::from_utf8(b).unwrap().replace("torch.ops.aten.le.Tensor", "torch.ops.aten.lt.Tensor").into_bytes()
        } else {
            b
        })
    });
    let req = autodeploy_core::backend::ImportRequest {
        path: p,
        dtype: None,
        max_batch_size: 8,
        max_seq_len: 128,
        dummy_weights: false,
    };
    let e = autodeploy_core::registry::importer("torch-export").unwrap().import(&req).err().unwrap().to_string();
    assert!(e.contains("scaled_dot_product_attention") && e.contains("node `scaled_dot_product_attention`"), "{e}");
    assert!(e.contains("not the causal mask") && e.contains("query 0 key 0"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Local attention wider than the lengths the mask check evaluates, so found from the mask's
/// literal: a sliding-window export (the mistral fixture with a window of 48 tokens) and a
/// chunked one (the llama4_text fixture with chunks of 48 positions: the literal appears in both
/// of the mask's floor_divides, so both are substituted together). Each SDPA carries its
/// `window=48` / `chunk=48`, and 64 tokens give transformers' logits, which past 48 differ from
/// causal ones (the reference shows it), uncached and through the paged cache.
#[test]
fn a_sliding_window_export_attends_within_its_window() {
    for (name, attr) in [("mistral-window48", "window=48"), ("llama4_text-chunk48", "chunk=48")] {
        let g = import_pt2(&format!("{name}.pt2")).unwrap();
        assert!(g.nodes.iter().any(|n| n.op.attrs.contains(attr)), "{name}: no SDPA carries {attr}:\n{}", g.dump());
        let bytes = std::fs::read(fixture(&format!("pt2/{name}.reference.safetensors"))).unwrap();
        let r = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let f32s = |n: &str| -> Vec<f32> {
            r.tensor(n).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        };
        let ids: Vec<i64> = r
            .tensor("input_ids")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (window, causal) = (f32s("logits_window"), f32s("logits_causal"));
        let vocab = window.len() / ids.len();
        assert_eq!(ids.len(), 64);
        let inside = 48 * vocab;
        assert_eq!(max_abs_diff(&window[..inside], &causal[..inside], "inside the window"), 0.0, "{name}");
        assert!(
            max_abs_diff(&window[inside..], &causal[inside..], "past the window") > 0.1,
            "{name}: degenerate reference"
        );

        let mut m = compile(&g);
        let got = logits(m.as_mut(), &[1, 64], &ids);
        let err = max_abs_diff(&got, &window, "64 tokens");
        assert!(err <= 1e-4, "{name}: max |error| against transformers' logits: {err}");

        // Through the runtime and the paged cache: the 64-token prompt's greedy continuation is
        // the reference logits' argmax at its last position.
        let out = generate(&format!("pt2/{name}.pt2"), "attn_page_size = 8", &[greedy(&ids, 1)]);
        let last = &window[63 * vocab..];
        let want = argmax(last) as i64;
        assert_eq!(out[0].as_ref().unwrap().tokens, vec![want], "{name}");
    }
}

/// The tokenizer scripts/export.py saves beside an archive (`x.pt2` → `x.tokenizer/`) is the
/// model's tokenizer: text prompts run on the archive.
#[test]
fn the_tokenizer_beside_an_archive_is_used() {
    let dir = std::env::temp_dir().join(format!("adpt2-tok-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("tiny.tokenizer")).unwrap();
    std::fs::copy(fixture("pt2/llama.pt2"), dir.join("tiny.pt2")).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> =
        ["<unk>", "<s>", "</s>", "hello", "world"].iter().enumerate().map(|(i, w)| (w.to_string(), i.into())).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tiny.tokenizer/tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(dir.join("tiny.tokenizer/tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
    let path = dir.join("tiny.pt2");
    let t = autodeploy_core::registry::importer("torch-export").unwrap().tokenizer(&path).unwrap().expect("tokenizer");
    assert_eq!(t.encode("hello world", false).unwrap(), vec![3, 4]);
    assert_eq!(t.eos_id, Some(2));
    // Without the folder: no tokenizer (token-id prompts), not an error.
    std::fs::remove_dir_all(dir.join("tiny.tokenizer")).unwrap();
    assert!(autodeploy_core::registry::importer("torch-export").unwrap().tokenizer(&path).unwrap().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bfloat16 export (qwen3, `--dtype bfloat16`) keeps the Foundation's bf16 bounds against
/// transformers' bf16 logits, and generates what the HF importer generates in bf16.
#[test]
fn a_bf16_export_matches_transformers_bf16_and_the_hf_import() {
    let g = import_pt2("qwen3-bf16.pt2").unwrap();
    let mut model = compile(&g);
    let r = Reference::load("qwen3");
    for i in 0..3 {
        let (shape, ids) = r.i64(&format!("tokens_{i}"));
        let (lshape, want) = r.f32(&format!("logits_bf16_{i}"));
        let got = logits(model.as_mut(), &shape, &ids);
        let (mut max_rel, mut sum_d, mut sum_w) = (0f32, 0f64, 0f64);
        for (g, w) in got.chunks(lshape[2]).zip(want.chunks(lshape[2])) {
            let scale = w.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            for (a, b) in g.iter().zip(w) {
                max_rel = max_rel.max((a - b).abs() / scale);
                sum_d += (a - b).abs() as f64;
                sum_w += b.abs() as f64;
            }
        }
        let mean_rel = (sum_d / sum_w) as f32;
        eprintln!("qwen3-bf16.pt2 seq {i}: max rel {max_rel:.3e}, mean rel {mean_rel:.3e}");
        assert!(
            max_rel <= BF16_MAX_REL && mean_rel <= BF16_MEAN_REL,
            "seq {i}: max rel {max_rel}, mean rel {mean_rel}"
        );
    }
    let reqs: Vec<_> = (0..2).map(|j| greedy(&r.i64(&format!("gen_prompt_{j}")).1, 24)).collect();
    let from_pt2 = generate("pt2/qwen3-bf16.pt2", "dtype = \"auto\"", &reqs);
    let from_hf = generate("qwen3", "dtype = \"bfloat16\"", &reqs);
    for (k, (p, h)) in from_pt2.into_iter().zip(from_hf).enumerate() {
        assert_eq!(p.unwrap().tokens, h.unwrap().tokens, "prompt {k}: bf16 export vs bf16 HF import");
    }
    // Asking a bf16 export for float32 is refused naming both dtypes.
    let req = autodeploy_core::backend::ImportRequest {
        path: fixture("pt2/qwen3-bf16.pt2"),
        dtype: Some(DType::F32),
        max_batch_size: 8,
        max_seq_len: 128,
        dummy_weights: false,
    };
    let e = autodeploy_core::registry::importer("torch-export").unwrap().import(&req).err().unwrap().to_string();
    assert!(e.contains("bf16") && e.contains("f32") && e.contains("--dtype"), "{e}");
}
