//! `pipeline.toml`: what to build and run. Keys follow AutoDeploy's vocabulary where one exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, Tokenizer};

/// Upper bounds of the sizes a config sets (far above any real deployment).
pub const MAX_BATCH_SIZE: usize = 1 << 16;
pub const MAX_SEQ_LEN: usize = 1 << 24;
pub const MAX_PAGE_SIZE: usize = 4096;
pub const MAX_KV_BUDGET_MIB: usize = 1 << 30;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Local folder or file, or a Hugging Face Hub id.
    pub model: String,
    /// Importer plugin name; detected from the files when absent.
    #[serde(default)]
    pub importer: Option<String>,
    /// `auto` (the checkpoint's dtype), `float32`, `bfloat16` or `float16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// `auto` (the first CUDA GPU when one is usable, else the CPU), `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Decode batch sizes the `cudagraph` and `opt` backends capture as CUDA graphs; a decode
    /// step pads to the next one, larger batches run uncaptured. Default: 1, 2, 4, 8, 16, 32,
    /// 64, ... up to `max_batch_size`.
    #[serde(default)]
    pub cuda_graph_batch_sizes: Option<Vec<usize>>,
    #[serde(default = "default_compile_backend")]
    pub compile_backend: String,
    /// `auto` (the checkpoint's weights) or `dummy` (random weights from the model's config alone,
    /// for benchmarking shapes whose weights are not at hand).
    #[serde(default)]
    pub load_format: LoadFormat,
    /// `none` (exact f32 activations) or `int8`: decode-sized linears over block-quantized
    /// weights quantize their activations to int8 per 32 values (llama.cpp's method; faster on
    /// the CPU, adds the activation rounding error).
    #[serde(default)]
    pub activation_quant: ActivationQuant,
    /// `none`, or `fp8`: a float checkpoint's linears become FP8 at load (the `fp8` plugin's
    /// `quantize_fp8_linear_from_config`): E4M3 weights with one scale a row, each token's
    /// activations quantized with its own scale as it comes; the LM head and embeddings stay.
    #[serde(default)]
    pub quantize: Quantize,
    /// The KV cache's format (the `fp8` plugin's `quantize_fp8_kv_cache`): `auto` (what the
    /// checkpoint declares: ModelOpt's `kv_cache_quant_algo = "FP8"` with its per-layer
    /// `k_scale`/`v_scale`; else the model's dtype), `fp8` (E4M3 at the checkpoint's scales, 1.0
    /// where it has none), `model` (the model's dtype whatever the checkpoint declares).
    #[serde(default)]
    pub kv_cache_dtype: KvCacheDtype,
    /// CPU kernel path: `auto` (the best this CPU runs: `avx512vnni`, `avxvnni`, `avx2` or `portable`), or
    /// one of those to compare against a lower one (a path the CPU lacks falls back, with a
    /// warning).
    #[serde(default)]
    pub cpu_kernels: CpuKernelsSetting,
    /// Checks the outputs of every attention backend and registered op (built in or from a
    /// plugin library) each step: NaN, Inf, or values the op left unwritten fail that step
    /// naming the op and where it came from. For developing plugins; off by default (it reads
    /// every such output once more).
    #[serde(default)]
    pub debug_checks: bool,
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Attention backend for cached attention (`torch`: the CPU reference over pages).
    #[serde(default = "default_attn_backend")]
    pub attn_backend: String,
    /// Tokens per KV-cache page.
    #[serde(default = "default_attn_page_size")]
    pub attn_page_size: usize,
    /// Most tokens one forward step may carry (all sequences together).
    #[serde(default)]
    pub max_num_tokens: Option<usize>,
    /// CUDA: the KV cache takes this fraction of the device memory still free once the
    /// weights, the planned activations and the step buffers are allocated (AutoDeploy's key).
    #[serde(default)]
    pub free_mem_ratio: Option<f64>,
    /// The KV cache's size in MiB (any device; on the CPU the way to bound it). Without it or
    /// `free_mem_ratio`: room for `max_batch_size` sequences of `max_seq_len`.
    #[serde(default)]
    pub kv_cache_budget_mib: Option<usize>,
    /// Share the KV pages of a common prompt prefix between requests (`trtllm`).
    #[serde(default = "default_true")]
    pub enable_prefix_caching: bool,
    #[serde(default = "default_runtime")]
    pub runtime: String,
    /// `autodeploy serve`: requests accepted beyond the `max_batch_size` running ones; one more
    /// is answered 429 (too many requests) instead of queueing without bound.
    #[serde(default = "default_max_waiting_requests")]
    pub max_waiting_requests: usize,
    /// Sampling defaults; each prompt may override them.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop_token_ids: Vec<i64>,
    #[serde(default)]
    pub stop_strings: Vec<String>,
    /// Keep generating past the model's end-of-sequence token.
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub prompts: Vec<Prompt>,
    /// `[transforms.<name>]` tables; each name must be a registered transform.
    #[serde(default)]
    pub transforms: BTreeMap<String, toml::Table>,
    /// `[attention_backends.<name>]` tables: options of the attention backend of that name
    /// (the ones it declares; `autodeploy plugins` lists them).
    #[serde(default)]
    pub attention_backends: BTreeMap<String, toml::Table>,
    /// `[kernels]`: the CUDA executor's kernel choices (experiment knobs with measured
    /// defaults; docs/developing.md lists them).
    #[serde(default)]
    pub kernels: autodeploy_kernels::cuda::exec::KernelSettings,
    /// Ranks the model is sharded over (tensor parallelism; the `sharding` stage's
    /// `detect_sharding` splits the graph). 1: not sharded.
    #[serde(default = "default_one")]
    pub world_size: usize,
    /// Ranks each tensor-parallel group splits a layer over; equal to `world_size` (the only
    /// layout built so far) when given.
    #[serde(default)]
    pub tp_size: Option<usize>,
    /// Groups the experts of a mixture-of-experts layer are spread over (expert parallelism;
    /// a divisor of `world_size`): each group of `world_size / ep_size` ranks holds
    /// `experts / ep_size` experts, each split over the group's ranks. 1 (the default): every
    /// rank holds a slice of every expert.
    #[serde(default = "default_one")]
    pub ep_size: usize,
    /// `[sharding]`: the manual override of what `detect_sharding` splits.
    #[serde(default)]
    pub sharding: ShardingConfig,
    /// Which rank this process (or thread) builds, `0..world_size`: set by the launcher, or by
    /// `autodeploy graph --rank R` to show one rank's graph; not a config key.
    #[serde(skip)]
    pub rank: usize,
    /// The folder of the config file, for resolving relative paths.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

