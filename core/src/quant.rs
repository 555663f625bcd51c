//! What a quantized checkpoint says about its weights, independent of the file format that
//! carried it: ModelOpt's `hf_quant_config.json` (or the `quantization_config` it writes into
//! `config.json`) read into a [`CheckpointQuant`]: the algorithm, which modules it left out, the
//! KV cache's format. The tensors themselves (`weight` in E4M3 or packed E2M1, `weight_scale`,
//! `weight_scale_2`, `input_scale`) stay in the [`crate::weights::WeightStore`], which marks the
//! weights they scale; the `quantize` stage's transforms turn each such linear into a quantized
//! linear op whose scales are graph values.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// A checkpoint's weight quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantAlgo {
    /// FP8 E4M3 weights with a per-tensor (or per-channel) `weight_scale`, and a static
    /// per-tensor `input_scale` for the activations.
    Fp8,
    /// NVFP4: E2M1 weights packed two a byte, an E4M3 `weight_scale` per 16 values along a row,
    /// and a global `weight_scale_2`.
    Nvfp4,
}

impl QuantAlgo {
    /// ModelOpt's `quant_algo` spelling.
    pub fn name(self) -> &'static str {
        match self {
            QuantAlgo::Fp8 => "FP8",
            QuantAlgo::Nvfp4 => "NVFP4",
        }
    }

    /// The built-in plugin whose transform reads it.
    pub fn plugin(self) -> &'static str {
        match self {
            QuantAlgo::Fp8 => "fp8",
            QuantAlgo::Nvfp4 => "nvfp4",
        }
    }

    /// The transform that turns its linears into quantized linears.
    pub fn transform(self) -> &'static str {
        match self {
            QuantAlgo::Fp8 => "quantize_fp8_linear_from_config",
            QuantAlgo::Nvfp4 => "quantize_nvfp4_linear_from_config",
        }
    }
}

/// The quantization a checkpoint declares.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointQuant {
    pub algo: QuantAlgo,
    /// Module names or `*` wildcards (`lm_head`, `model.layers.*.mlp.gate`) left unquantized.
    pub exclude: Vec<String>,
    /// The KV cache's format (`FP8`), if the checkpoint calibrated one.
    pub kv_cache: Option<QuantAlgo>,
    /// Where it was declared: the file and the key, for messages.
    pub file: PathBuf,
    pub key: String,
}

impl CheckpointQuant {
    /// Whether `module` (a weight's name without `.weight`) is one the checkpoint left out.
    pub fn excluded(&self, module: &str) -> bool {
        self.exclude.iter().any(|p| wildcard(p, module))
    }

    /// One line for logs and graph history.
    pub fn describe(&self) -> String {
        let kv = self.kv_cache.map(|k| format!(", {} KV cache", k.name())).unwrap_or_default();
        format!(
            "{} checkpoint ({}{kv}; {} excluded: {})",
            self.algo.name(),
            self.file.display(),
            self.exclude.len(),
            self.exclude.join(", ")
        )
    }
}

/// `*` matches any run of characters (dots included), as ModelOpt's fnmatch patterns do.
pub fn wildcard(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

fn read_json(p: &Path) -> Result<Option<Value>> {
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::BadFile { file: p.into(), msg: format!("invalid JSON: {e}") })
}

/// The quantization the checkpoint folder `dir` declares: `hf_quant_config.json` (ModelOpt's
/// own file) first, else `config.json`'s `quantization_config`; `None` for a float checkpoint.
/// Another producer or method, or an algorithm other than FP8 and NVFP4, is an error naming
/// the file and key.
pub fn read_checkpoint_quant(dir: &Path) -> Result<Option<CheckpointQuant>> {
    let modelopt = dir.join("hf_quant_config.json");
    if let Some(v) = read_json(&modelopt)? {
        let q = v.get("quantization").ok_or_else(|| Error::config(&modelopt, "quantization", "missing"))?;
        if let Some(p) = v.pointer("/producer/name").and_then(Value::as_str) {
            if p != "modelopt" {
                return Err(Error::config(
                    &modelopt,
                    "producer.name",
                    format!("`{p}`: only ModelOpt checkpoints are read"),
                ));
            }
        }
        return parse(&modelopt, "quantization", q, "exclude_modules").map(Some);
    }
    let cfg = dir.join("config.json");
    let Some(q) = read_json(&cfg)?.and_then(|v| v.get("quantization_config").cloned()) else {
        return Ok(None);
    };
    if q.is_null() {
        return Ok(None);
    }
    match q.get("quant_method").and_then(Value::as_str) {
        Some("modelopt") => parse(&cfg, "quantization_config", &q, "ignore").map(Some),
        other => Err(Error::config(
            &cfg,
            "quantization_config.quant_method",
            format!(
                "`{}`: only ModelOpt checkpoints (quant_method `modelopt`, FP8 or NVFP4) are read",
                other.unwrap_or("missing")
            ),
        )),
    }
}

