//! CUDA kernels: CUDA C sources compiled at first use by NVRTC for the device's architecture and
//! cached on disk, keyed by source hash, architecture and NVRTC version. `cudarc` loads the
//! driver and NVRTC libraries at run time, so the same binary runs where there is no GPU.

pub mod blas;
pub mod exec;
pub mod nccl;

pub use cudarc;

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// Helpers every source includes (dtype conversions, block reductions).
const COMMON: &str = include_str!("common.cuh");

/// Every kernel source: (module name, CUDA C, entry points).
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "elementwise",
        include_str!("elementwise.cu"),
        &[
            "rmsnorm_residual_f32",
            "rmsnorm_residual_bf16",
            "silu_mul_f32",
            "silu_mul_bf16",
            "embedding_f32",
            "embedding_bf16",
            "rope_f32",
            "rope_bf16",
        ],
    ),
    ("sampling", include_str!("sampling.cu"), &["argmax_rows_f32"]),
    (
        "quant",
        include_str!("quant.cu"),
        &[
            "e4m3_codes_f32",
            "e4m3_codes_bf16",
            "e4m3_codes_rows_f32",
            "e4m3_codes_rows_bf16",
            "e4m3_bytes_rows_bf16",
            "fp8_values_f32",
            "fp8_values_bf16",
            "nvfp4_values_f32",
            "nvfp4_values_bf16",
            "lowbit_epilogue_f32",
            "lowbit_epilogue_bf16",
            "gemv_fp8_m1_f32",
            "gemv_fp8_m2_f32",
            "gemv_fp8_m4_f32",
            "gemv_fp8_m8_f32",
            "gemv_fp8_m1_bf16",
            "gemv_fp8_m2_bf16",
            "gemv_fp8_m4_bf16",
            "gemv_fp8_m8_bf16",
            "gemv_nvfp4_m1_f32",
            "gemv_nvfp4_m2_f32",
            "gemv_nvfp4_m4_f32",
            "gemv_nvfp4_m8_f32",
            "gemv_nvfp4_m1_bf16",
            "gemv_nvfp4_m2_bf16",
            "gemv_nvfp4_m4_bf16",
            "gemv_nvfp4_m8_bf16",
            "gemv_fp8_tc_m1_f32",
            "gemv_fp8_tc_m2_f32",
            "gemv_fp8_tc_m4_f32",
            "gemv_fp8_tc_m8_f32",
            "gemv_fp8_tc_m1_bf16",
            "gemv_fp8_tc_m2_bf16",
            "gemv_fp8_tc_m4_bf16",
            "gemv_fp8_tc_m8_bf16",
            "gemv_fp8_tc_gated_m1_f32",
            "gemv_fp8_tc_gated_m2_f32",
            "gemv_fp8_tc_gated_m4_f32",
            "gemv_fp8_tc_gated_m8_f32",
            "gemv_fp8_tc_gated_m1_bf16",
            "gemv_fp8_tc_gated_m2_bf16",
            "gemv_fp8_tc_gated_m4_bf16",
            "gemv_fp8_tc_gated_m8_bf16",
            "gemv_nvfp4_tc_m1_bf16",
            "gemv_nvfp4_tc_m2_bf16",
            "gemv_nvfp4_tc_m4_bf16",
            "gemv_nvfp4_tc_m8_bf16",
            "gemv_nvfp4_tc_gated_m1_bf16",
            "gemv_nvfp4_tc_gated_m2_bf16",
            "gemv_nvfp4_tc_gated_m4_bf16",
            "gemv_nvfp4_tc_gated_m8_bf16",
        ],
    ),
    ("sample", include_str!("sample.cu"), &["sample_rows"]),
    (
        "graph",
        concat!(include_str!("codes.cuh"), include_str!("graph.cu")),
        &[
            "copy_strided",
            "binary",
            "unary",
            "fill_uniform",
            "fill_const",
            "mean_last",
            "rmsnorm",
            "layer_norm",
            "rope",
            "silu_mul",
            "silu_mul_bf16x8",
            "embedding_rows",
            "index_select",
            "argmax_partial",
            "argmax_final",
            "gemv_bf16_m1",
            "gemv_bf16_m2",
            "gemv_bf16_m4",
            "gemv_bf16_m8",
            "gemv_bf16_m1_s2",
            "gemv_bf16_m1_s4",
            "rmsnorm_bf16x8",
            "gemv_swiglu_bf16",
            "gemv_swiglu_bf16_s2",
            "gemv_swiglu_bf16_s4",
        ],
    ),
    (
        "moe",
        concat!(include_str!("codes.cuh"), include_str!("moe.cu")),
        &[
            "moe_route",
            "moe_gate_up",
            "moe_down",
            "moe_combine",
            "moe_gate_up_bf16",
            "moe_down_bf16",
            "moe_group",
            "moe_gate_up_grouped_bf16",
            "moe_down_grouped_bf16",
            "moe_router_route_bf16",
        ],
    ),
    (
        "attention",
        concat!(include_str!("attention.cuh"), include_str!("attention.cu")),
        &[
            "write_kv_f32",
            "write_kv_bf16",
            "paged_attention_d16_f32",
            "paged_attention_d32_f32",
            "paged_attention_d64_f32",
            "paged_attention_d96_f32",
            "paged_attention_d128_f32",
            "paged_attention_d256_f32",
            "paged_attention_g32_f32",
            "paged_attention_g64_f32",
            "paged_attention_g128_f32",
            "paged_attention_g256_f32",
            "paged_attention_d16_bf16",
            "paged_attention_d32_bf16",
            "paged_attention_d64_bf16",
            "paged_attention_d96_bf16",
            "paged_attention_d128_bf16",
            "paged_attention_d256_bf16",
            "paged_attention_g32_bf16",
            "paged_attention_g64_bf16",
            "paged_attention_g128_bf16",
            "paged_attention_g256_bf16",
            "slot_attention_d16_f32",
            "slot_attention_d32_f32",
            "slot_attention_d64_f32",
            "slot_attention_d96_f32",
            "slot_attention_d128_f32",
            "slot_attention_d256_f32",
            "slot_attention_g32_f32",
            "slot_attention_g64_f32",
            "slot_attention_g128_f32",
            "slot_attention_g256_f32",
            "slot_attention_d16_bf16",
            "slot_attention_d32_bf16",
            "slot_attention_d64_bf16",
            "slot_attention_d96_bf16",
            "slot_attention_d128_bf16",
            "slot_attention_d256_bf16",
            "slot_attention_g32_bf16",
            "slot_attention_g64_bf16",
            "slot_attention_g128_bf16",
            "slot_attention_g256_bf16",
            "rope_write_kv_f32",
            "rope_write_kv_bf16",
            "rope_norm_write_kv_f32",
            "rope_norm_write_kv_bf16",
            "paged_prefill_tc_d32_bf16",
            "paged_prefill_tc_d64_bf16",
            "paged_prefill_tc_d96_bf16",
            "paged_prefill_tc_d128_bf16",
            "paged_prefill_tc_grp_d32_bf16",
            "paged_prefill_tc_grp_d64_bf16",
            "paged_prefill_tc_grp_d96_bf16",
            "paged_prefill_tc_grp_d128_bf16",
        ],
    ),
    (
        // attention.cu's builds over an FP8 KV cache (E4M3 codes, a scale each for K and V),
        // a module of their own so NVRTC compiles them beside the others.
        "attention_fp8kv",
        concat!("#define KV_FP8_BUILDS 1\n", include_str!("attention.cuh"), include_str!("attention.cu")),
        &[
            "write_kv_f32_fp8kv",
            "paged_attention_d16_f32_fp8kv",
            "paged_attention_d32_f32_fp8kv",
            "paged_attention_d64_f32_fp8kv",
            "paged_attention_d96_f32_fp8kv",
            "paged_attention_d128_f32_fp8kv",
            "paged_attention_d256_f32_fp8kv",
            "paged_attention_g32_f32_fp8kv",
            "paged_attention_g64_f32_fp8kv",
            "paged_attention_g128_f32_fp8kv",
            "paged_attention_g256_f32_fp8kv",
            "slot_attention_d16_f32_fp8kv",
            "slot_attention_d32_f32_fp8kv",
            "slot_attention_d64_f32_fp8kv",
            "slot_attention_d96_f32_fp8kv",
            "slot_attention_d128_f32_fp8kv",
            "slot_attention_d256_f32_fp8kv",
            "slot_attention_g32_f32_fp8kv",
            "slot_attention_g64_f32_fp8kv",
            "slot_attention_g128_f32_fp8kv",
            "slot_attention_g256_f32_fp8kv",
            "rope_write_kv_f32_fp8kv",
            "rope_norm_write_kv_f32_fp8kv",
            "write_kv_bf16_fp8kv",
            "paged_attention_d16_bf16_fp8kv",
            "paged_attention_d32_bf16_fp8kv",
            "paged_attention_d64_bf16_fp8kv",
            "paged_attention_d96_bf16_fp8kv",
            "paged_attention_d128_bf16_fp8kv",
            "paged_attention_d256_bf16_fp8kv",
            "paged_attention_g32_bf16_fp8kv",
            "paged_attention_g64_bf16_fp8kv",
            "paged_attention_g128_bf16_fp8kv",
            "paged_attention_g256_bf16_fp8kv",
            "slot_attention_d16_bf16_fp8kv",
            "slot_attention_d32_bf16_fp8kv",
            "slot_attention_d64_bf16_fp8kv",
            "slot_attention_d96_bf16_fp8kv",
            "slot_attention_d128_bf16_fp8kv",
            "slot_attention_d256_bf16_fp8kv",
            "slot_attention_g32_bf16_fp8kv",
            "slot_attention_g64_bf16_fp8kv",
            "slot_attention_g128_bf16_fp8kv",
            "slot_attention_g256_bf16_fp8kv",
            "rope_write_kv_bf16_fp8kv",
            "rope_norm_write_kv_bf16_fp8kv",
            "paged_prefill_tc_d32_bf16_fp8kv",
            "paged_prefill_tc_d64_bf16_fp8kv",
            "paged_prefill_tc_d96_bf16_fp8kv",
            "paged_prefill_tc_d128_bf16_fp8kv",
            "paged_prefill_tc_grp_d32_bf16_fp8kv",
            "paged_prefill_tc_grp_d64_bf16_fp8kv",
            "paged_prefill_tc_grp_d96_bf16_fp8kv",
            "paged_prefill_tc_grp_d128_bf16_fp8kv",
        ],
    ),
    (
        // decode.cu's split-KV decode builds (and decode_tc.cu's tensor-core one) over a cache
        // in the model's dtype.
        "decode",
        concat!(include_str!("attention.cuh"), include_str!("decode.cu"), include_str!("decode_tc.cu")),
        &[
            "paged_decode_split_d16_f32",
            "paged_decode_split_d32_f32",
            "paged_decode_split_d64_f32",
            "paged_decode_split_d96_f32",
            "paged_decode_split_d128_f32",
            "paged_decode_split_d256_f32",
            "paged_decode_split_g32_f32",
            "paged_decode_split_g64_f32",
            "paged_decode_split_g128_f32",
            "paged_decode_split_g256_f32",
            "paged_decode_split_d16_bf16",
            "paged_decode_split_d32_bf16",
            "paged_decode_split_d64_bf16",
            "paged_decode_split_d96_bf16",
            "paged_decode_split_d128_bf16",
            "paged_decode_split_d256_bf16",
            "paged_decode_split_g32_bf16",
            "paged_decode_split_g64_bf16",
            "paged_decode_split_g128_bf16",
            "paged_decode_split_g256_bf16",
            "paged_decode_split_g2_d16_f32",
            "paged_decode_split_g2_d32_f32",
            "paged_decode_split_g2_d64_f32",
            "paged_decode_split_g2_d96_f32",
            "paged_decode_split_g2_d128_f32",
            "paged_decode_split_g2_d256_f32",
            "paged_decode_split_g2_g32_f32",
            "paged_decode_split_g2_g64_f32",
            "paged_decode_split_g2_g128_f32",
            "paged_decode_split_g2_g256_f32",
            "paged_decode_split_g2_d16_bf16",
            "paged_decode_split_g2_d32_bf16",
            "paged_decode_split_g2_d64_bf16",
            "paged_decode_split_g2_d96_bf16",
            "paged_decode_split_g2_d128_bf16",
            "paged_decode_split_g2_d256_bf16",
            "paged_decode_split_g2_g32_bf16",
            "paged_decode_split_g2_g64_bf16",
            "paged_decode_split_g2_g128_bf16",
            "paged_decode_split_g2_g256_bf16",
            "paged_decode_split_g4_d16_f32",
            "paged_decode_split_g4_d32_f32",
            "paged_decode_split_g4_d64_f32",
            "paged_decode_split_g4_d96_f32",
            "paged_decode_split_g4_d128_f32",
            "paged_decode_split_g4_d256_f32",
            "paged_decode_split_g4_g32_f32",
            "paged_decode_split_g4_g64_f32",
            "paged_decode_split_g4_g128_f32",
            "paged_decode_split_g4_g256_f32",
            "paged_decode_split_g4_d16_bf16",
            "paged_decode_split_g4_d32_bf16",
            "paged_decode_split_g4_d64_bf16",
            "paged_decode_split_g4_d96_bf16",
            "paged_decode_split_g4_d128_bf16",
            "paged_decode_split_g4_d256_bf16",
            "paged_decode_split_g4_g32_bf16",
            "paged_decode_split_g4_g64_bf16",
            "paged_decode_split_g4_g128_bf16",
            "paged_decode_split_g4_g256_bf16",
            "paged_decode_split_g8_d16_f32",
            "paged_decode_split_g8_d32_f32",
            "paged_decode_split_g8_d64_f32",
            "paged_decode_split_g8_d96_f32",
            "paged_decode_split_g8_d128_f32",
            "paged_decode_split_g8_d256_f32",
            "paged_decode_split_g8_g32_f32",
            "paged_decode_split_g8_g64_f32",
            "paged_decode_split_g8_g128_f32",
            "paged_decode_split_g8_g256_f32",
            "paged_decode_split_g8_d16_bf16",
            "paged_decode_split_g8_d32_bf16",
            "paged_decode_split_g8_d64_bf16",
            "paged_decode_split_g8_d96_bf16",
            "paged_decode_split_g8_d128_bf16",
            "paged_decode_split_g8_d256_bf16",
            "paged_decode_split_g8_g32_bf16",
            "paged_decode_split_g8_g64_bf16",
            "paged_decode_split_g8_g128_bf16",
            "paged_decode_split_g8_g256_bf16",
            "paged_decode_split_early_d16_f32",
            "paged_decode_split_early_d32_f32",
            "paged_decode_split_early_d64_f32",
            "paged_decode_split_early_d96_f32",
            "paged_decode_split_early_d128_f32",
            "paged_decode_split_early_d256_f32",
            "paged_decode_split_early_g32_f32",
            "paged_decode_split_early_g64_f32",
            "paged_decode_split_early_g128_f32",
            "paged_decode_split_early_g256_f32",
            "paged_decode_split_early_d16_bf16",
            "paged_decode_split_early_d32_bf16",
            "paged_decode_split_early_d64_bf16",
            "paged_decode_split_early_d96_bf16",
            "paged_decode_split_early_d128_bf16",
            "paged_decode_split_early_d256_bf16",
            "paged_decode_split_early_g32_bf16",
            "paged_decode_split_early_g64_bf16",
            "paged_decode_split_early_g128_bf16",
            "paged_decode_split_early_g256_bf16",
            "paged_decode_split_early4_d16_f32",
            "paged_decode_split_early4_d32_f32",
            "paged_decode_split_early4_d64_f32",
            "paged_decode_split_early4_d96_f32",
            "paged_decode_split_early4_d128_f32",
            "paged_decode_split_early4_d256_f32",
            "paged_decode_split_early4_g32_f32",
            "paged_decode_split_early4_g64_f32",
            "paged_decode_split_early4_g128_f32",
            "paged_decode_split_early4_g256_f32",
            "paged_decode_split_early4_d16_bf16",
            "paged_decode_split_early4_d32_bf16",
            "paged_decode_split_early4_d64_bf16",
            "paged_decode_split_early4_d96_bf16",
            "paged_decode_split_early4_d128_bf16",
            "paged_decode_split_early4_d256_bf16",
            "paged_decode_split_early4_g32_bf16",
            "paged_decode_split_early4_g64_bf16",
            "paged_decode_split_early4_g128_bf16",
            "paged_decode_split_early4_g256_bf16",
            "paged_decode_tc_d32_bf16",
            "paged_decode_tc_d64_bf16",
            "paged_decode_tc_d96_bf16",
            "paged_decode_tc_d128_bf16",
            "paged_decode_tc_ldsm_d32_bf16",
            "paged_decode_tc_ldsm_d64_bf16",
            "paged_decode_tc_ldsm_d96_bf16",
            "paged_decode_tc_ldsm_d128_bf16",
        ],
    ),
    (
        // decode.cu's builds over an FP8 KV cache.
        "decode_fp8kv",
        concat!(
            "#define KV_FP8_BUILDS 1\n",
            include_str!("attention.cuh"),
            include_str!("decode.cu"),
            include_str!("decode_tc.cu")
        ),
        &[
            "paged_decode_split_d16_f32_fp8kv",
            "paged_decode_split_d32_f32_fp8kv",
            "paged_decode_split_d64_f32_fp8kv",
            "paged_decode_split_d96_f32_fp8kv",
            "paged_decode_split_d128_f32_fp8kv",
            "paged_decode_split_d256_f32_fp8kv",
            "paged_decode_split_g32_f32_fp8kv",
            "paged_decode_split_g64_f32_fp8kv",
            "paged_decode_split_g128_f32_fp8kv",
            "paged_decode_split_g256_f32_fp8kv",
            "paged_decode_split_g2_d16_f32_fp8kv",
            "paged_decode_split_g2_d32_f32_fp8kv",
            "paged_decode_split_g2_d64_f32_fp8kv",
            "paged_decode_split_g2_d96_f32_fp8kv",
            "paged_decode_split_g2_d128_f32_fp8kv",
            "paged_decode_split_g2_d256_f32_fp8kv",
            "paged_decode_split_g2_g32_f32_fp8kv",
            "paged_decode_split_g2_g64_f32_fp8kv",
            "paged_decode_split_g2_g128_f32_fp8kv",
            "paged_decode_split_g2_g256_f32_fp8kv",
            "paged_decode_split_g4_d16_f32_fp8kv",
            "paged_decode_split_g4_d32_f32_fp8kv",
            "paged_decode_split_g4_d64_f32_fp8kv",
            "paged_decode_split_g4_d96_f32_fp8kv",
            "paged_decode_split_g4_d128_f32_fp8kv",
            "paged_decode_split_g4_d256_f32_fp8kv",
            "paged_decode_split_g4_g32_f32_fp8kv",
            "paged_decode_split_g4_g64_f32_fp8kv",
            "paged_decode_split_g4_g128_f32_fp8kv",
            "paged_decode_split_g4_g256_f32_fp8kv",
            "paged_decode_split_g8_d16_f32_fp8kv",
            "paged_decode_split_g8_d32_f32_fp8kv",
            "paged_decode_split_g8_d64_f32_fp8kv",
            "paged_decode_split_g8_d96_f32_fp8kv",
            "paged_decode_split_g8_d128_f32_fp8kv",
            "paged_decode_split_g8_d256_f32_fp8kv",
            "paged_decode_split_g8_g32_f32_fp8kv",
            "paged_decode_split_g8_g64_f32_fp8kv",
            "paged_decode_split_g8_g128_f32_fp8kv",
            "paged_decode_split_g8_g256_f32_fp8kv",
            "paged_decode_split_early_d16_f32_fp8kv",
            "paged_decode_split_early_d32_f32_fp8kv",
            "paged_decode_split_early_d64_f32_fp8kv",
            "paged_decode_split_early_d96_f32_fp8kv",
            "paged_decode_split_early_d128_f32_fp8kv",
            "paged_decode_split_early_d256_f32_fp8kv",
            "paged_decode_split_early_g32_f32_fp8kv",
            "paged_decode_split_early_g64_f32_fp8kv",
            "paged_decode_split_early_g128_f32_fp8kv",
            "paged_decode_split_early_g256_f32_fp8kv",
            "paged_decode_split_early4_d16_f32_fp8kv",
            "paged_decode_split_early4_d32_f32_fp8kv",
            "paged_decode_split_early4_d64_f32_fp8kv",
            "paged_decode_split_early4_d96_f32_fp8kv",
            "paged_decode_split_early4_d128_f32_fp8kv",
            "paged_decode_split_early4_d256_f32_fp8kv",
            "paged_decode_split_early4_g32_f32_fp8kv",
            "paged_decode_split_early4_g64_f32_fp8kv",
            "paged_decode_split_early4_g128_f32_fp8kv",
            "paged_decode_split_early4_g256_f32_fp8kv",
            "paged_decode_split_d16_bf16_fp8kv",
            "paged_decode_split_d32_bf16_fp8kv",
            "paged_decode_split_d64_bf16_fp8kv",
            "paged_decode_split_d96_bf16_fp8kv",
            "paged_decode_split_d128_bf16_fp8kv",
            "paged_decode_split_d256_bf16_fp8kv",
            "paged_decode_split_g32_bf16_fp8kv",
            "paged_decode_split_g64_bf16_fp8kv",
            "paged_decode_split_g128_bf16_fp8kv",
            "paged_decode_split_g256_bf16_fp8kv",
            "paged_decode_split_g2_d16_bf16_fp8kv",
            "paged_decode_split_g2_d32_bf16_fp8kv",
            "paged_decode_split_g2_d64_bf16_fp8kv",
            "paged_decode_split_g2_d96_bf16_fp8kv",
            "paged_decode_split_g2_d128_bf16_fp8kv",
            "paged_decode_split_g2_d256_bf16_fp8kv",
            "paged_decode_split_g2_g32_bf16_fp8kv",
            "paged_decode_split_g2_g64_bf16_fp8kv",
            "paged_decode_split_g2_g128_bf16_fp8kv",
            "paged_decode_split_g2_g256_bf16_fp8kv",
            "paged_decode_split_g4_d16_bf16_fp8kv",
            "paged_decode_split_g4_d32_bf16_fp8kv",
            "paged_decode_split_g4_d64_bf16_fp8kv",
            "paged_decode_split_g4_d96_bf16_fp8kv",
            "paged_decode_split_g4_d128_bf16_fp8kv",
            "paged_decode_split_g4_d256_bf16_fp8kv",
            "paged_decode_split_g4_g32_bf16_fp8kv",
            "paged_decode_split_g4_g64_bf16_fp8kv",
            "paged_decode_split_g4_g128_bf16_fp8kv",
            "paged_decode_split_g4_g256_bf16_fp8kv",
            "paged_decode_split_g8_d16_bf16_fp8kv",
            "paged_decode_split_g8_d32_bf16_fp8kv",
            "paged_decode_split_g8_d64_bf16_fp8kv",
            "paged_decode_split_g8_d96_bf16_fp8kv",
            "paged_decode_split_g8_d128_bf16_fp8kv",
            "paged_decode_split_g8_d256_bf16_fp8kv",
            "paged_decode_split_g8_g32_bf16_fp8kv",
            "paged_decode_split_g8_g64_bf16_fp8kv",
            "paged_decode_split_g8_g128_bf16_fp8kv",
            "paged_decode_split_g8_g256_bf16_fp8kv",
            "paged_decode_split_early_d16_bf16_fp8kv",
            "paged_decode_split_early_d32_bf16_fp8kv",
            "paged_decode_split_early_d64_bf16_fp8kv",
            "paged_decode_split_early_d96_bf16_fp8kv",
            "paged_decode_split_early_d128_bf16_fp8kv",
            "paged_decode_split_early_d256_bf16_fp8kv",
            "paged_decode_split_early_g32_bf16_fp8kv",
            "paged_decode_split_early_g64_bf16_fp8kv",
            "paged_decode_split_early_g128_bf16_fp8kv",
            "paged_decode_split_early_g256_bf16_fp8kv",
            "paged_decode_split_early4_d16_bf16_fp8kv",
            "paged_decode_split_early4_d32_bf16_fp8kv",
            "paged_decode_split_early4_d64_bf16_fp8kv",
            "paged_decode_split_early4_d96_bf16_fp8kv",
            "paged_decode_split_early4_d128_bf16_fp8kv",
            "paged_decode_split_early4_d256_bf16_fp8kv",
            "paged_decode_split_early4_g32_bf16_fp8kv",
            "paged_decode_split_early4_g64_bf16_fp8kv",
            "paged_decode_split_early4_g128_bf16_fp8kv",
            "paged_decode_split_early4_g256_bf16_fp8kv",
            "paged_decode_tc_d32_bf16_fp8kv",
            "paged_decode_tc_d64_bf16_fp8kv",
            "paged_decode_tc_d96_bf16_fp8kv",
            "paged_decode_tc_d128_bf16_fp8kv",
            "paged_decode_tc_ldsm_d32_bf16_fp8kv",
            "paged_decode_tc_ldsm_d64_bf16_fp8kv",
            "paged_decode_tc_ldsm_d96_bf16_fp8kv",
            "paged_decode_tc_ldsm_d128_bf16_fp8kv",
            "paged_decode_tc_codes_d32_bf16_fp8kv",
            "paged_decode_tc_codes_d64_bf16_fp8kv",
            "paged_decode_tc_codes_d96_bf16_fp8kv",
            "paged_decode_tc_codes_d128_bf16_fp8kv",
        ],
    ),
];