fn default_one() -> usize {
    1
}

/// The most ranks a config may ask for.
pub const MAX_WORLD_SIZE: usize = 4096;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LoadFormat {
    #[default]
    Auto,
    Dummy,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    #[default]
    None,
    Fp8,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    #[default]
    Auto,
    Fp8,
    Model,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActivationQuant {
    #[default]
    None,
    Int8,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CpuKernelsSetting {
    #[default]
    Auto,
    Avx512vnni,
    Avxvnni,
    Avx2,
    Portable,
}

impl CpuKernelsSetting {
    /// The path that runs: the one asked for within what this CPU has.
    pub fn resolve(self) -> autodeploy_kernels::isa::CpuKernels {
        use autodeploy_kernels::isa::CpuKernels;
        let asked = match self {
            CpuKernelsSetting::Auto => return CpuKernels::detected(),
            CpuKernelsSetting::Avx512vnni => CpuKernels::Avx512Vnni,
            CpuKernelsSetting::Avxvnni => CpuKernels::AvxVnni,
            CpuKernelsSetting::Avx2 => CpuKernels::Avx2,
            CpuKernelsSetting::Portable => CpuKernels::Portable,
        };
        if !asked.supported() {
            tracing::warn!(
                asked = asked.name(),
                running = CpuKernels::detected().name(),
                "cpu_kernels: this CPU lacks the features of the path asked for"
            );
        }
        asked.at_most_detected()
    }
}

/// `[sharding]`: which kinds of layer `detect_sharding` splits (all, by default), and the
/// layers kept whole on every rank by name.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardingConfig {
    pub attention: bool,
    pub mlp: bool,
    pub moe: bool,
    pub lm_head: bool,
    pub embedding: bool,
    /// Checkpoint weight names (`*` matches any run of characters) whose layers stay whole.
    pub replicate: Vec<String>,
}

impl Default for ShardingConfig {
    fn default() -> ShardingConfig {
        ShardingConfig { attention: true, mlp: true, moe: true, lm_head: true, embedding: true, replicate: Vec::new() }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompt {
    /// Exactly one of these: token ids, plain text, or chat messages (rendered with the model's
    /// chat template).
    #[serde(default)]
    pub token_ids: Option<Vec<i64>>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub stop_strings: Option<Vec<String>>,
}

fn default_dtype() -> String {
    "auto".into()
}
fn default_device() -> String {
    "auto".into()
}

/// Where a model runs, resolved from `device`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether GPU `ordinal` can be used, probed once per process (no kernels compiled).
pub fn cuda_usable(ordinal: usize) -> std::result::Result<String, String> {
    static PROBED: std::sync::Mutex<Vec<(usize, std::result::Result<String, String>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut p = PROBED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, r)) = p.iter().find(|(o, _)| *o == ordinal) {
        return r.clone();
    }
    let r = autodeploy_kernels::cuda::probe(ordinal).map_err(|e| e.to_string());
    p.push((ordinal, r.clone()));
    r
}
fn default_true() -> bool {
    true
}
fn default_compile_backend() -> String {
    "simple".into()
}
fn default_max_batch_size() -> usize {
    8
}
fn default_max_seq_len() -> usize {
    2048
}
fn default_max_waiting_requests() -> usize {
    1024
}
fn default_max_new_tokens() -> usize {
    16
}
fn default_attn_backend() -> String {
    "torch".into()
}
fn default_attn_page_size() -> usize {
    16
}
fn default_runtime() -> String {
    "demollm".into()
}
fn default_top_p() -> f32 {
    1.0
}

impl PipelineConfig {
    pub fn from_file(path: &Path) -> Result<PipelineConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg = PipelineConfig::from_toml_str(&text, Some(path))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Parses without validating, so command-line overrides can apply first.
    pub fn from_toml_str(text: &str, path: Option<&Path>) -> Result<PipelineConfig> {
        let file = path.unwrap_or(Path::new("<command line>"));
        let mut cfg: PipelineConfig =
            toml::from_str(text).map_err(|e| Error::BadFile { file: file.into(), msg: e.to_string() })?;
        cfg.base_dir = path.and_then(Path::parent).map(Path::to_path_buf);
        Ok(cfg)
    }

    /// Sampling for a prompt: its own values over the config's defaults.
    pub fn sampling(&self, p: Option<&Prompt>) -> SamplingParams {
        SamplingParams {
            max_new_tokens: p.and_then(|p| p.max_new_tokens).unwrap_or(self.max_new_tokens),
            temperature: p.and_then(|p| p.temperature).unwrap_or(self.temperature),
            top_k: p.and_then(|p| p.top_k).unwrap_or(self.top_k),
            top_p: p.and_then(|p| p.top_p).unwrap_or(self.top_p),
            seed: p.and_then(|p| p.seed).or(self.seed),
            stop_token_ids: p.and_then(|p| p.stop_token_ids.clone()).unwrap_or_else(|| self.stop_token_ids.clone()),
            stop_strings: p.and_then(|p| p.stop_strings.clone()).unwrap_or_else(|| self.stop_strings.clone()),
            ..SamplingParams::default()
        }
    }

    /// Token ids of prompt `i`: as given, or text tokenized (chat messages rendered with the
    /// chat template first). Errors name the prompt.
    pub fn prompt_ids(&self, i: usize, tok: Option<&Tokenizer>) -> Result<Vec<i64>> {
        let p = &self.prompts[i];
        if let Some(ids) = &p.token_ids {
            return Ok(ids.clone());
        }
        let field = if p.text.is_some() { "text" } else { "messages" };
        let tok = tok.ok_or_else(|| Error::Input {
            input: format!("prompts[{i}].{field}"),
            msg: "this model has no tokenizer; give token_ids".into(),
        })?;
        let text = match (&p.text, &p.messages) {
            (Some(t), _) => t.clone(),
            (None, Some(m)) => tok
                .apply_chat_template(m, true)
                .map_err(|e| Error::Input { input: format!("prompts[{i}].messages"), msg: e.to_string() })?,
            (None, None) => unreachable!("validated: one prompt form is given"),
        };
        tok.encode(&text, true).map_err(|e| Error::Input { input: format!("prompts[{i}].{field}"), msg: e.to_string() })
    }

    /// The device `device` names; `auto` is the first GPU when one is usable.
    pub fn resolved_device(&self) -> Device {
        match self.device.as_str() {
            "cpu" => Device::Cpu,
            "auto" => match cuda_usable(0) {
                Ok(_) => Device::Cuda(self.rank_gpu()),
                Err(_) => Device::Cpu,
            },
            "cuda" => Device::Cuda(self.rank_gpu()),
            d => d.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda).unwrap_or(Device::Cpu),
        }
    }

    /// The GPU a rank of a sharded engine takes when the config says `cuda` or `auto`: its rank
    /// on this machine (as `mpirun` or Slurm numbers them, else its rank), wrapped around the
    /// GPUs there are (ranks past them share GPUs; their collectives then go through the host).
    fn rank_gpu(&self) -> usize {
        if self.world_size <= 1 {
            return 0;
        }
        let local = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
            .unwrap_or(self.rank);
        let gpus = (0..64).take_while(|&o| cuda_usable(o).is_ok()).count().max(1);
        local % gpus
    }

    /// `cuda_graph_batch_sizes`, or powers of two up to `max_batch_size` (and it).
    pub fn cuda_graph_batch_sizes(&self) -> Vec<usize> {
        if let Some(v) = &self.cuda_graph_batch_sizes {
            return v.clone();
        }
        let mut v: Vec<usize> =
            std::iter::successors(Some(1usize), |b| Some(b * 2)).take_while(|&b| b < self.max_batch_size).collect();
        v.push(self.max_batch_size);
        v
    }

    /// Tokens one step may carry: `max_num_tokens`, else room for a full batch of prompts.
    pub fn max_num_tokens(&self) -> usize {
        self.max_num_tokens.unwrap_or(self.max_batch_size * self.max_seq_len)
    }

    /// The requested dtype; `None` for `auto`.
    pub fn dtype(&self) -> Option<DType> {
        match self.dtype.as_str() {
            "auto" => None,
            s => DType::parse(s),
        }
    }

    /// Checks values; errors name `path` and the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.dtype != "auto" && !DType::parse(&self.dtype).is_some_and(|d| d.is_float()) {
            return Err(Error::config(
                path,
                "dtype",
                format!("`{}` is not one of auto, float32, bfloat16, float16", self.dtype),
            ));
        }
        if !matches!(self.device.as_str(), "cpu" | "auto") {
            let ordinal = match self.device.as_str() {
                "cuda" => Some(0),
                d => d.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()),
            };
            let Some(ordinal) = ordinal else {
                return Err(Error::config(
                    path,
                    "device",
                    format!("`{}` is not one of auto, cpu, cuda, cuda:N", self.device),
                ));
            };
            // Say what is missing: the driver or the GPU.
            if let Err(why) = cuda_usable(ordinal) {
                return Err(Error::config(path, "device", format!("`{}`: {why}", self.device)));
            }
        }
        if let Some(b) = &self.cuda_graph_batch_sizes {
            if b.contains(&0) {
                return Err(Error::config(path, "cuda_graph_batch_sizes", "batch sizes must be at least 1"));
            }
        }
        // Sizes everything else is allocated from: bounded, so no product of them overflows or
        // asks for memory no machine has before the memory check can say so.
        for (key, v, max) in [
            ("max_batch_size", Some(self.max_batch_size), MAX_BATCH_SIZE),
            ("max_seq_len", Some(self.max_seq_len), MAX_SEQ_LEN),
            ("attn_page_size", Some(self.attn_page_size), MAX_PAGE_SIZE),
            ("max_num_tokens", self.max_num_tokens, MAX_SEQ_LEN),
            ("kv_cache_budget_mib", self.kv_cache_budget_mib, MAX_KV_BUDGET_MIB),
        ] {
            match v {
                Some(0) => return Err(Error::config(path, key, "must be at least 1")),
                Some(n) if n > max => {
                    return Err(Error::config(path, key, format!("{n} is more than the limit {max}")))
                }
                _ => {}
            }
        }
        if self.world_size == 0 || self.world_size > MAX_WORLD_SIZE {
            return Err(Error::config(path, "world_size", format!("{}: 1 to {MAX_WORLD_SIZE}", self.world_size)));
        }
        if let Some(tp) = self.tp_size.filter(|&tp| tp != self.world_size) {
            return Err(Error::config(
                path,
                "tp_size",
                format!(
                    "{tp} differs from world_size = {}: tensor parallelism over all ranks is what is built",
                    self.world_size
                ),
            ));
        }
        if self.ep_size == 0 || !self.world_size.is_multiple_of(self.ep_size) {
            return Err(Error::config(
                path,
                "ep_size",
                format!("{} does not divide world_size = {}", self.ep_size, self.world_size),
            ));
        }
        if self.rank >= self.world_size {
            return Err(Error::config(
                path,
                "rank",
                format!("{} is not below world_size = {}", self.rank, self.world_size),
            ));
        }
        crate::transform::check_config(&self.transforms).map_err(|(key, msg)| Error::config(path, key, msg))?;
        self.kernels.check().map_err(|(key, msg)| Error::config(path, key, msg))?;
        // Each table names a known backend and sets only options it declares.
        for (name, table) in &self.attention_backends {
            let key = format!("attention_backends.{name}");
            let declared = crate::registry::attention_backend_declared_options(name)
                .map_err(|e| Error::config(path, key.clone(), e.to_string()))?;
            crate::transform::check_options(&key, &format!("attention backend `{name}`"), declared, table)
                .map_err(|(key, msg)| Error::config(path, key, msg))?;
        }
        if let Some(r) = self.free_mem_ratio {
            if !(r > 0.0 && r <= 1.0) {
                return Err(Error::config(path, "free_mem_ratio", format!("{r} is outside (0, 1]")));
            }
        }
        if let Err(Error::Input { input, msg }) = self.sampling(None).validate() {
            return Err(Error::config(path, input, msg));
        }
        for (i, p) in self.prompts.iter().enumerate() {
            let given = [p.token_ids.is_some(), p.text.is_some(), p.messages.is_some()].iter().filter(|&&b| b).count();
            if given != 1 {
                return Err(Error::config(
                    path,
                    format!("prompts[{i}]"),
                    "give exactly one of token_ids, text, messages",
                ));
            }
            if let Some(m) = &p.messages {
                if m.is_empty() {
                    return Err(Error::config(path, format!("prompts[{i}].messages"), "is empty"));
                }
            }
            let Some(ids) = &p.token_ids else { continue };
            if ids.is_empty() {
                return Err(Error::config(path, format!("prompts[{i}].token_ids"), "is empty"));
            }
            if ids.len() > self.max_seq_len {
                return Err(Error::config(
                    path,
                    format!("prompts[{i}].token_ids"),
                    format!("{} tokens exceed max_seq_len = {}", ids.len(), self.max_seq_len),
                ));
            }
            if let Err(Error::Input { input, msg }) = self.sampling(Some(p)).validate() {
                return Err(Error::config(path, format!("prompts[{i}].{input}"), msg));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PipelineConfig> {
        let dir = std::env::temp_dir().join(format!("adcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{:x}.toml", text.len() * 7919 + text.bytes().map(|b| b as usize).sum::<usize>()));
        std::fs::write(&p, text).unwrap();
        PipelineConfig::from_file(&p)
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = parse("model = \"m\"\n").unwrap();
        assert_eq!((c.dtype(), c.compile_backend.as_str(), c.max_batch_size), (None, "simple", 8));
        let e = parse("model = \"m\"\nmodle = 1\n").unwrap_err().to_string();
        assert!(e.contains("modle"), "{e}");
        let e = parse("model = \"m\"\ndtype = \"int8\"\n").unwrap_err().to_string();
        assert!(e.contains("dtype") && e.contains("int8"), "{e}");
        let e = parse("model = \"m\"\n[transforms.fuse_gemms]\nenabled = true\n").unwrap_err().to_string();
        assert!(e.contains("transforms.fuse_gemms"), "{e}");
        let e = parse("model = \"m\"\n[[prompts]]\ntoken_ids = []\n").unwrap_err().to_string();
        assert!(e.contains("prompts[0].token_ids"), "{e}");
        let e = parse("model = \"m\"\nmax_new_tokens = 0\n").unwrap_err().to_string();
        assert!(e.contains("key `max_new_tokens`"), "{e}");
        let e = parse("model = \"m\"\n[[prompts]]\ntoken_ids = [1]\ntop_p = 1.5\n").unwrap_err().to_string();
        assert!(e.contains("prompts[0].top_p") && e.contains("(0, 1]"), "{e}");
        let e = parse("model = \"m\"\nmax_seq_len = 2\n[[prompts]]\ntoken_ids = [1, 2, 3]\n").unwrap_err().to_string();
        assert!(e.contains("prompts[0].token_ids") && e.contains("max_seq_len = 2"), "{e}");
        // CUDA asked for where there is none (CI): the message says why and names the CPU
        // option; `auto` falls back to the CPU.
        if autodeploy_kernels::cuda::probe(0).is_err() {
            let e = parse("model = \"m\"\ndevice = \"cuda:0\"\n").unwrap_err().to_string();
            assert!(e.contains("key `device`") && e.contains("device = \"cpu\""), "{e}");
            assert_eq!(parse("model = \"m\"\n").unwrap().resolved_device(), Device::Cpu);
        }
        let e = parse("model = \"m\"\ndevice = \"gpu\"\n").unwrap_err().to_string();
        assert!(e.contains("cpu, cuda, cuda:N"), "{e}");
        let e = parse("model = \"m\"\ncuda_graph_batch_sizes = [0]\n").unwrap_err().to_string();
        assert!(e.contains("cuda_graph_batch_sizes"), "{e}");
        let c = parse("model = \"m\"\nmax_batch_size = 12\n").unwrap();
        assert_eq!(c.cuda_graph_batch_sizes(), vec![1, 2, 4, 8, 12]);
        let e = parse("model = \"m\"\nload_format = \"pt\"\n").unwrap_err().to_string();
        assert!(e.contains("load_format") && e.contains("dummy"), "{e}");
    }
}