fn parse(file: &Path, at: &str, q: &Value, exclude_key: &str) -> Result<CheckpointQuant> {
    let algo_of = |key: &str, v: &str| -> Result<QuantAlgo> {
        match v {
            "FP8" => Ok(QuantAlgo::Fp8),
            "NVFP4" => Ok(QuantAlgo::Nvfp4),
            other => {
                Err(Error::config(file, format!("{at}.{key}"), format!("`{other}` is not supported (FP8, NVFP4)")))
            }
        }
    };
    let algo = match q.get("quant_algo") {
        Some(Value::String(s)) => algo_of("quant_algo", s)?,
        Some(other) => {
            return Err(Error::config(file, format!("{at}.quant_algo"), format!("expected a string, got {other}")))
        }
        None => return Err(Error::config(file, format!("{at}.quant_algo"), "missing")),
    };
    let kv_cache = match q.get("kv_cache_quant_algo") {
        // config.json's form (quantization_config): `kv_cache_scheme` {type, num_bits}.
        None | Some(Value::Null) => match q.get("kv_cache_scheme") {
            None | Some(Value::Null) => None,
            Some(k)
                if k.get("type").and_then(Value::as_str) == Some("float")
                    && k.get("num_bits").and_then(Value::as_u64) == Some(8) =>
            {
                Some(QuantAlgo::Fp8)
            }
            Some(other) => {
                return Err(Error::config(
                    file,
                    format!("{at}.kv_cache_scheme"),
                    format!("{other} is not supported (8-bit float, or none)"),
                ))
            }
        },
        Some(Value::String(s)) if s == "FP8" => Some(QuantAlgo::Fp8),
        Some(other) => {
            return Err(Error::config(
                file,
                format!("{at}.kv_cache_quant_algo"),
                format!("{other} is not supported (FP8 or none)"),
            ))
        }
    };
    if let Some(g) = q.get("group_size") {
        if algo == QuantAlgo::Nvfp4 && g.as_u64() != Some(16) {
            return Err(Error::config(file, format!("{at}.group_size"), format!("{g}: NVFP4 blocks are 16 values")));
        }
    }
    let exclude = match q.get(exclude_key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    Error::config(file, format!("{at}.{exclude_key}"), format!("expected module names, got {v}"))
                })
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(Error::config(file, format!("{at}.{exclude_key}"), format!("expected a list, got {other}")))
        }
    };
    Ok(CheckpointQuant { algo, exclude, kv_cache, file: file.into(), key: at.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_modelopt_module_patterns() {
        assert!(wildcard("lm_head", "lm_head"));
        assert!(!wildcard("lm_head", "lm_head2"));
        assert!(wildcard("model.layers.*.mlp.gate", "model.layers.12.mlp.gate"));
        assert!(!wildcard("model.layers.*.mlp.gate", "model.layers.12.mlp.gate_proj"));
        assert!(wildcard("*self_attn*", "model.layers.0.self_attn.q_proj"));
        assert!(wildcard("*", "anything"));
        assert!(!wildcard("a*b*c", "a-c-b"));
    }

    #[test]
    fn modelopt_files_are_read_and_other_methods_refused_by_key() {
        let dir = std::env::temp_dir().join(format!("adq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write("config.json", r#"{"model_type": "llama"}"#);
        assert_eq!(read_checkpoint_quant(&dir).unwrap(), None);
        write(
            "config.json",
            r#"{"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": ["lm_head"]}}"#,
        );
        let q = read_checkpoint_quant(&dir).unwrap().unwrap();
        assert_eq!(
            (q.algo, q.exclude.clone(), q.key.as_str()),
            (QuantAlgo::Nvfp4, vec!["lm_head".to_string()], "quantization_config")
        );
        // config.json's FP8 KV cache, as ModelOpt 0.47 writes it there.
        write(
            "config.json",
            r#"{"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head"], "kv_cache_scheme": {"dynamic": false, "num_bits": 8, "type": "float"}}}"#,
        );
        assert_eq!(read_checkpoint_quant(&dir).unwrap().unwrap().kv_cache, Some(QuantAlgo::Fp8));
        write(
            "config.json",
            r#"{"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_scheme": {"num_bits": 4, "type": "int"}}}"#,
        );
        let e = read_checkpoint_quant(&dir).unwrap_err().to_string();
        assert!(e.contains("quantization_config.kv_cache_scheme"), "{e}");
        write("config.json", r#"{"quantization_config": {"quant_method": "gptq", "bits": 4}}"#);
        let e = read_checkpoint_quant(&dir).unwrap_err().to_string();
        assert!(e.contains("quantization_config.quant_method") && e.contains("gptq"), "{e}");
        // ModelOpt's own file wins over config.json.
        write(
            "hf_quant_config.json",
            r#"{"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head", "model.layers.*.mlp.gate"]}}"#,
        );
        let q = read_checkpoint_quant(&dir).unwrap().unwrap();
        assert_eq!((q.algo, q.kv_cache), (QuantAlgo::Fp8, Some(QuantAlgo::Fp8)));
        assert!(q.excluded("model.layers.3.mlp.gate") && !q.excluded("model.layers.3.mlp.up_proj"));
        write("hf_quant_config.json", r#"{"quantization": {"quant_algo": "W4A8_AWQ"}}"#);
        let e = read_checkpoint_quant(&dir).unwrap_err().to_string();
        assert!(
            e.contains("hf_quant_config.json") && e.contains("quantization.quant_algo") && e.contains("W4A8_AWQ"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
