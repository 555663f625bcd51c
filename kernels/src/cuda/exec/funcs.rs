//! The executor's kernels by name: each entry point of `graph.cu`, `moe.cu`, `attention.cu`,
//! `decode.cu`, `sample.cu` and `quant.cu` that `Gpu` launches, looked up once when the GPU is opened.

use super::{ATTN_BUILDS, GENERAL_DIMS, HEAD_DIMS, PREFILL_TC_DIMS};
use crate::cuda::{Device, Kernel, Unavailable};

pub(super) struct Funcs {
    /// `moe_route`, `moe_gate_up`, `moe_down`, `moe_combine`, `moe_gate_up_bf16`,
    /// `moe_down_bf16` (exec/moe.rs).
    pub(super) moe: [Kernel; 9],
    /// The router's linear and the routing in one launch (exec/moe.rs, `RouterIn::Weight`).
    pub(super) moe_router_route: Kernel,
    /// `quant.cu`: `e4m3_codes`, `fp8_values`, `nvfp4_values`, `lowbit_epilogue`, each
    /// `[f32, bf16]` (exec/quant.rs).
    pub(super) quant: [Kernel; 8],
    /// `e4m3_codes_rows` for `[f32, bf16]`.
    pub(super) quant_rows: [Kernel; 2],
    /// `e4m3_bytes_rows_bf16`: the cuBLASLt FP8 GEMM's input codes.
    pub(super) quant_bytes: Kernel,
    /// `e4m3_heads` for `[f32, bf16]`: an attention output's codes, token-major.
    pub(super) quant_heads: [Kernel; 2],
    /// `gemv_fp8_m{1,2,4,8}` and `gemv_nvfp4_m{1,2,4,8}` for `[f32, bf16]`.
    pub(super) quant_gemv: [[Kernel; 4]; 2],
    /// `gemv_fp8_tc_m{1,2,4,8}` for `[f32, bf16]` (sm_89+).
    pub(super) fp8_tc_gemv: [[Kernel; 4]; 2],
    /// The same over a gated MLP's gate/up weight, act(gate) · up out (`LowBitLinear::gated`).
    pub(super) fp8_tc_gemv_gated: [[Kernel; 4]; 2],
    pub(super) nvfp4_gemv: [[Kernel; 4]; 2],
    /// `gemv_nvfp4_tc_m{1,2,4,8}_bf16` (sm_80+).
    pub(super) nvfp4_tc_gemv: [Kernel; 4],
    /// The same over a gated MLP's gate/up weight (`LowBitLinear::gated`).
    pub(super) nvfp4_tc_gemv_gated: [Kernel; 4],
    pub(super) copy_strided: Kernel,
    pub(super) binary: Kernel,
    pub(super) unary: Kernel,
    pub(super) fill_uniform: Kernel,
    pub(super) fill_const: Kernel,
    pub(super) mean_last: Kernel,
    pub(super) rmsnorm: Kernel,
    pub(super) layer_norm: Kernel,
    pub(super) rope: Kernel,
    pub(super) silu_mul: Kernel,
    pub(super) silu_mul_bf16x8: Kernel,
    pub(super) embedding_rows: Kernel,
    pub(super) index_select: Kernel,
    pub(super) argmax_partial: Kernel,
    /// bf16 decode GEMV for m = 1, 2, 4, 8.
    pub(super) gemv_bf16: [Kernel; 4],
    /// m = 1 with 2 and 4 warps a weight row.
    pub(super) gemv_bf16_split: [Kernel; 2],
    pub(super) rmsnorm_bf16x8: Kernel,
    pub(super) gemv_swiglu_bf16: Kernel,
    /// The same with 2 and 4 warps an output.
    pub(super) gemv_swiglu_bf16_split: [Kernel; 2],
    pub(super) argmax_final: Kernel,
    pub(super) sample_rows: Kernel,
    /// The attention kernels come in four builds (`attention::build`): [f32, bf16] activations
    /// over a cache of that dtype, then over an FP8 cache.
    pub(super) write_kv: [Kernel; 4],
    /// The builds × head dims `HEAD_DIMS` then `GENERAL_DIMS` (`attention::head_dim_index`).
    pub(super) paged_attention: [Vec<Kernel>; 4],
    pub(super) paged_decode_split: [Vec<Kernel>; 4],
    /// The throughput build over 2, 4, 8 query heads of a GQA group a block.
    pub(super) paged_decode_split_grouped: [[Vec<Kernel>; 4]; 3],
    /// The latency build of the same (decode.cu: EARLY).
    pub(super) paged_decode_split_early: [Vec<Kernel>; 4],
    /// The latency build at 4 positions a warp and pass.
    pub(super) paged_decode_split_early4: [Vec<Kernel>; 4],
    pub(super) rope_write_kv: [Kernel; 4],
    /// The same with the q/k norms (`Gpu::rope_write_kv`'s `qk_norm`).
    pub(super) rope_norm_write_kv: [Kernel; 4],
    pub(super) slot_attention: [Vec<Kernel>; 4],
    /// bf16 tensor-core prefill, head dims `PREFILL_TC_DIMS`: over a bf16 cache, over an FP8 one.
    pub(super) paged_prefill_tc: [Vec<Kernel>; 2],
    pub(super) paged_prefill_tc_grp: [Vec<Kernel>; 2],
    /// bf16 split-KV decode on tensor cores over a GQA group, the same builds and head dims.
    pub(super) paged_decode_tc: [Vec<Kernel>; 2],
    /// The same with ldmatrix fragment loads (`[kernels] decode_ldmatrix`).
    pub(super) paged_decode_tc_ldsm: [Vec<Kernel>; 2],
    /// Over an FP8 cache, the fragments straight from the codes (`[kernels] decode_fp8_codes`).
    pub(super) paged_decode_tc_codes: Vec<Kernel>,
}

