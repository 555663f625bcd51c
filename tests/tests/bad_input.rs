//! Every kind of bad model input gives one clear error naming the file and the key or tensor.

mod common;

use std::path::Path;

use autodeploy_core::backend::ImportRequest;
use autodeploy_core::registry;
use autodeploy_core::DType;
use common::edit::{copy_fixture, edit_config, edit_weights};
use common::*;
use safetensors::tensor::Dtype;
use serde_json::Value;

fn import_err(dir: &Path) -> String {
    let req = ImportRequest {
        path: dir.to_path_buf(),
        dtype: Some(DType::F32),
        max_batch_size: 4,
        max_seq_len: 64,
        dummy_weights: false,
    };
    match registry::importer("hf").unwrap().import(&req) {
        Ok(_) => panic!("import of {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn expect(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error should mention `{p}`: {err}");
    }
}

#[test]
fn missing_config_key_names_file_and_key() {
    let (_t, dir) = copy_fixture("qwen3");
    edit_config(&dir, |m| {
        m.remove("hidden_size");
    });
    expect(&import_err(&dir), &["config.json", "hidden_size", "missing"]);
}

#[test]
fn malformed_config_values_name_the_key() {
    let cases: &[(&str, Value, &str)] = &[
        ("num_attention_heads", Value::from("four"), "positive integer"),
        ("rms_norm_eps", Value::from("small"), "number"),
        ("tie_word_embeddings", Value::from(3), "true or false"),
        ("num_key_value_heads", Value::from(3), "does not divide"),
        ("hidden_act", Value::from("gelu"), "supported: silu"),
    ];
    for (key, val, why) in cases {
        let (_t, dir) = copy_fixture("qwen3");
        edit_config(&dir, |m| {
            m.insert(key.to_string(), val.clone());
        });
        expect(&import_err(&dir), &["config.json", key, why]);
    }
    // Nested: an unknown RoPE type names the nested key.
    let (_t, dir) = copy_fixture("llama");
    edit_config(&dir, |m| {
        m["rope_parameters"]["rope_type"] = Value::from("yarn-ish");
    });
    expect(&import_err(&dir), &["config.json", "rope_parameters.rope_type", "yarn-ish"]);
    // Partial rotary and LongRoPE: a rotary dimension that is not even, factors that do not
    // cover it, and a mixture of experts choosing more experts than it has.
    let (_t, dir) = copy_fixture("phi3-longrope");
    edit_config(&dir, |m| {
        m["rope_parameters"]["partial_rotary_factor"] = Value::from(0.6);
    });
    expect(&import_err(&dir), &["config.json", "rope_parameters.partial_rotary_factor", "even rotary dimension"]);
    let (_t, dir) = copy_fixture("phi3-longrope");
    edit_config(&dir, |m| {
        m["rope_parameters"]["short_factor"] = Value::from(vec![1.0; 5]);
    });
    expect(&import_err(&dir), &["config.json", "rope_parameters.short_factor", "5 factors", "needs 12"]);
    let (_t, dir) = copy_fixture("mixtral");
    edit_config(&dir, |m| {
        m.insert("num_experts_per_tok".into(), Value::from(5));
    });
    expect(&import_err(&dir), &["config.json", "num_experts_per_tok", "more than the 4 experts"]);
    // DeciLM blocks: what the decoder does not build is refused naming the block's key.
    let cases: &[(&str, Value, &[&str])] = &[
        (
            "/block_configs/1/attention/replace_with_linear",
            Value::from(true),
            &["block_configs[1].attention.replace_with_linear", "linear replacement"],
        ),
        (
            "/block_configs/0/attention/n_heads_in_group",
            Value::from(3),
            &["block_configs[0].attention.n_heads_in_group", "divisor"],
        ),
        ("/block_configs/3/ffn/ffn_mult", Value::from("big"), &["block_configs[3].ffn.ffn_mult", "multiplier"]),
        (
            "/block_configs/2/attention/window_length",
            Value::from(8),
            &["block_configs[2].attention.window_length", "not supported"],
        ),
    ];
    for (pointer, val, parts) in cases {
        let (_t, dir) = copy_fixture("nemotron-nas");
        edit_config(&dir, |m| {
            let mut whole = Value::Object(std::mem::take(m));
            *whole.pointer_mut(pointer).unwrap() = val.clone();
            *m = whole.as_object().unwrap().clone();
        });
        let mut want = vec!["config.json"];
        want.extend_from_slice(parts);
        expect(&import_err(&dir), &want);
    }
    // OpenELM: per-layer lists of the wrong length, KV heads not dividing, an MLP variant the
    // blocks do not build; errors name the file's own keys.
    let cases: &[(&str, Value, &[&str])] = &[
        ("num_query_heads", Value::from(vec![4, 2]), &["num_query_heads", "2 entries for 3 layers"]),
        ("num_kv_heads", Value::from(vec![2, 1, 3]), &["num_kv_heads", "layer 2", "do not divide 4"]),
        ("ffn_with_glu", Value::from(false), &["ffn_with_glu", "only true"]),
        ("model_dim", Value::from("wide"), &["model_dim", "positive integer"]),
    ];
    for (key, val, parts) in cases {
        let (_t, dir) = copy_fixture("openelm");
        edit_config(&dir, |m| {
            m.insert(key.to_string(), val.clone());
        });
        let mut want = vec!["config.json"];
        want.extend_from_slice(parts);
        expect(&import_err(&dir), &want);
    }
    // An MLP width past intermediate_size's limit, from a multiplier of a wide model.
    let (_t, dir) = copy_fixture("openelm");
    edit_config(&dir, |m| {
        m.insert("model_dim".into(), Value::from(4096));
        m.insert("ffn_multipliers".into(), Value::from(vec![1.0, 4000.0, 1.0]));
    });
    expect(&import_err(&dir), &["config.json", "ffn_multipliers", "layer 1", "past the limit 1048576"]);
    let (_t, dir) = copy_fixture("nemotron-nas");
    edit_config(&dir, |m| {
        m["block_configs"].as_array_mut().unwrap().pop();
    });
    expect(&import_err(&dir), &["config.json", "block_configs", "3 blocks for num_hidden_layers = 4"]);
}

