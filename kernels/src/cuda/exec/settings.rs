//! The CUDA executor's kernel choices: the `[kernels]` section of a pipeline config, read once
//! when the GPU is opened. Each has an `AUTODEPLOY_*` variable that overrides it, for
//! experiments (docs/developing.md lists them with what each was measured to do).

use serde::{Deserialize, Serialize};

/// Kernel choices for the CUDA executor; the defaults are what measured fastest on an H200
/// (BENCHMARKS.md). Unknown keys and values outside each field's set are refused by name.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelSettings {
    /// Programmatic dependent launch on sm_90+: a kernel may start while the one before it
    /// drains (`AUTODEPLOY_PDL=0` turns it off).
    pub pdl: bool,
    /// Bytes of each weight row the decode GEMVs ask L2 for ahead (`AUTODEPLOY_PREFETCH_ROW`).
    pub prefetch_row: usize,
    /// Prefill attention on tensor cores where it applies (`AUTODEPLOY_PREFILL_TC=0`: CUDA cores).
    pub prefill_tensor_cores: bool,
    /// That tensor-core prefill takes a GQA group's query heads together: a block of up to 8
    /// warps, one a head, stages each 16 positions' K and V once for all of them and loads the
    /// next 16 while they compute (`AUTODEPLOY_PREFILL_GROUP=0`: one warp a block). On since
    /// session 38 (with `mixed_step_split_decodes`, FP8 offline at 1,024 sequences 7% faster).
    pub prefill_group_heads: bool,
    /// `flashinfer` runs a mixed step's decodes (the runtime queues them first) through the
    /// split-KV decode and its prompt chunks through the tensor-core prefill, instead of every
    /// token through the prefill, where a decode is a tile of one row
    /// (`AUTODEPLOY_MIXED_SPLIT=0`: every token through the prefill). On since session 38.
    pub mixed_step_split_decodes: bool,
    /// Warps a weight row in the one-row decode GEMV: 1, 2 or 4 (`AUTODEPLOY_GEMV_SPLIT`).
    pub gemv_split: usize,
    /// Warps an output in the fused gate/up + SwiGLU GEMV: 1, 2 or 4 (`AUTODEPLOY_SWIGLU_SPLIT`).
    pub swiglu_split: usize,
    /// Positions a warp takes a pass in the split-KV decode's latency build: 4 or 8
    /// (`AUTODEPLOY_ATTN_U`).
    pub attn_positions_per_pass: usize,
    /// `flashinfer` runs steps of at most 4 decode tokens through the split-KV decode's latency
    /// build (RoPE, the KV write and attention in one launch, CUDA cores, a block a query head)
    /// (`AUTODEPLOY_DECODE_LATENCY=0`: through `rope_write_kv` and the throughput build, on
    /// tensor cores where it applies, a GQA group a block, as larger steps run).
    pub decode_latency_build: bool,
    /// The split-KV decode's throughput build takes a GQA group's query heads together
    /// (`AUTODEPLOY_ATTN_GROUP=0`: one head a block).
    pub attn_group_heads: bool,
    /// The split-KV decode's throughput build on tensor cores where it applies (bf16, plain
    /// causal scores, head dim in `PREFILL_TC_DIMS`, a GQA group of at most 8 heads, sm_80+):
    /// the group's heads as the N side of its MMAs (`AUTODEPLOY_DECODE_TC=0`: the CUDA-core
    /// grouped build).
    pub decode_tensor_cores: bool,
    /// That tensor-core build loads its K and Vᵀ fragments with `ldmatrix` (one instruction a
    /// k-step for each) instead of 32-bit and 16-bit shared loads (`AUTODEPLOY_DECODE_LDSM=1`).
    /// Off: no faster on an H100 (BENCHMARKS.md, session 34).
    pub decode_ldmatrix: bool,
    /// Over an FP8 cache, that tensor-core build makes its MMA fragments straight from the
    /// cached codes (cp.async into shared memory, two passes a warp in flight, one `cvt` to f16
    /// for two codes, f16 MMAs) instead of converting each pass's codes to bf16 tiles
    /// (`AUTODEPLOY_DECODE_FP8_CODES=0`: the bf16 tiles).
    pub decode_fp8_codes: bool,
    /// Token-expert slots an expert, on average, from which `torch_moe` runs its grouped kernels
    /// (each chosen expert read once for all its slots) instead of one warp a slot's row
    /// (`AUTODEPLOY_MOE_GROUPED`).
    pub moe_grouped_min: usize,
    /// FP8 decode GEMVs on tensor cores (sm_89+), the activations quantized as they load
    /// (`AUTODEPLOY_FP8_TC=0`: the CUDA-core GEMV after a separate quantizing kernel).
    pub fp8_gemv_tensor_cores: bool,
    /// NVFP4 decode GEMVs (1-8 rows, bf16 activations) on tensor cores (sm_80+): each code made
    /// its bf16 value times its block scale by byte permutes, `mma.m16n8k16` bf16
    /// (`AUTODEPLOY_NVFP4_TC=0`: the CUDA-core GEMV). On an H200 the 8B NVFP4 batch-1 step took
    /// 2.79 ms with it, 4.71 without (BENCHMARKS.md, session 32).
    pub nvfp4_gemv_tensor_cores: bool,
    /// FP8 linears of more than 8 rows (prefill, large batches) with bf16 activations on
    /// cuBLASLt's FP8 tensor-core GEMM (sm_89+) instead of dequantizing the weight and running a
    /// bf16 GEMM (`AUTODEPLOY_FP8_LT=0`: the dequantizing path). On an H200 the 8B FP8 offline
    /// run (1,000 requests, 128/128) made 10,306 output tok/s with it, 3,963 without.
    pub fp8_gemm_cublaslt: bool,
    /// On that path, cuBLASLt applies the scales and writes the bf16 output itself where it has
    /// an algorithm for them (a linear without bias; per-channel or per-row scales through its
    /// outer-vector mode), instead of f32 sums and a separate epilogue kernel
    /// (`AUTODEPLOY_FP8_LT_SCALED=0`: always the epilogue).
    pub fp8_gemm_cublaslt_scales: bool,
    /// On that path, cuBLASLt's fast FP8 accumulation (`CUBLASLT_MATMUL_DESC_FAST_ACCUM`: the
    /// tensor cores' sums without periodic promotion to f32), as `torch._scaled_mm`'s
    /// `use_fast_accum` (`AUTODEPLOY_FP8_FAST_ACCUM=1`). Off: exact f32 sums, until measured.
    pub fp8_gemm_fast_accum: bool,
}

