//! The `autodeploy` binary end to end: run, graph dump, plugin list, errors.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

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
    let (ok, _, err) = autodeploy(&["graph", "--config", cfg.to_str().unwrap()]);
    assert!(
        !ok && err.contains("plugin-registry.toml") && err.contains("library[0].path") && err.contains("libmissing.so"),
        "{err}"
    );
    std::fs::write(dir.join("plugin-registry.toml"), "[[librry]]\n").unwrap();
    let (ok, _, err) = autodeploy(&["graph", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("librry"), "{err}");
    // The repository's own registry lists nothing and is accepted.
    let (ok, _, err) = autodeploy(&["plugins"]);
    assert!(ok, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
