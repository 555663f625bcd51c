//! Ranks as processes: `mpirun -n 2` and `-n 4` of the binary on the llama fixture (tensor
//! parallel over 2 and 4 CPU ranks through Open MPI) print the completions `world_size = 1`
//! prints, and `autodeploy graph --rank` shows each rank's slice. Needs `mpirun` (CI installs
//! Open MPI; elsewhere the test says it was skipped, and fails under CI=true without it).

mod common;

use common::{completions, root, served_completions};
use std::process::Command;

fn mpirun() -> Option<&'static str> {
    let found = Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but no mpirun: .ci/run installs Open MPI");
    }
    found.then_some("mpirun")
}

#[test]
fn mpirun_ranks_print_what_one_rank_prints() {
    let Some(mpirun) = mpirun() else {
        eprintln!("skipped: no mpirun (install Open MPI: Debian's openmpi-bin)");
        return;
    };
    let bin = env!("CARGO_BIN_EXE_autodeploy");
    let one = Command::new(bin).args(["--config", "examples/llama-fixture.toml"]).current_dir(root()).output().unwrap();
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    let want = completions(&one.stdout);
    assert_eq!(want.len(), 2, "{want:?}");
    for n in ["2", "4"] {
        let out = Command::new(mpirun)
            .args(["--allow-run-as-root", "--oversubscribe", "-n", n, bin, "--config", "examples/llama-fixture.toml"])
            .args(["--world-size", n])
            .env("OMPI_MCA_btl", "self,vader,tcp")
            .current_dir(root())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "mpirun -n {n}: {err}");
        // Only rank 0 prints.
        assert_eq!(completions(&out.stdout), want, "mpirun -n {n}: {err}");
    }
}

/// A config in `dir` running fixture `model` on the two prompts these tests send, with `extra`.
fn two_prompts(dir: &std::path::Path, file: &str, model: &str, extra: &str) -> String {
    let cfg = dir.join(file);
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndtype = \"float32\"\nmax_new_tokens = 8\n{extra}\
             [[prompts]]\ntoken_ids = [1, 17, 42, 99, 5]\n[[prompts]]\ntoken_ids = [1, 200, 3]\n",
            root().join("tests/fixtures").join(model).display().to_string()
        ),
    )
    .unwrap();
    cfg.to_str().unwrap().to_string()
}

/// What one rank prints for `cfg`: its two completions.
fn one_rank(bin: &str, cfg: &str) -> Vec<String> {
    let one = Command::new(bin).args(["--config", cfg]).output().unwrap();
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    let want = completions(&one.stdout);
    assert_eq!(want.len(), 2, "{want:?}");
    want
}

/// `mpirun -n 2` of `cfg` over 2 ranks: what rank 0 prints and the ranks' log, once it succeeded.
fn two_ranks(mpirun: &str, bin: &str, cfg: &str, what: &str) -> (Vec<String>, String) {
    let out = Command::new(mpirun)
        .args(["--allow-run-as-root", "--oversubscribe", "-n", "2", bin, "--config", cfg, "--world-size", "2"])
        .env("OMPI_MCA_btl", "self,vader,tcp")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what}: {err}");
    (completions(&out.stdout), err)
}

/// A mixture-of-experts fixture with its experts spread over the ranks (`ep_size = 2`) and
/// with each expert split (`ep_size = 1`): `mpirun -n 2` prints what one rank prints.
#[test]
fn mpirun_expert_parallel_ranks_print_what_one_rank_prints() {
    let Some(mpirun) = mpirun() else {
        eprintln!("skipped: no mpirun (install Open MPI: Debian's openmpi-bin)");
        return;
    };
    let bin = env!("CARGO_BIN_EXE_autodeploy");
    let dir = std::env::temp_dir().join(format!("autodeploy-mpi-moe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut want = None;
    for ep in [1, 2] {
        let cfg = two_prompts(&dir, &format!("ep{ep}.toml"), "qwen3_moe", &format!("ep_size = {ep}\n"));
        let want = want.get_or_insert_with(|| one_rank(bin, &cfg));
        let (got, err) = two_ranks(mpirun, bin, &cfg, &format!("ep_size = {ep}"));
        assert!(err.contains(if ep == 1 { "MoE (each expert split)" } else { "MoE (experts over 2 groups)" }), "{err}");
        assert_eq!(&got, want, "ep_size = {ep}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An FP8 checkpoint (ModelOpt's layout) over 2 ranks: its FP8 linears split (attention and
/// the MLPs the matchers leave as linears), and `mpirun -n 2` prints what one rank prints.
#[test]
fn mpirun_fp8_ranks_print_what_one_rank_prints() {
    let Some(mpirun) = mpirun() else {
        eprintln!("skipped: no mpirun (install Open MPI: Debian's openmpi-bin)");
        return;
    };
    let bin = env!("CARGO_BIN_EXE_autodeploy");
    let dir = std::env::temp_dir().join(format!("autodeploy-mpi-fp8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = two_prompts(&dir, "fp8.toml", "llama-fp8", "");
    let want = one_rank(bin, &cfg);
    let (got, err) = two_ranks(mpirun, bin, &cfg, "llama-fp8");
    assert!(err.contains("2 attention (2 query heads each), 2 MLPs"), "{err}");
    assert_eq!(got, want, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn graph_shows_each_ranks_slice() {
    let out = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
        .args(["graph", "--model", "tests/fixtures/llama", "--stage", "sharding", "--world-size", "2", "--rank", "1"])
        .current_dir(root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("detect_sharding] rank 1 of 2"), "{text}");
    assert!(text.contains("o_proj.weight.tp1of2: f32[64, 32]") && text.contains("= all_reduce("), "{text}");
    let bad = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
        .args(["graph", "--model", "tests/fixtures/llama", "--stage", "sharding", "--world-size", "2", "--rank", "2"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--rank 2"));
}

/// `autodeploy serve` over 2 ranks: rank 0's scheduler batches concurrent requests and sends
/// each step to rank 1; the completions equal one rank's.
#[test]
fn mpirun_serve_answers_what_one_rank_answers() {
    let Some(mpirun) = mpirun() else {
        eprintln!("skipped: no mpirun (install Open MPI: Debian's openmpi-bin)");
        return;
    };
    let bin = env!("CARGO_BIN_EXE_autodeploy");
    let args = ["--model", "tests/fixtures/serve", "--dtype", "float32", "serve"];
    let mut one = Command::new(bin);
    one.args(args);
    let want = served_completions(one);
    assert!(want.iter().all(|t| !t.is_empty()), "{want:?}");
    let mut two = Command::new(mpirun);
    two.args(["--allow-run-as-root", "--oversubscribe", "-n", "2", bin, "--world-size", "2"])
        .args(args)
        .env("OMPI_MCA_btl", "self,vader,tcp");
    assert_eq!(served_completions(two), want);
}