#[test]
fn config_that_is_not_json_names_the_file() {
    let (_t, dir) = copy_fixture("qwen2");
    std::fs::write(dir.join("config.json"), "{ \"model_type\": \"qwen2\", ").unwrap();
    expect(&import_err(&dir), &["config.json", "invalid JSON"]);
}

#[test]
fn unknown_model_type_lists_the_supported_ones() {
    let (_t, dir) = copy_fixture("qwen2");
    edit_config(&dir, |m| {
        m.insert("model_type".into(), Value::from("gpt2"));
    });
    expect(&import_err(&dir), &["config.json", "gpt2", "llama, mistral, qwen2, qwen3"]);
}

#[test]
fn missing_tensor_is_named() {
    let (_t, dir) = copy_fixture("qwen3");
    edit_weights(&dir.join("model.safetensors"), |t| {
        t.remove("model.layers.1.self_attn.k_norm.weight");
    });
    expect(&import_err(&dir), &["model.layers.1.self_attn.k_norm.weight", "not found"]);
}

#[test]
fn wrong_shape_names_file_tensor_and_shapes() {
    let (_t, dir) = copy_fixture("mistral");
    edit_weights(&dir.join("model.safetensors"), |t| {
        let e = t.get_mut("model.layers.0.mlp.up_proj.weight").unwrap();
        e.1 = vec![e.1[1], e.1[0]]; // [96, 64] -> [64, 96]: same bytes, transposed shape
    });
    expect(&import_err(&dir), &["model.safetensors", "model.layers.0.mlp.up_proj.weight", "[64, 96]", "[96, 64]"]);
}

