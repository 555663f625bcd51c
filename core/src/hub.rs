//! Where a model comes from: a local folder, or a Hugging Face Hub id fetched through `hf-hub`
//! (which honours `HF_HOME` and `HF_ENDPOINT`; `HF_HUB_OFFLINE=1` reads the local cache only).

use std::path::{Path, PathBuf};

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
            .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .build()
            .map_err(|e| herr("", format!("cannot set up the Hub client: {e}")))?;
        let repo = api.model(repo_id.to_string());
        Box::new(move |f: &str| match repo.get(f) {
            Ok(p) => Ok(Some(p)),
            Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(herr(f, e.to_string())),
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