/// Why CUDA cannot be used here, in words a user can act on.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether the NVRTC library can be loaded (it compiles kernels; no GPU needed).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by name.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32), Unavailable> {
    if !nvrtc_available() {
        return Err(Unavailable("the NVRTC library (libnvrtc) was not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and put its lib folder on LD_LIBRARY_PATH".into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); the call writes two ints.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Unavailable(format!("NVRTC did not report its version: {r:?}")));
    }
    Ok((major, minor))
}

/// The full source NVRTC compiles for `module`: the experiment defines of that module (if any),
/// common.cuh, the module's own source.
pub fn full_source(module: &str, src: &str) -> String {
    format!("{}{COMMON}\n{src}", experiment_defines(module))
}

/// Compile-time constants of the kernels that an experiment may set without a rebuild
/// (`AUTODEPLOY_KERNEL_DEFINES="FP8_TC_INFLIGHT=4,NVFP4_TC_INFLIGHT=2"`), each with the values
/// it takes: only constants the kernels read through `#ifndef` and no host code depends on
/// (the warps a block are launch sizes the host must agree with, so they are not here), and the
/// module that reads each. The defines are part of that module's source, so of its kernel cache
/// key: the other modules stay cached.
/// `PDL_TRIGGER_FIRST=1` (common.cuh's `pdl_enter`: every module, `*`) lets each kernel's
/// successor launch before its wait rather than after. `GEMV_HELD` (the one-row bf16 split
/// GEMV) and `DOWN_HELD` (the MoE down rows): how many 16-byte weight chunks a lane loads
/// before its wait. `NORM_CODES_TRIGGER_FIRST` (default 1; 0 waits first): graph.cu's
/// `rmsnorm_bf16x8` writing FP8 codes lets its successor launch before its wait. A constant
/// of every module may be set in one alone: `PDL_TRIGGER_FIRST@quant=1` (`NAME@module`, a
/// module of `RAW_MODULES`).
const DEFINABLE: [(&str, &str, u32, u32); 6] = [
    ("quant", "FP8_TC_INFLIGHT", 1, 8),
    ("graph", "NORM_CODES_TRIGGER_FIRST", 0, 1),
    ("quant", "NVFP4_TC_INFLIGHT", 1, 4),
    ("*", "PDL_TRIGGER_FIRST", 1, 1),
    ("graph", "GEMV_HELD", 0, 8),
    ("moe", "DOWN_HELD", 0, 8),
];

