//! The `autodeploy` binary end to end: run, graph dump, plugin list, errors.

mod common;

use common::{root, smollm2};
use std::process::Command;

fn autodeploy(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_autodeploy")).args(args).current_dir(root()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn run_prints_completions_and_timing() {
    let (ok, out, err) = autodeploy(&["--config", "examples/llama-fixture.toml"]);
    assert!(ok, "{err}");
    assert!(out.contains("[0] output [") && out.contains("[1] output ["), "{out}");
    assert!(out.contains("build:") && out.contains("prefill") && out.contains("tok/s"), "{out}");
}

#[test]
fn graph_dump_at_import_reads_like_an_export() {
    for fam in ["llama", "mistral", "qwen2", "qwen3"] {
        let model = format!("tests/fixtures/{fam}");
        let (ok, out, err) = autodeploy(&["graph", "--model", &model, "--stage", "import"]);
        assert!(ok, "{fam}: {err}");
        assert!(out.starts_with("# import:"), "{out}");
        assert!(out.contains("graph(%input_ids: i64[batch, seq], %position_ids: i64[batch, seq])"), "{out}");
        for op in [
            "aten.embedding",
            "aten.linear",
            "aten.rsqrt",
            "aten.mean.dim",
            "aten.scaled_dot_product_attention",
            "aten.silu",
        ] {
            assert!(out.contains(op), "{fam}: no {op} in the dump");
        }
        assert!(out.contains("return %logits"), "{out}");
    }
    // qwen3's per-head q/k norms appear as their own rsqrt chains before the transpose.
    let (_, out, _) = autodeploy(&["graph", "--model", "tests/fixtures/qwen3"]);
    assert!(out.contains("%l0.q.norm.rsqrt"), "{out}");
}

/// `autodeploy graph --stage post_load_fusion` on a torch.export archive shows the same
/// canonical ops, dtypes and shapes, in the same order, as on the Hugging Face folder it was
/// exported from (issue 7); only value and weight names differ.
#[test]
fn an_exported_archive_reaches_the_hf_imports_canonical_graph() {
    let ops = |model: &str| -> Vec<String> {
        let (ok, out, err) = autodeploy(&["graph", "--model", model, "--stage", "post_load_fusion", "--device", "cpu"]);
        assert!(ok, "{model}: {err}");
        out.lines()
            .filter_map(|l| {
                let (_, rest) = l.trim_start().strip_prefix('%')?.split_once(": ")?;
                let (meta, op) = rest.split_once(" = ")?;
                let op = op.split('(').next()?;
                (op != "weight").then(|| format!("{meta} = {op}"))
            })
            .collect()
    };
    for (hf, pt2) in [
        ("tests/fixtures/llama", "tests/fixtures/pt2/llama.pt2"),
        ("tests/fixtures/qwen3", "tests/fixtures/pt2/qwen3.pt2"),
        ("tests/fixtures/llama", "tests/fixtures/pt2/llama-legacy.pt2"),
    ] {
        let (a, b) = (ops(hf), ops(pt2));
        for canonical in ["torch_rmsnorm", "torch_rope_with_explicit_cos_sin", "torch_attention", "torch_swiglu_mlp"] {
            assert!(a.iter().any(|o| o.ends_with(canonical)), "{hf}: no {canonical} in {a:?}");
        }
        assert_eq!(a, b, "{pt2} against {hf}");
    }
}

#[test]
fn bad_stage_and_bad_config_fail_with_a_message() {
    let (ok, _, err) = autodeploy(&["graph", "--model", "tests/fixtures/llama", "--stage", "lunch"]);
    assert!(!ok && err.contains("unknown stage `lunch`") && err.contains("post_load_fusion"), "{err}");
    let (ok, _, err) = autodeploy(&["--model", "tests/fixtures/llama", "--dtype", "int3"]);
    assert!(!ok && err.contains("dtype") && err.contains("int3"), "{err}");
    let (ok, _, err) = autodeploy(&["--model", "tests/fixtures/nope"]);
    assert!(!ok && err.contains("tests/fixtures/nope"), "{err}");
    let (ok, _, err) = autodeploy(&["--config", "examples/does-not-exist.toml"]);
    assert!(!ok && err.contains("does-not-exist.toml"), "{err}");
}

