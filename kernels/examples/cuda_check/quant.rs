//! cuda_check's quantized-linear checks: the kernels that hand an FP8 linear E4M3 codes, the
//! FP8 linear's gated epilogue, and the NVFP4 decode GEMVs (tensor-core and CUDA-core) against an f64 product of the same codes.

use super::*;

/// The kernels that hand an FP8 linear E4M3 codes (`quant=fp8`) against the same kernels'
/// plain bf16 output quantized on the CPU (`f32_to_e4m3(v / s)`): equal code for code; and an
/// FP8 linear over those codes (`LowBitLinear::x_codes`: the tensor-core GEMV staging them,
/// cuBLASLt reading them) against the same linear quantizing the bf16 input itself: equal bit
/// for bit.
pub(super) fn check_fp8_codes(gpu: &Gpu, rep: &mut Report) {
    use autodeploy_kernels::cuda::exec::{launch_counts, HeadRows, LowBitLinear, LowBitScales};
    use autodeploy_kernels::quant::lowbit::{e4m3_to_f32, f32_to_e4m3};
    let bytes_up = |raw: &[u8], what: &str| {
        let b = gpu.alloc(raw.len().max(1), what).unwrap();
        gpu.upload(b.ptr, raw).unwrap();
        b
    };
    let up = |v: &[f32]| bytes_up(&v.iter().flat_map(|&x| bf16(x).to_le_bytes()).collect::<Vec<u8>>(), "codes check");
    let get = |p: u64, n: usize| -> Vec<u8> {
        let mut raw = vec![0u8; n];
        gpu.download(p, &mut raw).unwrap();
        raw
    };
    let as_bf16 =
        |raw: Vec<u8>| -> Vec<f32> { raw.chunks_exact(2).map(|c| f32_of(u16::from_le_bytes([c[0], c[1]]))).collect() };
    let values = |codes: &[u8]| -> Vec<f32> { codes.iter().map(|&c| e4m3_to_f32(c)).collect() };
    let r = |n: usize, seed: u32| -> Vec<f32> { rand(n, seed).into_iter().map(|x| rnd(true, x * 3.0)).collect() };
    // A scale that puts some values past 448 (saturating) and some among the subnormals.
    let s = 0.004f32;
    let ds = bytes_up(&s.to_le_bytes(), "codes scale");
    let cpu_codes = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| e4m3_to_f32(f32_to_e4m3(x / s))).collect() };
    // RMSNorm (the 8-wide bf16 kernel, plain and with the residual) at hidden 4096 and 72.
    for n in [4096usize, 72] {
        let rows = 5;
        let (x, res, w) = (r(rows * n, 41), r(rows * n, 42), r(n, 43));
        let (dx, dres, dw) = (up(&x), up(&res), up(&w));
        for fused in [false, true] {
            let (plain, sum, codes) =
                (up(&vec![0.0; rows * n]), up(&vec![0.0; rows * n]), bytes_up(&vec![0; rows * n], "c"));
            let residual = fused.then_some((dres.ptr, sum.ptr));
            let norm = |out: u64, qs: Option<u64>| {
                gpu.rmsnorm(
                    (dx.ptr, Dt::BF16),
                    residual,
                    (dw.ptr, Dt::BF16),
                    (out, Dt::BF16),
                    qs,
                    Dt::BF16,
                    rows,
                    n,
                    1e-5,
                )
                .unwrap()
            };
            norm(plain.ptr, None);
            norm(codes.ptr, Some(ds.ptr));
            let want = cpu_codes(&as_bf16(get(plain.ptr, rows * n * 2)));
            let what = format!("rmsnorm{} codes n={n}", if fused { "+res" } else { "" });
            rep.exact(&what, true, &values(&get(codes.ptr, rows * n)), &want);
        }
    }
    // The gated activation: the 8-wide kernel (inter 1536) and the general one (1500).
    for (rows, inter) in [(5usize, 1536usize), (3, 1500)] {
        let dgu = up(&r(rows * 2 * inter, 44));
        let (plain, codes) = (up(&vec![0.0; rows * inter]), bytes_up(&vec![0; rows * inter], "c"));
        gpu.silu_mul(dgu.ptr, None, Dt::BF16, plain.ptr, None, rows, inter, GateAct::Silu).unwrap();
        gpu.silu_mul(dgu.ptr, None, Dt::BF16, codes.ptr, Some(ds.ptr), rows, inter, GateAct::Silu).unwrap();
        let want = cpu_codes(&as_bf16(get(plain.ptr, rows * inter * 2)));
        rep.exact(&format!("silu_mul codes {rows}x{inter}"), true, &values(&get(codes.ptr, rows * inter)), &want);
    }
    // An attention output's codes, token-major (`e4m3_heads`), from heads-major rows (a
    // prefill's) and token-major ones (a decode's), head dims 128 and 80.
    for (heads, tokens, d) in [(8usize, 5usize, 128usize), (3, 7, 80)] {
        let n = heads * tokens * d;
        let x = r(n, 47);
        let dx = up(&x);
        for (layout, rows) in
            [("heads-major", HeadRows::heads_major(tokens, d)), ("tokens-major", HeadRows::tokens_major(heads, d))]
        {
            let codes = bytes_up(&vec![0; n], "c");
            gpu.e4m3_heads(dx.ptr, Dt::BF16, rows, heads, tokens, d, ds.ptr, codes.ptr).unwrap();
            let mut want = vec![0.0f32; n];
            for t in 0..tokens {
                for h in 0..heads {
                    let at = h as i64 * rows.head + t as i64 * rows.token;
                    let src = &x[at as usize..at as usize + d];
                    want[(t * heads + h) * d..][..d].copy_from_slice(&cpu_codes(src));
                }
            }
            let what = format!("e4m3_heads {layout} {heads}x{tokens}x{d}");
            rep.exact(&what, true, &values(&get(codes.ptr, n)), &want);
        }
    }
    // FP8 linears over codes against the same over bf16: m = 1, 2 (tensor-core GEMV), 8 and 24
    // (cuBLASLt where it loads, else the dequantizing path).
    let (n, k) = (1000usize, 2048usize);
    let wcodes: Vec<u8> = r(n * k, 45).iter().map(|&v| f32_to_e4m3(v * 40.0)).collect();
    let (dw, dws) = (bytes_up(&wcodes, "w"), bytes_up(&0.01f32.to_le_bytes(), "w scale"));
    for m in [1usize, 2, 8, 24] {
        let x = r(m * k, 46);
        let xq: Vec<u8> = x.iter().map(|&v| f32_to_e4m3(v / s)).collect();
        let (dx, dxq) = (up(&x), bytes_up(&xq, "x codes"));
        let scales = LowBitScales { input: ds.ptr, dynamic: false, weight: dws.ptr, per_row: false, runs: [0; 4] };
        let sizes = LowBitLinear::scratch(2, m, n, k, true);
        let scratch: Vec<_> = sizes.iter().map(|&b| gpu.alloc(b, "scratch").unwrap()).collect();
        let sp = [scratch[0].ptr, scratch[1].ptr, scratch[2].ptr, scratch[3].ptr, scratch[4].ptr];
        let mut outs = Vec::new();
        for (xp, x_codes) in [(dx.ptr, false), (dxq.ptr, true)] {
            let y = up(&vec![0.0; m * n]);
            let c = LowBitLinear {
                dt: Dt::BF16,
                m,
                n,
                k,
                x: xp,
                y: y.ptr,
                bias: 0,
                x_codes,
                gated: None,
                y_codes_scale: 0,
            };
            gpu.fp8_linear(&c, dw.ptr, scales, sp).unwrap();
            outs.push(as_bf16(get(y.ptr, m * n * 2)));
            // The gated epilogue (`act=..`: the tensor-core GEMV's gated build at m <= 8, else
            // the whole output into scratch and `silu_mul`) against this linear's output through
            // `silu_mul`: equal bit for bit (the same row sums, then the same roundings).
            let act = if m == 2 { GateAct::GeluTanh } else { GateAct::Silu };
            let (plain, gated) = (up(&vec![0.0; m * n / 2]), up(&vec![0.0; m * n / 2]));
            gpu.silu_mul(y.ptr, None, Dt::BF16, plain.ptr, None, m, n / 2, act).unwrap();
            let c = LowBitLinear { y: gated.ptr, gated: Some(act), ..c };
            gpu.fp8_linear(&c, dw.ptr, scales, sp).unwrap();
            let what = format!("fp8 linear gated {act:?}{} m={m}", if x_codes { " over codes" } else { "" });
            rep.exact(&what, true, &as_bf16(get(gated.ptr, m * n)), &as_bf16(get(plain.ptr, m * n)));
            // Its output as E4M3 codes (the down projection's input scale) against `silu_mul`'s
            // codes of the same product.
            let (want, got) = (bytes_up(&vec![0; m * n / 2], "c"), bytes_up(&vec![0; m * n / 2], "c"));
            gpu.silu_mul(y.ptr, None, Dt::BF16, want.ptr, Some(ds.ptr), m, n / 2, act).unwrap();
            let c = LowBitLinear { y: got.ptr, y_codes_scale: ds.ptr, ..c };
            gpu.fp8_linear(&c, dw.ptr, scales, sp).unwrap();
            let what = format!("{what} as codes");
            rep.exact(&what, true, &values(&get(got.ptr, m * n / 2)), &values(&get(want.ptr, m * n / 2)));
        }
        rep.exact(&format!("fp8 linear over codes m={m}"), true, &outs[1], &outs[0]);
    }
    // A fused linear's per-row weight scale, one value over each part's rows (`runs`: cuBLASLt
    // scales each part's GEMM itself where it has no per-channel algorithm) against the same
    // scale without its runs (a per-channel algorithm, else f32 sums and the epilogue kernel).
    let row_scales: Vec<f32> = (0..n).map(|i| if i < 600 { 0.01 } else { 0.0275 }).collect();
    let dws_rows = bytes_up(&row_scales.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(), "row scales");
    for m in [24usize, 256] {
        let x = r(m * k, 47);
        let dx = up(&x);
        let sizes = LowBitLinear::scratch(2, m, n, k, false);
        let scratch: Vec<_> = sizes.iter().map(|&b| gpu.alloc(b, "scratch").unwrap()).collect();
        let sp = [scratch[0].ptr, scratch[1].ptr, scratch[2].ptr, scratch[3].ptr, 0];
        let mut outs = Vec::new();
        for runs in [[0; 4], [600, 400, 0, 0]] {
            let y = up(&vec![0.0; m * n]);
            let c = LowBitLinear {
                dt: Dt::BF16,
                m,
                n,
                k,
                x: dx.ptr,
                y: y.ptr,
                bias: 0,
                x_codes: false,
                gated: None,
                y_codes_scale: 0,
            };
            let s = LowBitScales { input: ds.ptr, dynamic: false, weight: dws_rows.ptr, per_row: true, runs };
            let before = launch_counts();
            gpu.fp8_linear(&c, dw.ptr, s, sp).unwrap();
            let after = launch_counts();
            let grew = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
            outs.push(as_bf16(get(y.ptr, m * n * 2)));
            // Where cuBLASLt ran, the runs' GEMMs scale themselves: no epilogue kernel.
            if runs[0] > 0 && grew("cublaslt_fp8_scaled") + grew("cublaslt_fp8") > 0 {
                let ok = grew("lowbit_epilogue") == 0 && grew("cublaslt_fp8_scaled") > 0;
                rep.failed |= !ok;
                println!(
                    "{:<28} bf16  {} scaled GEMMs, {} epilogues  {}",
                    format!("fp8 scale runs m={m} path"),
                    grew("cublaslt_fp8_scaled"),
                    grew("lowbit_epilogue"),
                    if ok { "ok" } else { "FAILED" }
                );
            }
        }
        rep.check_scaled(&format!("fp8 linear scale runs m={m}"), true, &outs[1], &outs[0], 1e-2);
    }
}