impl Default for KernelSettings {
    fn default() -> Self {
        KernelSettings {
            pdl: true,
            prefetch_row: 1024,
            prefill_tensor_cores: true,
            prefill_group_heads: true,
            mixed_step_split_decodes: true,
            gemv_split: 2,
            swiglu_split: 4,
            attn_positions_per_pass: 4,
            decode_latency_build: true,
            attn_group_heads: true,
            decode_tensor_cores: true,
            decode_ldmatrix: false,
            decode_fp8_codes: true,
            moe_grouped_min: 4,
            fp8_gemv_tensor_cores: true,
            nvfp4_gemv_tensor_cores: true,
            fp8_gemm_cublaslt: true,
            fp8_gemm_cublaslt_scales: true,
            fp8_gemm_fast_accum: false,
        }
    }
}

/// Each setting, its environment override, and the values it takes.
const ENV: [(&str, &str); 19] = [
    ("pdl", "AUTODEPLOY_PDL"),
    ("prefetch_row", "AUTODEPLOY_PREFETCH_ROW"),
    ("prefill_tensor_cores", "AUTODEPLOY_PREFILL_TC"),
    ("prefill_group_heads", "AUTODEPLOY_PREFILL_GROUP"),
    ("mixed_step_split_decodes", "AUTODEPLOY_MIXED_SPLIT"),
    ("gemv_split", "AUTODEPLOY_GEMV_SPLIT"),
    ("swiglu_split", "AUTODEPLOY_SWIGLU_SPLIT"),
    ("attn_positions_per_pass", "AUTODEPLOY_ATTN_U"),
    ("decode_latency_build", "AUTODEPLOY_DECODE_LATENCY"),
    ("attn_group_heads", "AUTODEPLOY_ATTN_GROUP"),
    ("decode_tensor_cores", "AUTODEPLOY_DECODE_TC"),
    ("decode_ldmatrix", "AUTODEPLOY_DECODE_LDSM"),
    ("decode_fp8_codes", "AUTODEPLOY_DECODE_FP8_CODES"),
    ("moe_grouped_min", "AUTODEPLOY_MOE_GROUPED"),
    ("fp8_gemv_tensor_cores", "AUTODEPLOY_FP8_TC"),
    ("nvfp4_gemv_tensor_cores", "AUTODEPLOY_NVFP4_TC"),
    ("fp8_gemm_cublaslt", "AUTODEPLOY_FP8_LT"),
    ("fp8_gemm_cublaslt_scales", "AUTODEPLOY_FP8_LT_SCALED"),
    ("fp8_gemm_fast_accum", "AUTODEPLOY_FP8_FAST_ACCUM"),
];

