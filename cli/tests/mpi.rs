//! Ranks as processes: `mpirun -n 2` and `-n 4` of the binary on the llama fixture (tensor
//! parallel over 2 and 4 CPU ranks through Open MPI) print the completions `world_size = 1`
//! prints, and `autodeploy graph --rank` shows each rank's slice. Needs `mpirun` (CI installs
//! Open MPI; elsewhere the test says it was skipped, and fails under CI=true without it).

mod common;

use common::root;
use std::process::Command;

fn mpirun() -> Option<&'static str> {
    let found = Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but no mpirun: .ci/run installs Open MPI");
    }
    found.then_some("mpirun")
}

/// The completion lines (`[i] output ...`) of a run.
fn completions(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout).lines().filter(|l| l.contains("] output ")).map(str::to_string).collect()
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

#[test]
fn a_sharded_config_without_mpirun_says_how_to_launch() {
    let out = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
        .args(["--config", "examples/llama-fixture.toml", "--world-size", "2"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mpirun -n 2 autodeploy"), "{err}");
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
