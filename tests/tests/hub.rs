//! The Hub download path against a local HTTP server that speaks the subset of the Hub's
//! protocol `hf-hub` uses (`autodeploy_tests::hub_server`). No real hub is reachable here, and
//! none is needed.
//!
//! One test function: it sets process-wide environment variables (HF_ENDPOINT, HF_HOME,
//! HF_HUB_OFFLINE), so it lives alone in this test binary.

mod common;

use std::sync::atomic::Ordering;

use autodeploy_core::config::PipelineConfig;
use autodeploy_core::hub;
use autodeploy_core::pipeline;
use autodeploy_tests::hub_server::{serve, REPO};
use common::*;

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