#[test]
fn wrong_dtype_names_file_and_tensor() {
    let (_t, dir) = copy_fixture("mistral");
    edit_weights(&dir.join("model.safetensors"), |t| {
        t.get_mut("model.norm.weight").unwrap().0 = Dtype::I32;
    });
    expect(&import_err(&dir), &["model.safetensors", "model.norm.weight", "I32"]);
}

#[test]
fn truncated_and_corrupt_safetensors_name_the_file() {
    let (_t, dir) = copy_fixture("qwen2");
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    expect(&import_err(&dir), &["model.safetensors", "truncated or corrupt"]);
    std::fs::write(&f, &bytes[..4]).unwrap();
    expect(&import_err(&dir), &["model.safetensors", "truncated or corrupt"]);
    let mut garbage = bytes.clone();
    garbage[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&f, &garbage).unwrap();
    expect(&import_err(&dir), &["model.safetensors", "truncated or corrupt"]);
    let mut huge = bytes;
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&f, &huge).unwrap();
    expect(&import_err(&dir), &["model.safetensors", "truncated or corrupt"]);
}

#[test]
fn sharded_index_problems_are_named() {
    // The index places a tensor in a shard that does not hold it.
    let (_t, dir) = copy_fixture("llama");
    let idx = dir.join("model.safetensors.index.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
    v["weight_map"]["model.norm.weight"] = Value::from("model-00001-of-00004.safetensors");
    std::fs::write(&idx, v.to_string()).unwrap();
    expect(&import_err(&dir), &["model.norm.weight", "model-00001-of-00004.safetensors", "index"]);
    // A shard is missing.
    let (_t2, dir) = copy_fixture("llama");
    std::fs::remove_file(dir.join("model-00003-of-00004.safetensors")).unwrap();
    expect(&import_err(&dir), &["model-00003-of-00004.safetensors"]);
    // No weights at all.
    let (_t3, dir) = copy_fixture("qwen2");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    expect(&import_err(&dir), &["no model.safetensors or model.safetensors.index.json"]);
}

#[test]
fn bad_runtime_inputs_are_named() {
    let g = import("qwen2", DType::F32);
    let mut m = compile(&g);
    let ids = autodeploy_core::Tensor::from_i64(vec![1, 3], vec![1, 2, 3]).unwrap();
    let pos = autodeploy_core::Tensor::from_i64(vec![1, 4], vec![0, 1, 2, 3]).unwrap();
    expect(&m.forward(&[ids.clone(), pos], None).unwrap_err().to_string(), &["position_ids", "`seq` is 4"]);
    let fpos = autodeploy_core::Tensor::from_f32(vec![1, 3], vec![0.0, 1.0, 2.0]).unwrap();
    expect(
        &m.forward(&[ids.clone(), fpos], None).unwrap_err().to_string(),
        &["position_ids", "expected i64[batch, seq]"],
    );
    let big = autodeploy_core::Tensor::from_i64(vec![1, 3], vec![1, 9999, 3]).unwrap();
    let pos = autodeploy_core::Tensor::from_i64(vec![1, 3], vec![0, 1, 2]).unwrap();
    expect(&m.forward(&[big, pos], None).unwrap_err().to_string(), &["aten.embedding", "9999", "out of range"]);
}

#[test]
fn bad_transform_settings_name_the_key() {
    autodeploy_plugins::link();
    // Experts: listing three tensors for each would allocate before any file is read.
    let (_t, dir) = copy_fixture("mixtral");
    edit_config(&dir, |m| {
        m.insert("num_hidden_layers".into(), Value::from(1000));
        m.insert("num_local_experts".into(), Value::from(4000));
    });
    expect(&import_err(&dir), &["config.json", "num_local_experts", "4000000, past the limit"]);
    let check = |extra: &str, parts: &[&str]| {
        let text = format!("model = \"m\"\n{extra}");
        let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&text, None).unwrap();
        let e = cfg.validate(Path::new("pipeline.toml")).unwrap_err().to_string();
        expect(&e, parts);
    };
    check("[transforms.fuse_gemms]\nfoo = 1\n", &["pipeline.toml", "transforms.fuse_gemms.foo", "has no option"]);
    check("[transforms.fuse_gemms]\nenabled = \"yes\"\n", &["transforms.fuse_gemms.enabled", "true or false"]);
    check("[transforms.fuse_gemm]\nenabled = false\n", &["transforms.fuse_gemm", "unknown transform", "fuse_gemms"]);
    check("max_new_tokens = 0\n", &["max_new_tokens"]);
    check("top_p = 0.0\n", &["top_p", "(0, 1]"]);
    // The CUDA kernel settings and attention backends' options, by key.
    check("[kernels]\ngemv_split = 3\n", &["pipeline.toml", "kernels.gemv_split", "not one of [1, 2, 4]"]);
    check("[kernels]\nattn_positions_per_pass = 16\n", &["kernels.attn_positions_per_pass", "[4, 8]"]);
    check("[attention_backends.torch]\nsplits = 2\n", &["attention_backends.torch.splits", "it takes none"]);
    check("[attention_backends.nope]\nx = 1\n", &["attention_backends.nope", "nope"]);
    check("max_seq_len = 4\n[[prompts]]\ntoken_ids = [1, 2, 3, 4, 5]\n", &["prompts[0].token_ids", "max_seq_len = 4"]);
}