fn experiment_defines(module: &str) -> String {
    defines_for(module, all_experiment_defines())
}

/// The lines of `defines` (`parse_defines`' text) that `module` reads: those of its constants
/// and of every module's, less those meant for another module alone (`@module #define ...`).
fn defines_for(module: &str, defines: &str) -> String {
    let mine = |line: &str| -> Option<String> {
        let (only, def) = match line.strip_prefix('@').and_then(|l| l.split_once(' ')) {
            Some((m, def)) => (Some(m), def),
            None => (None, line),
        };
        let name = def.split(' ').nth(1)?;
        let listed = DEFINABLE.iter().any(|&(m, n, ..)| (m == module || m == "*") && n == name);
        (listed && only.is_none_or(|m| m == module)).then(|| format!("{def}\n"))
    };
    defines.lines().filter_map(mine).collect()
}

fn all_experiment_defines() -> &'static str {
    static DEFINES: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DEFINES.get_or_init(|| {
        let Ok(v) = std::env::var("AUTODEPLOY_KERNEL_DEFINES") else { return String::new() };
        let (text, refused) = parse_defines(&v);
        for r in refused {
            tracing::warn!(
                "AUTODEPLOY_KERNEL_DEFINES: `{r}` ignored: not NAME=VALUE or NAME@MODULE=VALUE with NAME, VALUE and MODULE one of {DEFINABLE:?}"
            );
        }
        if !text.is_empty() {
            tracing::warn!("AUTODEPLOY_KERNEL_DEFINES: kernels compiled with {}", text.trim().replace('\n', "; "));
        }
        text
    })
}