#[test]
fn plugins_lists_the_builtins() {
    let (ok, out, _) = autodeploy(&["plugins"]);
    assert!(ok);
    assert!(
        out.contains("model-importer")
            && out.contains("hf")
            && out.contains("compile-backend")
            && out.contains("simple"),
        "{out}"
    );
}

#[test]
fn plugin_registry_entries_are_checked_at_start_up() {
    let dir = std::env::temp_dir().join(format!("adreg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("pipeline.toml");
    std::fs::write(&cfg, format!("model = {:?}\n", root().join("tests/fixtures/llama").display().to_string())).unwrap();
    std::fs::write(dir.join("plugin-registry.toml"), "[[library]]\npath = \"libmissing.so\"\n").unwrap();
    // A missing library is refused with a warning naming it; the host runs on, since this
    // config needs nothing from it (cli/tests/plugins.rs covers configs that do).
    let reg = dir.join("plugin-registry.toml");
    let (ok, _, err) = autodeploy(&["graph", "--config", cfg.to_str().unwrap(), "--plugins", reg.to_str().unwrap()]);
    assert!(ok && err.contains("libmissing.so") && err.contains("does not exist"), "{err}");
    std::fs::write(&reg, "[[librry]]\n").unwrap();
    let (ok, _, err) = autodeploy(&["graph", "--config", cfg.to_str().unwrap(), "--plugins", reg.to_str().unwrap()]);
    assert!(!ok && err.contains("librry"), "{err}");
    // Without a chosen registry, the built-ins are listed.
    let (ok, _, err) = autodeploy(&["plugins"]);
    assert!(ok, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quick_start_config_answers_in_text() {
    if smollm2().is_none() {
        return;
    }
    let (ok, out, err) = autodeploy(&["--config", "examples/smollm2-cpu.toml", "--max-new-tokens", "12"]);
    assert!(ok, "{err}");
    assert!(out.contains("engine: paged KV cache (30 layers"), "{out}");
    // The first prompt asks for the capital of France; greedy SmolLM2 answers with Paris.
    assert!(out.contains("[0] output") && out.contains("Paris"), "{out}");
    assert!(out.contains("[2] prompt: \"The three primary colors are\""), "{out}");
    assert!(!out.contains("<|im_end|>"), "the end-of-turn token is not part of the text: {out}");
}

#[test]
fn chat_streams_answers_and_keeps_the_conversation() {
    use std::io::Write;
    if smollm2().is_none() {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
        .args(["chat", "--config", "examples/smollm2-cpu.toml", "--max-new-tokens", "16"])
        .current_dir(root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France? Answer in one sentence.\n/reset\nSay hello.\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Paris"), "{stdout}");
    assert_eq!(stderr.matches("tok/s decode").count(), 2, "two answers: {stderr}");
    assert!(!stdout.contains("<|im_end|>"), "the end-of-turn token is not printed: {stdout}");
}

#[test]
fn text_prompts_need_a_tokenizer_and_fail_alone() {
    let dir = std::env::temp_dir().join(format!("adtext-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("p.toml");
    let model = root().join("tests/fixtures/qwen2").display().to_string();
    std::fs::write(&cfg, format!("model = {model:?}\nmax_new_tokens = 3\n[[prompts]]\ntext = \"hello\"\n[[prompts]]\ntoken_ids = [1, 2, 3]\n")).unwrap();
    let (ok, out, err) = autodeploy(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok, "one prompt failed, so the run reports failure");
    assert!(out.contains("[0] error: input `prompts[0].text`") && out.contains("no tokenizer"), "{out}");
    assert!(out.contains("[1] output ["), "the good prompt still ran: {out}");
    assert!(err.contains("1 of 2 prompts failed"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_prints_one_json_object_with_the_floor() {
    let (ok, out, err) = autodeploy(&["bench", "--config", "examples/llama-fixture.toml", "--isl", "8", "--osl", "4"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["config"]["mode"], "latency");
    assert_eq!(
        (v["config"]["batch"].as_u64(), v["config"]["isl"].as_u64(), v["config"]["osl"].as_u64()),
        (Some(1), Some(8), Some(4))
    );
    for key in [
        "build_ms",
        "prefill_ms",
        "decode_ms_per_step",
        "output_tok_per_s",
        "achieved_weight_gb_per_s",
        "floor_gb_per_s",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {out}");
    }
    assert!(v["weight_bytes"].as_u64().is_some_and(|b| b > 100_000), "{out}");
    // Three timed runs by default: the median's decode step is the one reported.
    let mut runs: Vec<f64> =
        v["decode_ms_per_step_runs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(runs.len(), 3, "{out}");
    runs.sort_by(f64::total_cmp);
    assert_eq!(v["decode_ms_per_step"].as_f64(), Some(runs[1]), "{out}");
    assert!(v["decode_spread"].as_f64().is_some_and(|s| s >= 0.0), "{out}");
    // Reading faster than the floor is flagged, not reported silently.
    if v["fraction_of_floor"].as_f64().unwrap() > 1.0 {
        assert!(v["warning"].as_str().is_some_and(|w| w.contains("above 1")), "{out}");
    }
    let (ok, _, err) = autodeploy(&["bench", "--config", "examples/llama-fixture.toml", "--repeats", "0"]);
    assert!(!ok && err.contains("--repeats 0"), "{err}");
    assert!(v["device"].as_str().is_some_and(|d| d.starts_with("cpu")), "{out}");
    assert!(v["config"]["env"].as_object().is_some(), "{out}");
    // What each transform did, by name: the matchers' counts, the fusions on or "disabled".
    let t = &v["config"]["transforms"];
    assert!(t["match_rmsnorm"].as_str().is_some_and(|s| s.starts_with("matched ")), "{out}");
    assert!(t["insert_cached_attention"].as_str().is_some_and(|s| s.contains("cached attention")), "{out}");
    assert_eq!(t["fuse_moe_router"], "disabled", "{out}");
    // The process's AUTODEPLOY_* settings are part of the configuration printed.
    let out = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
        .args(["bench", "--config", "examples/llama-fixture.toml", "--isl", "4", "--osl", "2"])
        .env("AUTODEPLOY_GEMV_SPLIT", "4")
        .current_dir(root())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config"]["env"]["AUTODEPLOY_GEMV_SPLIT"], "4", "{v}");
    // Throughput mode batches max_batch_size requests by default (the fixture config leaves it at 8).
    let (ok, out, err) = autodeploy(&[
        "bench",
        "--config",
        "examples/llama-fixture.toml",
        "--mode",
        "throughput",
        "--isl",
        "4",
        "--osl",
        "2",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["config"]["batch"].as_u64(), Some(8));
    let (ok, _, err) = autodeploy(&["bench", "--config", "examples/llama-fixture.toml", "--mode", "fast"]);
    assert!(!ok && err.contains("latency, throughput or offline"), "{err}");
    // Offline: 20 requests (more than max_batch_size = 8) queued at once through each runtime;
    // every one generates its osl tokens.
    for runtime in ["demollm", "trtllm"] {
        let (ok, out, err) = autodeploy(&[
            "bench",
            "--config",
            "examples/llama-fixture.toml",
            "--mode",
            "offline",
            "--num-requests",
            "20",
            "--isl",
            "6",
            "--osl",
            "3",
            "--runtime",
            runtime,
        ]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["config"]["runtime"], runtime, "{out}");
        assert_eq!(v["output_tokens"].as_u64(), Some(60), "{out}");
        assert!(v["output_tok_per_s"].as_f64().is_some_and(|x| x > 0.0), "{out}");
        assert!(v["steps"].as_u64().is_some_and(|s| s >= 3), "{out}");
    }
}

/// The compile backend, device and attention backend are config keys with flags: on the CPU
/// every backend name runs the interpreter and gives the same tokens; a GPU-only attention
/// backend on the CPU, an unknown backend and CUDA where there is none are refused, saying why.
#[test]
fn backend_and_device_flags_override_the_config() {
    let cfg = ["--config", "examples/llama-fixture.toml"];
    let outputs = |out: &str| out.lines().filter(|l| l.contains("] output [")).map(str::to_string).collect::<Vec<_>>();
    let (ok, base, err) = autodeploy(&[&cfg[..], &["--device", "cpu"]].concat());
    assert!(ok, "{err}");
    assert_eq!(outputs(&base).len(), 2, "{base}");
    for b in ["cudagraph", "compile", "opt", "torch-opt"] {
        let (ok, out, err) = autodeploy(&[&cfg[..], &["--device", "cpu", "--compile-backend", b]].concat());
        assert!(ok, "{b}: {err}");
        assert_eq!(outputs(&out), outputs(&base), "{b}");
    }
    let (ok, _, err) = autodeploy(&[&cfg[..], &["--device", "cpu", "--compile-backend", "fast"]].concat());
    assert!(!ok && err.contains("unknown compile_backend `fast`") && err.contains("opt"), "{err}");
    for attn in ["flashinfer", "triton"] {
        let (ok, _, err) = autodeploy(&[&cfg[..], &["--device", "cpu", "--attn-backend", attn]].concat());
        assert!(!ok && err.contains("CUDA") && err.contains("attn_backend = \"torch\""), "{attn}: {err}");
    }
    if autodeploy_kernels::cuda::probe(0).is_err() {
        let (ok, _, err) = autodeploy(&[&cfg[..], &["--device", "cuda"]].concat());
        assert!(!ok && err.contains("--device cuda") && err.contains("device = \"cpu\""), "{err}");
    }
}

/// SmolLM2 ends its chat answer with its end-of-turn token (EOS), which stops the completion;
/// `ignore_eos = true` keeps it generating to `max_new_tokens`.
#[test]
fn ignore_eos_generates_past_the_end_of_turn() {
    let Some(model) = smollm2() else { return };
    let dir = std::env::temp_dir().join(format!("adeos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |ignore: bool| {
        let cfg = dir.join(format!("eos-{ignore}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "model = {:?}\ndtype = \"auto\"\nmax_seq_len = 256\nmax_new_tokens = 40\nignore_eos = {ignore}\n\
                 [[prompts]]\nmessages = [{{ role = \"user\", content = \"What is the capital of France? Answer in one sentence.\" }}]\n",
                model.display().to_string()
            ),
        )
        .unwrap();
        let (ok, out, err) = autodeploy(&["--config", cfg.to_str().unwrap()]);
        assert!(ok, "{err}");
        out.lines().find(|l| l.starts_with("[0] output")).map(str::to_string).unwrap_or_else(|| panic!("{out}"))
    };
    let stopped = run(false);
    assert!(stopped.contains("Stop") && !stopped.contains("(40 tokens"), "{stopped}");
    assert!(stopped.contains("Paris"), "{stopped}");
    let kept_going = run(true);
    assert!(kept_going.contains("(40 tokens, Length)"), "{kept_going}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--model <hub id>` downloads the repository (here from a local stand-in for the Hub, through
/// `HF_ENDPOINT`) into `HF_HOME` and runs it in place of the file's model: the llama fixture
/// served as `tiny-org/tiny-llama` generates what the local folder does.
#[test]
fn model_flag_takes_a_hub_id() {
    use autodeploy_tests::hub_server::{serve, REPO};
    let (endpoint, hits) = serve(root().join("tests/fixtures/llama"));
    let home = std::env::temp_dir().join(format!("adhub-{}", std::process::id()));
    let run = |model: Option<&str>| {
        let mut args = vec!["--config", "examples/llama-fixture.toml", "--device", "cpu"];
        if let Some(m) = model {
            args.extend(["--model", m]);
        }
        let out = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
            .args(&args)
            .current_dir(root())
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HOME", &home)
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{stderr}");
        stdout.to_string()
    };
    let outputs = |s: &str| s.lines().filter(|l| l.contains("] output")).map(str::to_string).collect::<Vec<_>>();
    let local = run(None);
    let hub = run(Some(REPO));
    assert!(hub.contains(&format!("model: {REPO}")), "{hub}");
    assert!(hits.load(std::sync::atomic::Ordering::SeqCst) >= 6, "the files came from the stand-in hub");
    assert!(home.join("hub").is_dir(), "downloaded under HF_HOME/hub");
    assert_eq!(outputs(&hub).len(), 2, "{hub}");
    assert_eq!(outputs(&hub), outputs(&local));
    let _ = std::fs::remove_dir_all(&home);
}

/// A Hub endpoint that accepts the connection and never answers (once silent for ten minutes)
/// fails the fetch after `AUTODEPLOY_HUB_TIMEOUT_S` without data, naming the file and the knob.
#[test]
fn a_hub_that_never_answers_times_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    // Accept and hold every connection, saying nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let home = std::env::temp_dir().join(format!("adhub-silent-{}", std::process::id()));
    let t0 = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
        .args(["graph", "--model", "silent-org/silent-model"])
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HOME", &home)
        .env("AUTODEPLOY_HUB_TIMEOUT_S", "2")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("config.json") && err.contains("no data for") && err.contains("AUTODEPLOY_HUB_TIMEOUT_S"),
        "{err}"
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(30), "{:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&home);
}

/// `--model X` is relative to the working directory even when the config's folder has an `X`
/// too (it once loaded the config folder's, silently); a bad `--device` or `--dtype` is blamed
/// on the flag, not on the config file's key.
#[test]
fn command_line_paths_and_values_are_the_command_lines() {
    let tmp = std::env::temp_dir().join(format!("adcwd-{}", std::process::id()));
    let (cwd, cfgdir) = (tmp.join("work"), tmp.join("configs"));
    for (dir, fix) in [(&cwd, "llama"), (&cfgdir, "qwen3")] {
        let m = dir.join("m");
        std::fs::create_dir_all(&m).unwrap();
        for e in std::fs::read_dir(root().join("tests/fixtures").join(fix)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
        }
    }
    let cfg = cfgdir.join("cfg.toml");
    std::fs::write(&cfg, "model = \"m\"\nmax_new_tokens = 2\n[[prompts]]\ntoken_ids = [1, 17, 42]\n").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .current_dir(&cwd)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // The config alone: its own folder's model.
    let (ok, out, err) = run(&[]);
    assert!(ok && out.contains(&format!("model: {}", "m")), "{out}{err}");
    // --model m: the working directory's.
    let (ok, out, err) = run(&["--model", "m"]);
    assert!(ok && out.contains(&cwd.join("m").display().to_string()), "{out}{err}");
    let (ok, _, err) = run(&["--device", "gpu0"]);
    assert!(!ok && err.contains("--device gpu0") && !err.contains("cfg.toml"), "{err}");
    let (ok, _, err) = run(&["--dtype", "int3"]);
    assert!(!ok && err.contains("--dtype int3") && !err.contains("cfg.toml"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A model without a tokenizer still stops at the end-of-sequence id its folder names
/// (`generation_config.json`, else `config.json`; one id or a list, as transformers reads them):
/// here 34, the second token the fixture generates for its first prompt.
#[test]
fn eos_from_the_model_folder_stops_generation_without_a_tokenizer() {
    let tmp = std::env::temp_dir().join(format!("adeos-folder-{}", std::process::id()));
    let m = tmp.join("m");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(root().join("tests/fixtures/llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    let cfg = tmp.join("cfg.toml");
    std::fs::write(
        &cfg,
        "model = \"m\"\ndtype = \"float32\"\nmax_new_tokens = 8\n[[prompts]]\ntoken_ids = [1, 17, 42, 99, 5]\n",
    )
    .unwrap();
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().find(|l| l.contains("[0] output")).unwrap().to_string()
    };
    let free = run();
    assert!(free.contains("[16, 34, 16, 170,") && free.contains("(Length)"), "{free}");
    std::fs::write(m.join("generation_config.json"), "{\"eos_token_id\": [7, 34]}").unwrap();
    let stopped = run();
    assert!(stopped.contains("[16, 34]") && stopped.contains("(Stop"), "{stopped}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The one-line form: `run --model M -p TEXT` with no config file, sampling flags, `--chat`,
/// and `--json` (one object per prompt, nothing else on stdout); the JSON text is the plain
/// run's; a bad flag value names the flag.
#[test]
fn run_takes_prompts_and_prints_json_lines() {
    let Some(model) = smollm2() else { return };
    let m = model.to_str().unwrap();
    let base = ["run", "--model", m, "-p", "What is the capital of France?", "-p", "Name a colour.", "--chat"];
    let (ok, out, err) = autodeploy(&[&base[..], &["--max-new-tokens", "16", "--temperature", "0", "--json"]].concat());
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["index"], i);
        let ids = v["token_ids"].as_array().unwrap();
        assert!(!ids.is_empty() && ids.len() == v["completion_tokens"].as_u64().unwrap() as usize, "{v}");
        assert!(["length", "stop"].contains(&v["finish_reason"].as_str().unwrap()), "{v}");
        let (first, total) = (v["time_to_first_token_ms"].as_f64().unwrap(), v["total_ms"].as_f64().unwrap());
        assert!(0.0 < first && first <= total, "{v}");
    }
    assert!(lines[0]["text"].as_str().unwrap().contains("Paris"), "{}", lines[0]);
    // The plain form prints the same completion.
    let (ok, plain, err) = autodeploy(&[&base[..], &["--max-new-tokens", "16", "--temperature", "0"]].concat());
    assert!(ok, "{err}");
    assert!(plain.contains(&format!("{:?}", lines[0]["text"].as_str().unwrap())), "{plain}");
    // Seeded sampling repeats itself.
    let sampled = || {
        let out = autodeploy(&[
            "run",
            "--model",
            m,
            "-p",
            "Once upon a time",
            "--temperature",
            "0.9",
            "--seed",
            "7",
            "--json",
        ])
        .1;
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["token_ids"].clone()
    };
    assert_eq!(sampled(), sampled());
    let (ok, _, err) = autodeploy(&["run", "--model", m, "-p", "x", "--top-p", "1.5"]);
    assert!(!ok && err.contains("--top-p 1.5") && err.contains("(0, 1]"), "{err}");
}

/// A conversation that outgrows max_seq_len drops its oldest turns and says so; a message too
/// long to fit alone is refused with the limit, and the chat goes on.
#[test]
fn chat_drops_the_oldest_turns_when_the_conversation_outgrows_max_seq_len() {
    use std::io::Write;
    let Some(model) = smollm2() else { return };
    let dir = std::env::temp_dir().join(format!("adchat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("chat.toml");
    std::fs::write(&cfg, format!("model = {:?}\nmax_seq_len = 128\nmax_new_tokens = 8\n", model.display().to_string()))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
        .args(["chat", "--config", cfg.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input: String = (1..=6).map(|i| format!("Tell me one fact about the number {i}.\n")).collect();
    input += &format!("{}\n/exit\n", "word ".repeat(300));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("outgrew max_seq_len = 128") && stderr.contains("dropped its oldest"), "{stderr}");
    assert!(stderr.contains("this message alone needs 128 tokens or more"), "{stderr}");
    assert_eq!(stderr.matches("tok/s decode").count(), 6, "six answers: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