/// Sizes from a file or a config that would build or allocate without bound are refused first,
/// naming the key, within a second: a config.json with 10^12 layers (which once allocated 22 GB
/// building the graph), a 10^9-token vocabulary, a negative epsilon; a page of 10^9 tokens, 10^9
/// sequences, or a batch whose page count passes 2^32 (once truncated to 32 bits).
#[test]
fn sizes_past_their_limits_are_refused_before_allocation() {
    autodeploy_plugins::link();
    let t0 = std::time::Instant::now();
    for (key, val, why) in [
        ("num_hidden_layers", Value::from(1_000_000_000_000u64), "more than the limit"),
        ("vocab_size", Value::from(1_000_000_000u64), "more than the limit"),
        ("hidden_size", Value::from(1u64 << 40), "more than the limit"),
        ("intermediate_size", Value::from(1u64 << 40), "more than the limit"),
        ("rms_norm_eps", Value::from(-1.0), "outside (0, 1)"),
    ] {
        let (_t, dir) = copy_fixture("qwen3");
        edit_config(&dir, |m| {
            m.insert(key.to_string(), val.clone());
        });
        expect(&import_err(&dir), &["config.json", key, why]);
    }
    // Experts: listing three tensors for each would allocate before any file is read.
    let (_t, dir) = copy_fixture("mixtral");
    edit_config(&dir, |m| {
        m.insert("num_hidden_layers".into(), Value::from(1000));
        m.insert("num_local_experts".into(), Value::from(4000));
    });
    expect(&import_err(&dir), &["config.json", "num_local_experts", "4000000, past the limit"]);
    let check = |extra: &str, parts: &[&str]| {
        let text = format!("model = \"m\"\n{extra}");
        let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&text, None).unwrap();
        expect(&cfg.validate(Path::new("pipeline.toml")).unwrap_err().to_string(), parts);
    };
    check("attn_page_size = 1000000000\n", &["pipeline.toml", "attn_page_size", "more than the limit 4096"]);
    check("max_batch_size = 1000000000\n", &["max_batch_size", "more than the limit"]);
    check("max_batch_size = 1152921504606846976\n", &["max_batch_size", "more than the limit"]);
    check("max_seq_len = 1000000000000\n", &["max_seq_len", "more than the limit"]);
    check("max_num_tokens = 0\n", &["max_num_tokens", "at least 1"]);
    // Within each limit, but 2^16 sequences of 2^24 tokens are 2^36 pages: refused, not truncated.
    let (_t, dir) = copy_fixture("llama");
    edit_config(&dir, |m| {
        m.insert("max_position_embeddings".into(), Value::from(1u64 << 24));
    });
    let text = format!("model = {:?}\nmax_batch_size = 65536\nmax_seq_len = 16777216\n", dir.display().to_string());
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&text, None).unwrap();
    let g = autodeploy_core::pipeline::graph_after(&cfg, autodeploy_sdk::Stage::CacheInit).unwrap();
    let e = autodeploy_core::pipeline::kv_pages(&g, &cfg).map(|_| ()).unwrap_err().to_string();
    expect(&e, &["max_batch_size", "2^32"]);
    assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{:?}", t0.elapsed());
}