/// `#define` lines for the `NAME=VALUE` items of a comma-separated list that `DEFINABLE`
/// allows, and the items it does not.
fn parse_defines(v: &str) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut refused = Vec::new();
    for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let ok = item.split_once('=').and_then(|(name, val)| {
            let val: u32 = val.trim().parse().ok()?;
            // `NAME@module`: that module alone (one that reads it).
            let (name, only) = match name.trim().split_once('@') {
                Some((n, m)) => (n, Some(m)),
                None => (name.trim(), None),
            };
            let fits = |&&(m, n, lo, hi): &&(&str, &str, u32, u32)| {
                n == name
                    && (lo..=hi).contains(&val)
                    && only.is_none_or(|o| RAW_MODULES.contains(&o) && (m == "*" || m == o))
            };
            DEFINABLE.iter().any(|d| fits(&d)).then(|| match only {
                Some(o) => format!("@{o} #define {name} {val}\n"),
                None => format!("#define {name} {val}\n"),
            })
        });
        match ok {
            Some(line) => text.push_str(&line),
            None => refused.push(item.to_string()),
        }
    }
    (text, refused)
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AUTODEPLOY_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("autodeploy").join("kernels")
}

/// FNV-1a, enough to key a cache by content.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Where the PTX of `module`'s source for `arch` is cached (keyed by the full source, the arch
/// and the NVRTC version).
fn ptx_path(module: &str, src: &str, arch: &str) -> Result<std::path::PathBuf, Unavailable> {
    let (major, minor) = nvrtc_version()?;
    let key = fnv(&[full_source(module, src).as_bytes(), arch.as_bytes(), format!("{major}.{minor}").as_bytes()]);
    Ok(cache_dir().join(format!("{module}-{arch}-{key:016x}.ptx")))
}

