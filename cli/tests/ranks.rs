//! Ranks `autodeploy` starts itself (`world_size > 1` without `mpirun`, comm/spawn.rs): the main
//! job over 2 and 4 self-started ranks prints what one rank prints; a sharded server answers what
//! a one-rank server answers, and when a rank's process is killed its `/health` answers 503
//! within seconds, naming the rank, while the server itself stays up; a rank 0 that fails takes
//! the other ranks with it.

mod common;

use common::{completions, http, root, served_completions};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn self_started_ranks_print_what_one_rank_prints() {
    let bin = env!("CARGO_BIN_EXE_autodeploy");
    let run = |extra: &[&str]| {
        let out = Command::new(bin)
            .args(["--config", "examples/llama-fixture.toml"])
            .args(extra)
            .current_dir(root())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{extra:?}: {err}");
        (completions(&out.stdout), err)
    };
    let (want, _) = run(&[]);
    assert_eq!(want.len(), 2, "{want:?}");
    for n in ["2", "4"] {
        let (got, err) = run(&["--world-size", n]);
        assert_eq!(got, want, "--world-size {n}: {err}");
        assert!(err.contains("started rank"), "{err}");
    }
}

/// The processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so read after its ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_self_started_server_answers_as_one_rank_and_503s_when_a_rank_dies() {
    let bin = env!("CARGO_BIN_EXE_autodeploy");
    let args = ["--model", "tests/fixtures/serve", "--dtype", "float32"];
    let mut one = Command::new(bin);
    one.args(args).arg("serve");
    let want = served_completions(one);
    let mut two = Command::new(bin);
    two.args(args).args(["--world-size", "2", "serve"]);
    assert_eq!(served_completions(two), want);

    // Kill rank 1 under an idle server.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = Command::new(bin)
        .args(args)
        .args(["--world-size", "2", "serve", "--port", &port.to_string()])
        .current_dir(root())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !http(port, "GET", "/health", "").is_ok_and(|(c, _)| c == 200) {
        assert!(t0.elapsed() < Duration::from_secs(120), "the server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ranks = children_of(server.id());
    assert_eq!(ranks.len(), 1, "rank 0 should have one child: {ranks:?}");
    assert!(Command::new("kill").args(["-9", &ranks[0].to_string()]).status().unwrap().success());
    let killed = Instant::now();
    let (code, body) = loop {
        let (code, body) = http(port, "GET", "/health", "").unwrap();
        if code != 200 || killed.elapsed() > Duration::from_secs(10) {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let waited = killed.elapsed();
    assert_eq!(code, 503, "{body}");
    assert!(waited < Duration::from_secs(5), "503 after {waited:?}");
    assert!(body.contains("rank 1") && body.contains("exited"), "{body}");
    let (code, body) = http(port, "POST", "/v1/completions", r#"{"prompt": [1, 2, 3], "max_tokens": 4}"#).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(server.try_wait().unwrap().is_none(), "the server exited with its rank");
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    let _ = server.wait();
}

#[test]
fn a_failing_rank_zero_ends_the_other_ranks() {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
        .args(["--model", "tests/fixtures/llama", "--world-size", "2", "bench", "--batch", "0"])
        .current_dir(root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--batch"), "{err}");
    // Rank 1 read the end of its socket and exited; rank 0 did not wait out a timeout for it.
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?}", t0.elapsed());
}
