//! Helpers shared by the binary's test files.

use std::path::PathBuf;
use std::process::Command;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The SmolLM2 GGUF (`scripts/fetch-smollm2.sh`); missing is a failure in CI, a skip elsewhere.
#[allow(dead_code)] // not every test binary uses it
pub fn smollm2() -> Option<PathBuf> {
    let p = root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        return Some(p);
    }
    assert!(std::env::var_os("CI").is_none(), "{} is missing in CI", p.display());
    eprintln!("SKIPPED: {} not found; run scripts/fetch-smollm2.sh", p.display());
    None
}

#[allow(dead_code)] // not every test binary uses it
/// The completion lines (`[i] output ...`) of a run.
pub fn completions(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout).lines().filter(|l| l.contains("] output ")).map(str::to_string).collect()
}

#[allow(dead_code)] // not every test binary uses it
/// One HTTP/1.1 exchange with the server on `port`: the status code and the body.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, out.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string())))
}

#[allow(dead_code)] // not every test binary uses it
/// A server started by `launch` (with `--port`), waited for until `/health` answers 200; its
/// completions of three prompts sent at once (greedy, and sampled with a seed), each as the
/// choice's text. The server is stopped after.
pub fn served_completions(mut launch: Command) -> Vec<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = launch.args(["--port", &port.to_string()]).current_dir(root()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !http(port, "GET", "/health", "").is_ok_and(|(c, _)| c == 200) {
        assert!(t0.elapsed().as_secs() < 120, "the server did not come up");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the server exited: {st}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let bodies: [&'static str; 3] = [
        r#"{"prompt": "The capital of France", "max_tokens": 12, "temperature": 0}"#,
        r#"{"prompt": [1, 200, 3, 44], "max_tokens": 9, "temperature": 0.9, "top_k": 30, "seed": 5}"#,
        r#"{"prompt": "Once upon a time", "max_tokens": 7, "temperature": 0}"#,
    ];
    let replies: Vec<_> = bodies
        .into_iter()
        .map(|b| std::thread::spawn(move || http(port, "POST", "/v1/completions", b).unwrap()))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    // SIGTERM: the server finishes and stops (mpirun passes it to every rank).
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    replies
        .into_iter()
        .map(|(code, body)| {
            assert_eq!(code, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect()
}