/// PTX for `module`'s source, compiled for `arch` (`sm_90`): from the disk cache when this
/// source, arch and NVRTC version were compiled before, else by NVRTC (then cached).
pub fn compile(module: &str, src: &str, arch: &'static str) -> Result<(Ptx, bool), Unavailable> {
    // `attention_fp8kv` is attention.cu compiled with KV_FP8_BUILDS (`decode_fp8kv` decode.cu).
    let file = module.strip_suffix("_fp8kv").unwrap_or(module);
    compile_labeled(module, &format!("kernels/src/cuda/{file}.cu"), src, arch)
}

/// Every module of `SOURCES` for `arch`, compiled or read from the disk cache, in `SOURCES`'
/// order: NVRTC compiles distinct programs on separate threads, so a first run takes about as
/// long as the largest module instead of the sum of all. `done(module, compiled)` is called as
/// each is ready.
pub fn compile_all(arch: &'static str, done: &(dyn Fn(&str, bool) + Sync)) -> Result<Vec<Ptx>, Unavailable> {
    std::thread::scope(|scope| {
        let jobs: Vec<_> = SOURCES
            .iter()
            .map(|&(m, src, _)| {
                scope.spawn(move || {
                    let r = compile(m, src, arch);
                    if let Ok((_, cached)) = &r {
                        done(m, !cached);
                    }
                    r
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().map_err(|_| Unavailable("an NVRTC compile thread panicked".into()))?.map(|(ptx, _)| ptx))
            .collect()
    })
}

/// As `compile`, for source from elsewhere (a plugin's), `what` naming it in errors; cached
/// under `module` (a file-name-safe label).
pub fn compile_labeled(module: &str, what: &str, src: &str, arch: &'static str) -> Result<(Ptx, bool), Unavailable> {
    let path = ptx_path(module, src, arch)?;
    let full = full_source(module, src);
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok((Ptx::from_src(text), true));
    }
    let opts = CompileOptions { arch: Some(arch), name: Some(format!("{module}.cu")), ..Default::default() };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&full, opts)
        .map_err(|e| Unavailable(format!("NVRTC could not compile {what} for {arch}: {e:?}")))?;
    // Best effort: a cache that cannot be written costs a recompile next time, nothing more.
    if std::fs::create_dir_all(path.parent().expect("has a parent")).is_ok() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, ptx.to_src()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok((ptx, false))
}

/// Whether GPU `ordinal` can be opened (driver present, device exists), without compiling any
/// kernel; `Ok` holds the GPU's name.
pub fn probe(ordinal: usize) -> Result<String, Unavailable> {
    // SAFETY: only tries to dlopen the driver library by name.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Unavailable(
            "no CUDA driver (libcuda) on this machine, so no NVIDIA GPU can be used; set device = \"cpu\"".into(),
        ));
    }
    let count = cudarc::driver::result::init()
        .and_then(|_| cudarc::driver::result::device::get_count())
        .map_err(|e| Unavailable(format!("the CUDA driver did not start ({e:?}); set device = \"cpu\"")))?;
    if ordinal as i32 >= count {
        return Err(Unavailable(format!(
            "cuda:{ordinal} asked for, but this machine has {count} CUDA device(s); set device = \"cpu\" or a smaller index"
        )));
    }
    let dev = cudarc::driver::result::device::get(ordinal as i32)
        .map_err(|e| Unavailable(format!("cuda:{ordinal}: {e:?}; set device = \"cpu\"")))?;
    Ok(cudarc::driver::result::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into()))
}