impl Funcs {
    pub(super) fn load(dev: &Device) -> Result<Funcs, Unavailable> {
        let g = |n: &str| dev.kernel(n);
        // `{name}_d{D}_bf16` and `.._bf16_fp8kv` for the tensor-core head dims `PREFILL_TC_DIMS`.
        let tc_dims = |name: &str| -> Result<[Vec<Kernel>; 2], Unavailable> {
            let dims = |suffix: &str| -> Result<Vec<Kernel>, Unavailable> {
                PREFILL_TC_DIMS.iter().map(|d| g(&format!("{name}_d{d}_{suffix}"))).collect()
            };
            Ok([dims("bf16")?, dims("bf16_fp8kv")?])
        };
        // `{name}_d{D}_{build}` for every head dim D of `HEAD_DIMS`, then the general builds
        // `{name}_g{D}_..` of `GENERAL_DIMS`: builds × dims (`head_dim_index` picks).
        let slot_dims = |name: &str, s: &str| -> Result<Vec<Kernel>, Unavailable> {
            let exact = HEAD_DIMS.iter().map(|d| format!("{name}_d{d}_{s}"));
            let general = GENERAL_DIMS.iter().map(|d| format!("{name}_g{d}_{s}"));
            exact.chain(general).map(|n| g(&n)).collect()
        };
        let by_dims = |name: &str| -> Result<[Vec<Kernel>; 4], Unavailable> {
            Ok([
                slot_dims(name, ATTN_BUILDS[0])?,
                slot_dims(name, ATTN_BUILDS[1])?,
                slot_dims(name, ATTN_BUILDS[2])?,
                slot_dims(name, ATTN_BUILDS[3])?,
            ])
        };
        let builds = |name: &str| -> Result<[Kernel; 4], Unavailable> {
            Ok([
                g(&format!("{name}_{}", ATTN_BUILDS[0]))?,
                g(&format!("{name}_{}", ATTN_BUILDS[1]))?,
                g(&format!("{name}_{}", ATTN_BUILDS[2]))?,
                g(&format!("{name}_{}", ATTN_BUILDS[3]))?,
            ])
        };
        Ok(Funcs {
            moe_router_route: g("moe_router_route_bf16")?,
            moe: [
                g("moe_route")?,
                g("moe_gate_up")?,
                g("moe_down")?,
                g("moe_combine")?,
                g("moe_gate_up_bf16")?,
                g("moe_down_bf16")?,
                g("moe_group")?,
                g("moe_gate_up_grouped_bf16")?,
                g("moe_down_grouped_bf16")?,
            ],
            quant: [
                g("e4m3_codes_f32")?,
                g("e4m3_codes_bf16")?,
                g("fp8_values_f32")?,
                g("fp8_values_bf16")?,
                g("nvfp4_values_f32")?,
                g("nvfp4_values_bf16")?,
                g("lowbit_epilogue_f32")?,
                g("lowbit_epilogue_bf16")?,
            ],
            quant_rows: [g("e4m3_codes_rows_f32")?, g("e4m3_codes_rows_bf16")?],
            quant_bytes: g("e4m3_bytes_rows_bf16")?,
            quant_heads: [g("e4m3_heads_f32")?, g("e4m3_heads_bf16")?],
            quant_gemv: [
                [g("gemv_fp8_m1_f32")?, g("gemv_fp8_m2_f32")?, g("gemv_fp8_m4_f32")?, g("gemv_fp8_m8_f32")?],
                [g("gemv_fp8_m1_bf16")?, g("gemv_fp8_m2_bf16")?, g("gemv_fp8_m4_bf16")?, g("gemv_fp8_m8_bf16")?],
            ],
            fp8_tc_gemv: [
                [
                    g("gemv_fp8_tc_m1_f32")?,
                    g("gemv_fp8_tc_m2_f32")?,
                    g("gemv_fp8_tc_m4_f32")?,
                    g("gemv_fp8_tc_m8_f32")?,
                ],
                [
                    g("gemv_fp8_tc_m1_bf16")?,
                    g("gemv_fp8_tc_m2_bf16")?,
                    g("gemv_fp8_tc_m4_bf16")?,
                    g("gemv_fp8_tc_m8_bf16")?,
                ],
            ],
            fp8_tc_gemv_gated: [
                [
                    g("gemv_fp8_tc_gated_m1_f32")?,
                    g("gemv_fp8_tc_gated_m2_f32")?,
                    g("gemv_fp8_tc_gated_m4_f32")?,
                    g("gemv_fp8_tc_gated_m8_f32")?,
                ],
                [
                    g("gemv_fp8_tc_gated_m1_bf16")?,
                    g("gemv_fp8_tc_gated_m2_bf16")?,
                    g("gemv_fp8_tc_gated_m4_bf16")?,
                    g("gemv_fp8_tc_gated_m8_bf16")?,
                ],
            ],
            nvfp4_tc_gemv: [
                g("gemv_nvfp4_tc_m1_bf16")?,
                g("gemv_nvfp4_tc_m2_bf16")?,
                g("gemv_nvfp4_tc_m4_bf16")?,
                g("gemv_nvfp4_tc_m8_bf16")?,
            ],
            nvfp4_tc_gemv_gated: [
                g("gemv_nvfp4_tc_gated_m1_bf16")?,
                g("gemv_nvfp4_tc_gated_m2_bf16")?,
                g("gemv_nvfp4_tc_gated_m4_bf16")?,
                g("gemv_nvfp4_tc_gated_m8_bf16")?,
            ],
            nvfp4_gemv: [
                [g("gemv_nvfp4_m1_f32")?, g("gemv_nvfp4_m2_f32")?, g("gemv_nvfp4_m4_f32")?, g("gemv_nvfp4_m8_f32")?],
                [
                    g("gemv_nvfp4_m1_bf16")?,
                    g("gemv_nvfp4_m2_bf16")?,
                    g("gemv_nvfp4_m4_bf16")?,
                    g("gemv_nvfp4_m8_bf16")?,
                ],
            ],
            copy_strided: g("copy_strided")?,
            binary: g("binary")?,
            unary: g("unary")?,
            fill_uniform: g("fill_uniform")?,
            fill_const: g("fill_const")?,
            mean_last: g("mean_last")?,
            rmsnorm: g("rmsnorm")?,
            layer_norm: g("layer_norm")?,
            rope: g("rope")?,
            silu_mul: g("silu_mul")?,
            silu_mul_bf16x8: g("silu_mul_bf16x8")?,
            embedding_rows: g("embedding_rows")?,
            index_select: g("index_select")?,
            argmax_partial: g("argmax_partial")?,
            gemv_bf16: [g("gemv_bf16_m1")?, g("gemv_bf16_m2")?, g("gemv_bf16_m4")?, g("gemv_bf16_m8")?],
            gemv_bf16_split: [g("gemv_bf16_m1_s2")?, g("gemv_bf16_m1_s4")?],
            rmsnorm_bf16x8: g("rmsnorm_bf16x8")?,
            gemv_swiglu_bf16: g("gemv_swiglu_bf16")?,
            gemv_swiglu_bf16_split: [g("gemv_swiglu_bf16_s2")?, g("gemv_swiglu_bf16_s4")?],
            argmax_final: g("argmax_final")?,
            sample_rows: g("sample_rows")?,
            write_kv: builds("write_kv")?,
            paged_prefill_tc: tc_dims("paged_prefill_tc")?,
            paged_prefill_tc_grp: tc_dims("paged_prefill_tc_grp")?,
            paged_decode_tc: tc_dims("paged_decode_tc")?,
            paged_decode_tc_ldsm: tc_dims("paged_decode_tc_ldsm")?,
            paged_decode_tc_codes: PREFILL_TC_DIMS
                .iter()
                .map(|d| g(&format!("paged_decode_tc_codes_d{d}_bf16_fp8kv")))
                .collect::<Result<_, _>>()?,
            paged_attention: by_dims("paged_attention")?,
            paged_decode_split: by_dims("paged_decode_split")?,
            paged_decode_split_early: by_dims("paged_decode_split_early")?,
            paged_decode_split_grouped: [
                by_dims("paged_decode_split_g2")?,
                by_dims("paged_decode_split_g4")?,
                by_dims("paged_decode_split_g8")?,
            ],
            paged_decode_split_early4: by_dims("paged_decode_split_early4")?,
            rope_write_kv: builds("rope_write_kv")?,
            rope_norm_write_kv: builds("rope_norm_write_kv")?,
            slot_attention: by_dims("slot_attention")?,
        })
    }
}
