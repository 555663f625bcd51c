//! Helpers shared by the binary's test files.

use std::path::PathBuf;

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