/// A CUDA device with its kernels loaded.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub name: String,
    /// Compute capability, e.g. (9, 0) for an H100.
    pub cc: (i32, i32),
    pub modules: Vec<(&'static str, Arc<CudaModule>)>,
    /// Modules whose kernels `exec` launches itself (with `cuLaunchKernelEx`, for programmatic
    /// dependent launch): loaded through the driver API, as cudarc keeps its handles private.
    raw: Vec<(&'static str, RawModule)>,
    /// Modules loaded later (plugin ops' CUDA source), kept loaded while the device lives.
    extra: std::sync::Mutex<Vec<RawModule>>,
}

/// The sources `exec::Gpu` launches through raw function handles.
const RAW_MODULES: &[&str] =
    &["graph", "moe", "attention", "attention_fp8kv", "decode", "decode_fp8kv", "sample", "quant"];

/// A module loaded with `cuModuleLoadData`; unloaded on drop.
struct RawModule {
    ctx: Arc<CudaContext>,
    module: cudarc::driver::sys::CUmodule,
}

// SAFETY: a CUmodule handle may be used from any thread with its context bound.
unsafe impl Send for RawModule {}
unsafe impl Sync for RawModule {}

impl RawModule {
    /// Loads a PTX image into `ctx` with `cuModuleLoadData`.
    fn load(ctx: &Arc<CudaContext>, ptx: &Ptx) -> Result<RawModule, String> {
        let text = std::ffi::CString::new(ptx.to_src()).map_err(|e| format!("{e}"))?;
        ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
        // SAFETY: a NUL-terminated PTX image, loaded into the bound context.
        let module = unsafe { cudarc::driver::result::module::load_data(text.as_ptr() as *const _) }
            .map_err(|e| format!("{e:?}"))?;
        Ok(RawModule { ctx: ctx.clone(), module })
    }
}

impl Drop for RawModule {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: loaded by `cuModuleLoadData` in this context; its kernels are not used
            // after the device (which owns every `Gpu` launching them) goes.
            let _ = unsafe { cudarc::driver::result::module::unload(self.module) };
        }
    }
}