impl KernelSettings {
    /// Checks each value against its set; the error names the key (`kernels.gemv_split`).
    pub fn check(&self) -> Result<(), (String, String)> {
        let one_of = |key: &str, v: usize, set: &[usize]| {
            if set.contains(&v) {
                Ok(())
            } else {
                Err((format!("kernels.{key}"), format!("{v} is not one of {set:?}")))
            }
        };
        one_of("gemv_split", self.gemv_split, &[1, 2, 4])?;
        one_of("swiglu_split", self.swiglu_split, &[1, 2, 4])?;
        one_of("attn_positions_per_pass", self.attn_positions_per_pass, &[4, 8])?;
        if !(1..=1024).contains(&self.moe_grouped_min) {
            return Err(("kernels.moe_grouped_min".into(), format!("{}; 1 to 1024", self.moe_grouped_min)));
        }
        if self.prefetch_row > 1 << 16 {
            return Err(("kernels.prefetch_row".into(), format!("{} bytes; at most 65536", self.prefetch_row)));
        }
        Ok(())
    }

    /// These settings with any `AUTODEPLOY_*` override applied (each one logged): experiments
    /// change a knob without editing the config. A value an override cannot take is ignored
    /// with a warning.
    pub fn with_env_overrides(&self) -> KernelSettings {
        self.with_overrides(|k| std::env::var(k).ok())
    }

    fn with_overrides(&self, var: impl Fn(&str) -> Option<String>) -> KernelSettings {
        let mut s = self.clone();
        for (key, env) in ENV {
            let Some(v) = var(env) else { continue };
            let flag = v != "0";
            let num = v.parse::<usize>().ok();
            let split = num.filter(|n| [1, 2, 4].contains(n));
            let ok = match key {
                "pdl" => {
                    s.pdl = flag;
                    true
                }
                "prefill_tensor_cores" => {
                    s.prefill_tensor_cores = flag;
                    true
                }
                "prefill_group_heads" => {
                    s.prefill_group_heads = flag;
                    true
                }
                "mixed_step_split_decodes" => {
                    s.mixed_step_split_decodes = flag;
                    true
                }
                "attn_group_heads" => {
                    s.attn_group_heads = flag;
                    true
                }
                "decode_latency_build" => {
                    s.decode_latency_build = flag;
                    true
                }
                "decode_tensor_cores" => {
                    s.decode_tensor_cores = flag;
                    true
                }
                "decode_ldmatrix" => {
                    s.decode_ldmatrix = flag;
                    true
                }
                "decode_fp8_codes" => {
                    s.decode_fp8_codes = flag;
                    true
                }
                "fp8_gemv_tensor_cores" => {
                    s.fp8_gemv_tensor_cores = flag;
                    true
                }
                "nvfp4_gemv_tensor_cores" => {
                    s.nvfp4_gemv_tensor_cores = flag;
                    true
                }
                "fp8_gemm_cublaslt" => {
                    s.fp8_gemm_cublaslt = flag;
                    true
                }
                "fp8_gemm_cublaslt_scales" => {
                    s.fp8_gemm_cublaslt_scales = flag;
                    true
                }
                "fp8_gemm_fast_accum" => {
                    s.fp8_gemm_fast_accum = flag;
                    true
                }
                "prefetch_row" => num.map(|n| s.prefetch_row = n).is_some(),
                "gemv_split" => split.map(|n| s.gemv_split = n).is_some(),
                "swiglu_split" => split.map(|n| s.swiglu_split = n).is_some(),
                "moe_grouped_min" => num.filter(|n| (1..=1024).contains(n)).map(|n| s.moe_grouped_min = n).is_some(),
                _ => num.filter(|n| [4, 8].contains(n)).map(|n| s.attn_positions_per_pass = n).is_some(),
            };
            if ok {
                tracing::warn!("{env}={v} overrides [kernels] {key}");
            } else {
                tracing::warn!("{env}={v} ignored: not a value [kernels] {key} takes");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_check_and_overrides_apply() {
        let d = KernelSettings::default();
        assert!(d.check().is_ok());
        let bad = KernelSettings { gemv_split: 3, ..d.clone() };
        assert_eq!(bad.check().unwrap_err().0, "kernels.gemv_split");
        let env = |k: &str| match k {
            "AUTODEPLOY_PDL" => Some("0".to_string()),
            "AUTODEPLOY_GEMV_SPLIT" => Some("4".to_string()),
            "AUTODEPLOY_SWIGLU_SPLIT" => Some("3".to_string()), // not a value it takes: ignored
            "AUTODEPLOY_DECODE_LATENCY" => Some("0".to_string()),
            _ => None,
        };
        let s = d.with_overrides(env);
        assert_eq!((s.pdl, s.gemv_split, s.swiglu_split, s.prefetch_row), (false, 4, 4, 1024));
        assert!(d.decode_latency_build && !s.decode_latency_build);
        // From TOML, by the names the config uses; unknown keys are refused.
        let t: KernelSettings = toml::from_str("gemv_split = 1\nattn_group_heads = false").unwrap();
        assert_eq!((t.gemv_split, t.attn_group_heads, t.swiglu_split), (1, false, 4));
        assert!(toml::from_str::<KernelSettings>("gemv_splt = 1").unwrap_err().to_string().contains("gemv_splt"));
    }
}
