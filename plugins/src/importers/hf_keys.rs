//! Typed reading of a Hugging Face `config.json` for the HF importer (hf.rs): sizes checked
//! against limits before anything is built from them, errors naming the file and the key (under
//! the file's own name for a family's aliased keys).

use std::path::Path;

use autodeploy_core::error::{Error, Result};
use serde_json::{Map, Value};

/// Typed access to `config.json` keys with errors that name the file and key.
pub(super) struct Keys<'a> {
    pub(super) file: &'a Path,
    pub(super) map: &'a Map<String, Value>,
    pub(super) prefix: &'a str,
    /// The family's own names for keys (`Family::config_keys`): read, and named in errors,
    /// under those.
    pub(super) aliases: &'static [(&'static str, &'static str)],
}

impl<'a> Keys<'a> {
    /// The file's name for `key`.
    pub(super) fn name<'k>(&self, key: &'k str) -> &'k str {
        self.aliases.iter().find(|(ours, _)| *ours == key).map_or(key, |&(_, theirs)| theirs)
    }

    pub(super) fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(self.file, format!("{}{}", self.prefix, self.name(key)), msg)
    }

    pub(super) fn present(&self, key: &str) -> Option<&'a Value> {
        self.map.get(self.name(key)).filter(|v| !v.is_null())
    }

    pub(super) fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, format!("expected a positive integer, found {v}"))),
        }
    }

    /// A size the graph and the weights are built from: at most `max` (far above any real
    /// model), so a hostile value is refused before anything is built or allocated from it.
    pub(super) fn size_opt(&self, key: &str, max: usize) -> Result<Option<usize>> {
        match self.usize_opt(key)? {
            Some(n) if n > max => Err(self.err(key, format!("{n} is more than the limit {max}"))),
            v => Ok(v),
        }
    }

    pub(super) fn size(&self, key: &str, max: usize) -> Result<usize> {
        self.size_opt(key, max)?.ok_or_else(|| self.err(key, "missing"))
    }

    pub(super) fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    /// A positive number that may be null (none): `default` when the key is absent.
    pub(super) fn positive_or_null(&self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.map.get(self.name(key)) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
                _ => Err(self.err(key, format!("expected a positive number or null, found {v}"))),
            },
        }
    }

    /// A size that may be null (none): `default` when the key is absent.
    pub(super) fn size_or_null(&self, key: &str, max: usize, default: Option<usize>) -> Result<Option<usize>> {
        match self.map.get(self.name(key)) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(_) => self.size_opt(key, max),
        }
    }

    pub(super) fn f64(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    pub(super) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    pub(super) fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }
}