/// A kernel's raw handle (from a `RawModule`).
#[derive(Clone, Copy)]
pub struct Kernel(pub cudarc::driver::sys::CUfunction);

// SAFETY: a CUfunction handle may be used from any thread with its context bound.
unsafe impl Send for Kernel {}
unsafe impl Sync for Kernel {}

/// `sm_XY` for a compute capability, as NVRTC names it.
pub fn arch_name(cc: (i32, i32)) -> &'static str {
    Box::leak(format!("sm_{}{}", cc.0, cc.1).into_boxed_str())
}

impl Device {
    /// Opens GPU `ordinal` and loads every kernel module (compiled or from the cache).
    pub fn open(ordinal: usize) -> Result<Device, Unavailable> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| Unavailable(format!("opening cuda:{ordinal}: {e:?}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx.compute_capability().map_err(|e| Unavailable(format!("cuda:{ordinal}: {e:?}")))?;
        let arch = arch_name(cc);
        let (mut modules, mut raw) = (Vec::new(), Vec::new());
        // A first run compiles every module with NVRTC (tens of seconds, the modules in
        // parallel); later ones read the disk cache. The bar shows only when something
        // compiles, and only on a terminal.
        let t0 = std::time::Instant::now();
        let mut missing = 0;
        for (m, src, _) in SOURCES {
            missing += usize::from(!ptx_path(m, src, arch)?.exists());
        }
        let bar = (missing > 0).then(|| {
            let b = indicatif::ProgressBar::new(missing as u64).with_style(
                indicatif::ProgressStyle::with_template("compiling CUDA kernels {bar:30} {pos}/{len} {wide_msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message("with NVRTC");
            b
        });
        let compiled = std::sync::atomic::AtomicUsize::new(0);
        let ptxs = compile_all(arch, &|m, fresh| {
            if fresh {
                compiled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(b) = &bar {
                    b.set_message(format!("{m}.cu done"));
                    b.inc(1);
                }
            }
        })?;
        let compiled = compiled.into_inner();
        for ((m, _, _), ptx) in SOURCES.iter().zip(ptxs) {
            let loading = |e| Unavailable(format!("loading kernels {m} on {name}: {e:?}"));
            if RAW_MODULES.contains(m) {
                raw.push((*m, RawModule::load(&ctx, &ptx).map_err(&loading)?));
            } else {
                modules.push((*m, ctx.load_module(ptx).map_err(|e| loading(format!("{e:?}")))?));
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
            tracing::info!(
                modules = compiled,
                seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
                cache = %cache_dir().display(),
                "compiled CUDA kernels with NVRTC for {arch} (cached for later runs)"
            );
        }
        Ok(Device { ctx, name, cc, modules, raw, extra: Default::default() })
    }

    /// Compiles `src` (the shared helpers prepended; cached on disk as `label`) for this
    /// device, loads it, and returns kernel `entry` of it. `what` names the source in errors.
    pub fn load_source(&self, label: &str, what: &str, src: &str, entry: &str) -> Result<Kernel, Unavailable> {
        let (ptx, _) = compile_labeled(label, what, src, arch_name(self.cc))?;
        let loading = |e: String| Unavailable(format!("loading {what} on {}: {e}", self.name));
        let m = RawModule::load(&self.ctx, &ptx).map_err(loading)?;
        let c = std::ffi::CString::new(entry).map_err(|_| loading(format!("bad kernel name `{entry}`")))?;
        // SAFETY: a module of this device's context; an unknown name is an error, not UB.
        let f = unsafe { cudarc::driver::result::module::get_function(m.module, c) }
            .map_err(|e| loading(format!("no kernel `{entry}` in it ({e:?})")))?;
        self.extra.lock().unwrap_or_else(|e| e.into_inner()).push(m);
        Ok(Kernel(f))
    }

    /// A kernel of the modules `exec` launches itself, by entry-point name.
    pub fn kernel(&self, name: &str) -> Result<Kernel, Unavailable> {
        let c = std::ffi::CString::new(name).map_err(|_| Unavailable(format!("bad kernel name `{name}`")))?;
        for (_, m) in &self.raw {
            // SAFETY: a module of this device's context; an unknown name is an error, not UB.
            if let Ok(f) = unsafe { cudarc::driver::result::module::get_function(m.module, c.clone()) } {
                return Ok(Kernel(f));
            }
        }
        Err(Unavailable(format!("no kernel named `{name}`")))
    }

    /// A kernel by entry-point name.
    pub fn function(&self, name: &str) -> Result<cudarc::driver::CudaFunction, Unavailable> {
        for (_, module) in &self.modules {
            if let Ok(f) = module.load_function(name) {
                return Ok(f);
            }
        }
        Err(Unavailable(format!("no kernel named `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_defines;

    #[test]
    fn experiment_defines_take_only_the_listed_constants_in_range() {
        let (text, refused) = parse_defines("FP8_TC_INFLIGHT=4, NVFP4_TC_INFLIGHT=2");
        assert_eq!(text, "#define FP8_TC_INFLIGHT 4\n#define NVFP4_TC_INFLIGHT 2\n");
        assert!(refused.is_empty());
        // Only the module that reads them gets them (the others keep their cached kernels).
        assert_eq!(super::defines_for("quant", &text), text);
        assert_eq!(super::defines_for("decode", &text), "");
        let (text, _) = parse_defines("PDL_TRIGGER_FIRST=1,FP8_TC_INFLIGHT=4");
        assert_eq!(super::defines_for("decode", &text), "#define PDL_TRIGGER_FIRST 1\n");
        assert_eq!(super::defines_for("quant", &text), text);
        // Zero where the range starts there (held chunks: none), each in its own module.
        let (text, refused) = parse_defines("DOWN_HELD=0,GEMV_HELD=4,GEMV_HELD=9");
        assert_eq!(refused, ["GEMV_HELD=9"]);
        assert_eq!(super::defines_for("moe", &text), "#define DOWN_HELD 0\n");
        assert_eq!(super::defines_for("graph", &text), "#define GEMV_HELD 4\n");
        let (text, refused) = parse_defines("NORM_CODES_TRIGGER_FIRST=1,NORM_CODES_TRIGGER_FIRST=2");
        assert_eq!(refused, ["NORM_CODES_TRIGGER_FIRST=2"]);
        assert_eq!(super::defines_for("graph", &text), "#define NORM_CODES_TRIGGER_FIRST 1\n");
        assert_eq!(super::defines_for("quant", &text), "");
        // An every-module constant in named modules alone; a module that is not one, or one
        // that does not read the constant, is refused.
        let (text, refused) = parse_defines(
            "PDL_TRIGGER_FIRST@decode=1,PDL_TRIGGER_FIRST@quant=1,PDL_TRIGGER_FIRST@nope=1,GEMV_HELD@moe=2",
        );
        assert_eq!(refused, ["PDL_TRIGGER_FIRST@nope=1", "GEMV_HELD@moe=2"]);
        assert_eq!(super::defines_for("decode", &text), "#define PDL_TRIGGER_FIRST 1\n");
        assert_eq!(super::defines_for("quant", &text), "#define PDL_TRIGGER_FIRST 1\n");
        assert_eq!(super::defines_for("decode_fp8kv", &text), "");
        assert_eq!(super::defines_for("graph", &text), "");
        // A launch size the host must agree with, a value out of range, not a number, no value.
        let (text, refused) = parse_defines("FP8_TC_WARPS=4,FP8_TC_INFLIGHT=9,NVFP4_TC_INFLIGHT=x,FP8_TC_INFLIGHT,");
        assert_eq!(text, "");
        assert_eq!(refused, ["FP8_TC_WARPS=4", "FP8_TC_INFLIGHT=9", "NVFP4_TC_INFLIGHT=x", "FP8_TC_INFLIGHT"]);
    }
}
