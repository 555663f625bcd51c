//! The Hub download path against a local HTTP server that speaks the subset of the Hub's
//! protocol `hf-hub` uses (`/{repo}/resolve/{revision}/{file}`, ranged GETs, `ETag` and
//! `X-Repo-Commit` headers). No real hub is reachable here, and none is needed.
//!
//! One test function: it sets process-wide environment variables (HF_ENDPOINT, HF_HOME,
//! HF_HUB_OFFLINE), so it lives alone in this test binary.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use autodeploy_core::config::PipelineConfig;
use autodeploy_core::hub;
use autodeploy_core::pipeline;
use common::*;

const REPO: &str = "tiny-org/tiny-llama";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn respond(mut s: TcpStream, root: &std::path::Path, hits: &AtomicUsize) {
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let v = v.trim().to_string();
            let (a, b) = v.split_once('-').unwrap();
            range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
        }
    }
    hits.fetch_add(1, Ordering::SeqCst);
    let prefix = format!("/{REPO}/resolve/main/");
    let file = path.strip_prefix(&prefix).map(|f| root.join(f));
    let body = match file.as_ref().map(std::fs::read) {
        Some(Ok(b)) => b,
        _ => {
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
        }
    };
    let size = body.len();
    let etag = format!(
        "{:016x}",
        body.iter().fold(1469598103934665603u64, |h, &b| (h ^ b as u64).wrapping_mul(1099511628211))
    );
    let (status, start, end) = match range {
        Some((a, b)) => ("206 Partial Content", a, b.map(|b| b + 1).unwrap_or(size).min(size)),
        None => ("200 OK", 0, size),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{size}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        end - start,
        end.saturating_sub(1)
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(&body[start..end]);
}

fn serve(root: PathBuf) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            respond(s, &root, &h);
        }
    });
    (format!("http://{addr}"), hits)
}

#[test]
fn hub_download_cache_and_offline_mode() {
    let home = tempfile::tempdir().unwrap();
    let (endpoint, hits) = serve(fixture("llama"));
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::set_var("HF_HOME", home.path());
    std::env::remove_var("HF_HUB_OFFLINE");

    // Download: config, index, every shard; the folder lands under HF_HOME/hub.
    let dir = hub::resolve_model(REPO, None).unwrap();
    assert!(dir.starts_with(home.path().join("hub")), "{}", dir.display());
    for f in ["config.json", "model.safetensors.index.json", "model-00004-of-00004.safetensors"] {
        assert_eq!(std::fs::read(dir.join(f)).unwrap(), std::fs::read(fixture("llama").join(f)).unwrap(), "{f}");
    }
    assert!(hits.load(Ordering::SeqCst) >= 6);

    // The downloaded model builds and matches the reference logits of the local fixture.
    let cfg = PipelineConfig::from_toml_str(&format!("model = {REPO:?}\ndtype = \"float32\""), None).unwrap();
    let g = pipeline::graph_after(&cfg, autodeploy_sdk::Stage::Import).unwrap();
    let mut model = compile(&g);
    let r = Reference::load("llama");
    let (shape, ids) = r.i64("tokens_0");
    let (_, want) = r.f32("logits_f32_0");
    let got = logits(model.as_mut(), &shape, &ids);
    let d = max_abs_diff(&got, &want, "hub download vs reference logits");
    assert!(d <= F32_MAX_ABS, "logits of the downloaded model differ from the reference by {d}");

    // Offline: served from the cache without a single request.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let before = hits.load(Ordering::SeqCst);
    assert_eq!(hub::resolve_model(REPO, None).unwrap(), dir);
    assert_eq!(hits.load(Ordering::SeqCst), before, "offline mode must not touch the network");
    let e = hub::resolve_model("tiny-org/not-cached", None).unwrap_err().to_string();
    assert!(e.contains("tiny-org/not-cached") && e.contains("config.json") && e.contains("HF_HUB_OFFLINE"), "{e}");

    // Online, a repo the server does not have: a clear not-found naming repo and file.
    std::env::remove_var("HF_HUB_OFFLINE");
    let e = hub::resolve_model("tiny-org/missing", None).unwrap_err().to_string();
    assert!(e.contains("tiny-org/missing") && e.contains("config.json") && e.contains("not found"), "{e}");
}