/// Dummy weights are made from the config alone: a model within every per-key limit whose
/// weights no host could hold (131,072-wide, 256 layers: petabytes) is refused on the CPU
/// with the numbers before any weight is made; a stop token outside the vocabulary is refused
/// naming the field.
#[test]
fn an_engine_larger_than_memory_is_refused_with_the_numbers() {
    autodeploy_plugins::link();
    let (_t, dir) = copy_fixture("qwen3");
    edit_config(&dir, |m| {
        m.insert("hidden_size".into(), Value::from(131072));
        m.insert("intermediate_size".into(), Value::from(1048576));
        m.insert("num_hidden_layers".into(), Value::from(256));
        m.insert("num_attention_heads".into(), Value::from(512));
        m.insert("num_key_value_heads".into(), Value::from(512));
        m.insert("head_dim".into(), Value::from(128));
    });
    let text = format!("model = {:?}\nload_format = \"dummy\"\ndevice = \"cpu\"\n", dir.display().to_string());
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&text, None).unwrap();
    let t0 = std::time::Instant::now();
    let e = autodeploy_core::pipeline::build(&cfg).map(|_| ()).unwrap_err().to_string();
    expect(&e, &["needs", "GiB", "available", "weights"]);
    assert!(t0.elapsed() < std::time::Duration::from_secs(30), "{:?}", t0.elapsed());

    let text = format!("model = {:?}\ndevice = \"cpu\"\n", fixture("llama").display().to_string());
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&text, None).unwrap();
    let mut engine = autodeploy_core::pipeline::build(&cfg).unwrap();
    let req = autodeploy_core::runtime::Request {
        prompt: vec![1, 2, 3],
        sampling: autodeploy_core::sampling::SamplingParams {
            stop_token_ids: vec![1_000_000_000],
            ..Default::default()
        },
    };
    let (res, _) = registry::runtime(&cfg).unwrap().generate(&mut engine, &[req]);
    expect(&res[0].as_ref().unwrap_err().to_string(), &["stop_token_ids", "1000000000", "out of range"]);
}

/// Llama 4's own keys: a multimodal config without `text_config`, a `no_rope_layers` list of the
/// wrong length or values, a query temperature stepping at position 0, and MoE layer indices
/// past the model are refused naming the key.
#[test]
fn llama4_keys_are_checked() {
    let cases = [
        ("model_type", serde_json::json!("llama4"), vec!["`text_config`", "missing"]),
        ("no_rope_layers", serde_json::json!([1, 1, 0]), vec!["`no_rope_layers`", "3 entries"]),
        ("no_rope_layers", serde_json::json!([1, 2, 1, 0]), vec!["`no_rope_layers`", "0 or 1"]),
        ("floor_scale", serde_json::json!(0), vec!["`floor_scale`", "positive integer"]),
        ("attention_chunk_size", serde_json::json!(0), vec!["`attention_chunk_size`", "positive integer"]),
        ("attn_scale", serde_json::json!("big"), vec!["`attn_scale`", "expected a number"]),
        ("moe_layers", serde_json::json!([1, 4]), vec!["`moe_layers`", "layer 4"]),
    ];
    for (key, value, parts) in cases {
        let (_t, dir) = copy_fixture("llama4_text");
        edit_config(&dir, |m| drop(m.insert(key.into(), value.clone())));
        let err = import_err(&dir);
        eprintln!("{key} = {value}: {err}");
        expect(&err, &parts);
    }
}