/// The NVFP4 decode GEMVs (`torch_quant_nvfp4_linear` at 1, 2, 4 and 8 rows, bf16) against an
/// f64 product of the same codes (E2M1 values times their E4M3 block scales, times the global
/// scale), rounded to bf16: the tensor-core build (`Gpu::nvfp4_tc`) and the CUDA-core one, at
/// the 8B's shapes (q/k/v, down), a k that is a multiple of 64 but not of 256 (a last partial
/// step) and an n that is not a multiple of 16; every code of both signs and scales from
/// subnormal to large.
pub(super) fn check_nvfp4_gemv(gpu: &mut Gpu, rep: &mut Report) {
    use autodeploy_kernels::cuda::exec::{LowBitLinear, LowBitScales};
    use autodeploy_kernels::quant::lowbit::e4m3_to_f32;
    // (The helpers take the GPU as an argument: the loop below switches `nvfp4_tc`.)
    let bytes_up = |gpu: &Gpu, raw: &[u8], what: &str| {
        let b = gpu.alloc(raw.len().max(1), what).unwrap();
        gpu.upload(b.ptr, raw).unwrap();
        b
    };
    let up = |gpu: &Gpu, v: &[f32]| {
        bytes_up(gpu, &v.iter().flat_map(|&x| bf16(x).to_le_bytes()).collect::<Vec<u8>>(), "nvfp4 x")
    };
    let down = |gpu: &Gpu, p: u64, n: usize| -> Vec<f32> {
        let mut raw = vec![0u8; n * 2];
        gpu.download(p, &mut raw).unwrap();
        raw.chunks_exact(2).map(|c| f32_of(u16::from_le_bytes([c[0], c[1]]))).collect()
    };
    const E2M1: [f64; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let e2m1 = |c: u8| if c & 8 != 0 { -E2M1[(c & 7) as usize] } else { E2M1[(c & 7) as usize] };
    let global = 0.37f32;
    let dg = bytes_up(gpu, &global.to_le_bytes(), "nvfp4 global scale");
    let tc = gpu.nvfp4_tc;
    for (n, k) in [(6144usize, 4096usize), (1000, 14336), (1003, 2112)] {
        let codes: Vec<u8> = rand(n * k / 2, 51).iter().map(|&v| ((v + 1.0) * 127.99) as u8).collect();
        // Block scales: E4M3 codes 0x08 (2^-6) to 0x5f (about 30), some subnormal ones (0x01-0x07).
        let scales: Vec<u8> = rand(n * k / 16, 52)
            .iter()
            .enumerate()
            .map(|(i, &v)| if i % 97 == 0 { 1 + (i % 7) as u8 } else { 8 + ((v + 1.0) * 43.9) as u8 })
            .collect();
        let (dw, ds) = (bytes_up(gpu, &codes, "nvfp4 w"), bytes_up(gpu, &scales, "nvfp4 block scales"));
        // The weight's values (exact in f64): E2M1 times the block's E4M3 scale.
        let wv: Vec<f64> = (0..n * k)
            .map(|i| {
                let b = codes[i / 2];
                let s = e4m3_to_f32(scales[i / k * (k / 16) + i % k / 16]) as f64;
                e2m1(if i % 2 == 0 { b & 15 } else { b >> 4 }) * s
            })
            .collect();
        for m in [1usize, 2, 4, 8] {
            let x: Vec<f32> = rand(m * k, 53).into_iter().map(|v| rnd(true, v * 2.0)).collect();
            let want: Vec<f32> = (0..m * n)
                .map(|i| {
                    let (row, col) = (i / n, i % n);
                    let dot: f64 = (0..k).map(|j| x[row * k + j] as f64 * wv[col * k + j]).sum();
                    rnd(true, (dot * global as f64) as f32)
                })
                .collect();
            let dx = up(gpu, &x);
            let sizes = LowBitLinear::scratch(2, m, n, k, true);
            let scratch: Vec<_> = sizes.iter().map(|&b| gpu.alloc(b, "scratch").unwrap()).collect();
            let sp = [scratch[0].ptr, scratch[1].ptr, scratch[2].ptr, scratch[3].ptr, scratch[4].ptr];
            let s = LowBitScales { input: 0, dynamic: false, weight: dg.ptr, per_row: false, runs: [0; 4] };
            // f32 sums of k products in another order: 1e-6 of the largest terms' magnitude, k of them.
            let atol = 1e-6 * k as f32 * 2.0 * 6.0 * 30.0 * global;
            for on in [true, false] {
                gpu.nvfp4_tc = on && tc_capable(gpu);
                let dy = up(gpu, &vec![0.0; m * n]);
                let c = LowBitLinear {
                    dt: Dt::BF16,
                    m,
                    n,
                    k,
                    x: dx.ptr,
                    y: dy.ptr,
                    bias: 0,
                    x_codes: false,
                    gated: None,
                    y_codes_scale: 0,
                };
                gpu.nvfp4_linear(&c, dw.ptr, ds.ptr, s, sp).unwrap();
                let what = format!("nvfp4 gemv{} m={m} {n}x{k}", if gpu.nvfp4_tc { " tc" } else { "" });
                rep.check_scaled(&what, true, &down(gpu, dy.ptr, m * n), &want, atol);
                if n % 2 == 0 {
                    // The gated epilogue against this output through `silu_mul`: bit for bit.
                    let (plain, gated) = (up(gpu, &vec![0.0; m * n / 2]), up(gpu, &vec![0.0; m * n / 2]));
                    gpu.silu_mul(dy.ptr, None, Dt::BF16, plain.ptr, None, m, n / 2, GateAct::Silu).unwrap();
                    let c = LowBitLinear { y: gated.ptr, gated: Some(GateAct::Silu), ..c };
                    gpu.nvfp4_linear(&c, dw.ptr, ds.ptr, s, sp).unwrap();
                    let (g, p) = (down(gpu, gated.ptr, m * n / 2), down(gpu, plain.ptr, m * n / 2));
                    rep.exact(&format!("  gated (act=silu) m={m}"), true, &g, &p);
                }
            }
        }
    }
    gpu.nvfp4_tc = tc;
}

/// Whether the device runs the NVFP4 tensor-core GEMV (sm_80+).
fn tc_capable(gpu: &Gpu) -> bool {
    gpu.dev.cc.0 >= 8
}
