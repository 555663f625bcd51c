//! Where a model comes from: a local folder, or a Hugging Face Hub id fetched through `hf-hub`
//! (which honours `HF_HOME` and `HF_ENDPOINT`; `HF_HUB_OFFLINE=1` reads the local cache only).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// Files fetched besides the weights when they exist.
const OPTIONAL_FILES: &[&str] = &["generation_config.json", "tokenizer.json", "tokenizer_config.json"];

/// Fetches one file of a repo: `Ok(None)` when the repo has no such file.
type FileGetter<'a> = dyn Fn(&str) -> Result<Option<PathBuf>> + 'a;

/// Resolves `spec` to a local path. A path that exists (relative paths are tried against
/// `base_dir`, the config file's folder, then the working directory) wins; otherwise a spec
/// shaped like `owner/name` is a Hub id.
pub fn resolve_model(spec: &str, base_dir: Option<&Path>) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_absolute() && p.exists() {
        return Ok(p.to_path_buf());
    }
    if let Some(b) = base_dir {
        let q = b.join(p);
        if q.exists() {
            return Ok(q);
        }
    }
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if looks_like_hub_id(spec) {
        return fetch(spec);
    }
    Err(Error::Msg(format!("model `{spec}`: no such file or folder, and not a Hub id (owner/name)")))
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|s| {
            !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn offline() -> bool {
    matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes"))
}

/// Fetches config, weights (single file or every shard of an index) and the optional files of
/// `repo_id`, returning the snapshot folder that holds them.
pub fn fetch(repo_id: &str) -> Result<PathBuf> {
    let herr = |file: &str, msg: String| Error::Hub { repo: repo_id.into(), file: file.into(), msg };
    let getter: Box<FileGetter<'_>> = if offline() {
        let cache = Cache::from_env().repo(Repo::new(repo_id.into(), RepoType::Model));
        Box::new(move |f: &str| Ok(cache.get(f)))
    } else {
        let api = ApiBuilder::from_env()
            .with_retries(3)
            .build()
            .map_err(|e| herr("", format!("cannot set up the Hub client: {e}")))?;
        let cache = Cache::from_env().repo(Repo::new(repo_id.into(), RepoType::Model));
        let id = repo_id.to_string();
        Box::new(move |f: &str| {
            if let Some(p) = cache.get(f) {
                return Ok(Some(p));
            }
            let (api, id, file) = (api.clone(), id.clone(), f.to_string());
            let got = watched(&format!("{id}/{f}"), move |w| api.model(id).download_with_progress(&file, w))
                .map_err(|why| herr(f, why))?;
            match got {
                Ok(p) => Ok(Some(p)),
                Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
                Err(e) => Err(herr(f, e.to_string())),
            }
        })
    };
    let need = |f: &str| -> Result<PathBuf> {
        getter(f)?.ok_or_else(|| {
            let why = if offline() { "not in the local cache (HF_HUB_OFFLINE is set)" } else { "not found on the Hub" };
            herr(f, why.into())
        })
    };
    let config = need("config.json")?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    match getter("model.safetensors.index.json")? {
        Some(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::BadFile { file: index.clone(), msg: format!("invalid JSON: {e}") })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
            let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.sort();
            shards.dedup();
            for s in shards {
                need(s)?;
            }
        }
        None => {
            need("model.safetensors")?;
        }
    }
    for f in OPTIONAL_FILES {
        getter(f)?;
    }
    Ok(dir)
}

/// How long a Hub fetch may receive nothing before it fails: `AUTODEPLOY_HUB_TIMEOUT_S`
/// (seconds), default 60.
fn stall_limit() -> Duration {
    let s = std::env::var("AUTODEPLOY_HUB_TIMEOUT_S").ok().and_then(|v| v.parse::<f64>().ok());
    Duration::from_secs_f64(s.filter(|s| *s > 0.0).unwrap_or(60.0))
}

/// A download's progress: the time of the last bytes (for the watchdog) and, on a terminal, a
/// bar with bytes and rate.
struct Watch {
    last: Arc<Mutex<Instant>>,
    bar: Option<indicatif::ProgressBar>,
}

impl hf_hub::api::Progress for Watch {
    fn init(&mut self, size: usize, filename: &str) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = indicatif::ProgressBar::new(size as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(filename.to_string());
            self.bar = Some(bar);
        }
    }
    fn update(&mut self, size: usize) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if let Some(b) = &self.bar {
            b.inc(size as u64);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// Runs `fetch` on its own thread and waits while it makes progress: it fails once nothing has
/// arrived for `stall_limit()` (a server that accepts and never answers, a stalled transfer).
/// The stuck request is left behind; the caller reports the error and the process goes on or
/// exits without it.
fn watched<T: Send + 'static>(
    what: &str,
    fetch: impl FnOnce(Watch) -> T + Send + 'static,
) -> std::result::Result<T, String> {
    let last = Arc::new(Mutex::new(Instant::now()));
    let w = Watch { last: last.clone(), bar: None };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("autodeploy-hub".into())
        .spawn(move || {
            let _ = tx.send(fetch(w));
        })
        .map_err(|e| format!("cannot start the download thread: {e}"))?;
    let limit = stall_limit();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(v) => return Ok(v),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err("the download thread died".into()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let idle = last.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                if idle > limit {
                    return Err(format!(
                        "no data for {:.0} s fetching {what} (AUTODEPLOY_HUB_TIMEOUT_S sets the limit; check the \
                         network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache)",
                        idle.as_secs_f64()
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_versus_paths() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("noslash"));
    }
}
