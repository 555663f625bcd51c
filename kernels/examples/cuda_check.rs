//! Runs every CUDA kernel on the GPU against a CPU reference, f32 and bf16, and prints the
//! largest error of each; exits non-zero if one is outside its tolerance.
//!
//!   cargo run --release -p autodeploy-kernels --example cuda_check [-- ORDINAL]
//!
//! Tolerances: f32 1e-5 relative (summation order); bf16 two bf16 ulps of the larger of the two
//! values (2/128 relative): a block sum in another order can move RMSNorm's f32 scale by an ulp,
//! `x·r` then rounds one bf16 ulp away, and the weight multiplies that step (|w| up to 2 here).
use std::process::ExitCode;

use autodeploy_kernels::cuda::exec::{bad_index, Dt, GateAct, Gpu};
use autodeploy_kernels::cuda::Device;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// The attention kernels' checks (`check_attention`).
#[path = "cuda_check/attention.rs"]
mod attention;
use attention::check_attention;
/// The tensor-core split-KV decode over long sequences (`check_long_decode`).
#[path = "cuda_check/decode_long.rs"]
mod decode_long;
use decode_long::check_long_decode;
#[path = "cuda_check/quant.rs"]
mod quant;
use quant::{check_fp8_codes, check_nvfp4_gemv};

fn rand(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20000) as f32 / 10000.0 - 1.0
        })
        .collect()
}

fn bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}
fn f32_of(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}
fn rnd(bf: bool, x: f32) -> f32 {
    if bf {
        f32_of(bf16(x))
    } else {
        x
    }
}

/// Reference results, computed the way the kernels round.
fn rmsnorm_ref(bf: bool, x: &[f32], res: Option<&[f32]>, w: &[f32], n: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; x.len()];
    let mut resid = vec![0f32; x.len()];
    for r in 0..x.len() / n {
        let row: Vec<f32> =
            (0..n).map(|i| res.map_or(x[r * n + i], |q| rnd(bf, x[r * n + i] + q[r * n + i]))).collect();
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let rs = 1.0 / (ss / n as f32 + eps).sqrt();
        for i in 0..n {
            resid[r * n + i] = row[i];
            out[r * n + i] = rnd(bf, w[i] * rnd(bf, row[i] * rs));
        }
    }
    (out, resid)
}

struct Report {
    failed: bool,
}

impl Report {
    fn check(&mut self, what: &str, bf: bool, got: &[f32], want: &[f32]) {
        self.check_scaled(what, bf, got, want, 0.0);
    }

    /// Bit-for-bit equality: for results that are copies (cache writes), where any difference is
    /// a bug, not rounding.
    fn exact(&mut self, what: &str, bf: bool, got: &[f32], want: &[f32]) {
        let bad = got.iter().zip(want).position(|(g, w)| g.to_bits() != w.to_bits());
        let ok = bad.is_none() && got.len() == want.len() && !got.is_empty();
        self.failed |= !ok;
        let detail = match bad {
            Some(i) => format!("first difference at {i}: got {} want {}", got[i], want[i]),
            None if got.len() != want.len() => format!("{} values, want {}", got.len(), want.len()),
            None => format!("{} values bit for bit", got.len()),
        };
        println!("{what:<28} {:<5} {detail}  {}", if bf { "bf16" } else { "f32" }, if ok { "ok" } else { "FAILED" });
    }

    /// As `check`, with an absolute allowance too (dot products: summation-order error scales
    /// with the terms, not with a result near zero).
    fn check_scaled(&mut self, what: &str, bf: bool, got: &[f32], want: &[f32], atol: f32) {
        let tol_rel = if bf { 2.0 / 128.0 } else { 1e-5 };
        let mut worst = 0f32;
        let mut at = (0f32, 0f32);
        let mut bad = 0;
        for (g, w) in got.iter().zip(want) {
            let e = (g - w).abs();
            if e > worst {
                worst = e;
                at = (*g, *w);
            }
            if e > tol_rel * g.abs().max(w.abs()).max(1e-2) + 1e-6 + atol {
                bad += 1;
            }
        }
        let ok = bad == 0 && got.len() == want.len();
        self.failed |= !ok;
        println!(
            "{:<28} {:<5} max |err| {worst:.3e} (got {:.5} want {:.5})  {}",
            what,
            if bf { "bf16" } else { "f32" },
            at.0,
            at.1,
            if ok { "ok" } else { "FAILED" }
        );
    }
}

fn main() -> ExitCode {
    let ordinal: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let dev = match Device::open(ordinal) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("device: cuda:{ordinal} {} (sm_{}{})", dev.name, dev.cc.0, dev.cc.1);
    let s = dev.ctx.default_stream();
    let mut rep = Report { failed: false };
    for bf in [false, true] {
        let sfx = if bf { "bf16" } else { "f32" };
        // Uploads f32 values as the kernel's dtype; downloads back to f32.
        macro_rules! up {
            ($v:expr) => {{
                let v: &[f32] = $v;
                let bytes: Vec<u16> = v.iter().map(|&x| bf16(x)).collect();
                if bf {
                    Buf::B(s.memcpy_stod(&bytes).unwrap())
                } else {
                    Buf::F(s.memcpy_stod(v).unwrap())
                }
            }};
        }
        enum Buf {
            F(cudarc::driver::CudaSlice<f32>),
            B(cudarc::driver::CudaSlice<u16>),
        }
        let down = |b: &Buf| -> Vec<f32> {
            match b {
                Buf::F(d) => s.memcpy_dtov(d).unwrap(),
                Buf::B(d) => s.memcpy_dtov(d).unwrap().into_iter().map(f32_of).collect(),
            }
        };
        // Inputs are made representable in the dtype first, as they would be in a bf16 model.
        let inp = |n: usize, seed: u32| -> Vec<f32> { rand(n, seed).into_iter().map(|x| rnd(bf, x * 2.0)).collect() };

        // RMSNorm, plain and with the residual add fused (hidden 576 and 4096, 7 rows).
        for n in [576usize, 4096] {
            let rows = 7;
            let (x, res, w) = (inp(rows * n, 1), inp(rows * n, 2), inp(n, 3));
            for fused in [false, true] {
                let (dx, dres, dw) = (up!(&x), up!(&res), up!(&w));
                let (mut dout, mut dresout) = (up!(&vec![0.0; rows * n]), up!(&vec![0.0; rows * n]));
                let f = dev.function(&format!("rmsnorm_residual_{sfx}")).unwrap();
                let mut b = s.launch_builder(&f);
                let null = 0u64;
                let (n_i, eps) = (n as i32, 1e-5f32);
                match (&dx, &dres, &mut dresout, &dw, &mut dout) {
                    (Buf::F(a), Buf::F(r), Buf::F(ro), Buf::F(ww), Buf::F(o)) => {
                        b.arg(a);
                        if fused {
                            b.arg(r)
                        } else {
                            b.arg(&null)
                        };
                        b.arg(ro).arg(ww).arg(o);
                    }
                    (Buf::B(a), Buf::B(r), Buf::B(ro), Buf::B(ww), Buf::B(o)) => {
                        b.arg(a);
                        if fused {
                            b.arg(r)
                        } else {
                            b.arg(&null)
                        };
                        b.arg(ro).arg(ww).arg(o);
                    }
                    _ => unreachable!(),
                }
                b.arg(&n_i).arg(&eps);
                let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: the arguments match the kernel's signature; buffers hold rows * n values.
                unsafe { b.launch(cfg) }.unwrap();
                let (want, want_res) = rmsnorm_ref(bf, &x, fused.then_some(&res[..]), &w, n, 1e-5);
                rep.check(&format!("rmsnorm{} n={n}", if fused { "+residual" } else { "" }), bf, &down(&dout), &want);
                if fused {
                    rep.check(&format!("  residual out n={n}"), bf, &down(&dresout), &want_res);
                }
            }
        }

        // SiLU-and-multiply over [gate | up] rows.
        {
            let (rows, inter) = (5usize, 1536usize);
            let gu = inp(rows * 2 * inter, 4);
            let dgu = up!(&gu);
            let mut dout = up!(&vec![0.0; rows * inter]);
            let f = dev.function(&format!("silu_mul_{sfx}")).unwrap();
            let mut b = s.launch_builder(&f);
            match (&dgu, &mut dout) {
                (Buf::F(a), Buf::F(o)) => b.arg(a).arg(o),
                (Buf::B(a), Buf::B(o)) => b.arg(a).arg(o),
                _ => unreachable!(),
            };
            let (r, i) = (rows as i64, inter as i32);
            b.arg(&r).arg(&i);
            // SAFETY: matches silu_mul's signature.
            unsafe { b.launch(LaunchConfig::for_num_elems((rows * inter) as u32)) }.unwrap();
            let mut want = Vec::new();
            for row in gu.chunks(2 * inter) {
                for j in 0..inter {
                    let g = row[j];
                    want.push(rnd(bf, rnd(bf, g / (1.0 + (-g).exp())) * row[inter + j]));
                }
            }
            rep.check("silu_mul", bf, &down(&dout), &want);
        }

        // Embedding rows, and an id out of range flagged.
        {
            let (rows, dim) = (1000usize, 576usize);
            let w = inp(rows * dim, 5);
            let ids: Vec<i64> = vec![0, 999, 17, 17, 512];
            let (dw, dids) = (up!(&w), s.memcpy_stod(&ids).unwrap());
            let mut dout = up!(&vec![0.0; ids.len() * dim]);
            let mut bad = s.alloc_zeros::<i32>(1).unwrap();
            let f = dev.function(&format!("embedding_{sfx}")).unwrap();
            let mut b = s.launch_builder(&f);
            match (&dw, &mut dout) {
                (Buf::F(a), Buf::F(o)) => b.arg(a).arg(&dids).arg(o),
                (Buf::B(a), Buf::B(o)) => b.arg(a).arg(&dids).arg(o),
                _ => unreachable!(),
            };
            let (t, d, r) = (ids.len() as i64, dim as i32, rows as i64);
            b.arg(&t).arg(&d).arg(&r).arg(&mut bad);
            // SAFETY: matches embedding's signature.
            unsafe { b.launch(LaunchConfig::for_num_elems((ids.len() * dim) as u32)) }.unwrap();
            let want: Vec<f32> =
                ids.iter().flat_map(|&i| w[i as usize * dim..(i as usize + 1) * dim].to_vec()).collect();
            rep.check("embedding", bf, &down(&dout), &want);
            let flag = s.memcpy_dtov(&bad).unwrap()[0];
            if flag != 0 {
                rep.failed = true;
                println!("embedding: in-range ids were flagged FAILED");
            }
            // Ids past the last row and negative ones must raise the flag (and write nothing
            // out of bounds).
            for wrong in [rows as i64, -1] {
                let ids: Vec<i64> = vec![3, wrong, 5];
                let dids = s.memcpy_stod(&ids).unwrap();
                let mut bad = s.alloc_zeros::<i32>(1).unwrap();
                let mut b = s.launch_builder(&f);
                match (&dw, &mut dout) {
                    (Buf::F(a), Buf::F(o)) => b.arg(a).arg(&dids).arg(o),
                    (Buf::B(a), Buf::B(o)) => b.arg(a).arg(&dids).arg(o),
                    _ => unreachable!(),
                };
                let t = ids.len() as i64;
                b.arg(&t).arg(&d).arg(&r).arg(&mut bad);
                // SAFETY: matches embedding's signature.
                unsafe { b.launch(LaunchConfig::for_num_elems((ids.len() * dim) as u32)) }.unwrap();
                let flag = s.memcpy_dtov(&bad).unwrap()[0];
                let ok = flag != 0;
                rep.failed |= !ok;
                println!(
                    "{:<28} {:<5} id {wrong} of {rows} rows: flag {flag}  {}",
                    "embedding out of range",
                    if bf { "bf16" } else { "f32" },
                    if ok { "ok" } else { "FAILED" }
                );
            }
        }

        // RoPE in place over [heads, tokens, d].
        {
            let (heads, tokens, d) = (9usize, 6usize, 64usize);
            let x = inp(heads * tokens * d, 6);
            let (cos, sin) = (inp(tokens * d, 7), inp(tokens * d, 8));
            let mut dx = up!(&x);
            let (dc, ds) = (up!(&cos), up!(&sin));
            let f = dev.function(&format!("rope_{sfx}")).unwrap();
            let mut b = s.launch_builder(&f);
            match (&mut dx, &dc, &ds) {
                (Buf::F(a), Buf::F(c), Buf::F(si)) => b.arg(a).arg(c).arg(si),
                (Buf::B(a), Buf::B(c), Buf::B(si)) => b.arg(a).arg(c).arg(si),
                _ => unreachable!(),
            };
            let (h, t, dd) = (heads as i64, tokens as i64, d as i32);
            b.arg(&h).arg(&t).arg(&dd);
            // SAFETY: matches rope's signature.
            unsafe { b.launch(LaunchConfig::for_num_elems((heads * tokens * d / 2) as u32)) }.unwrap();
            let mut want = x.clone();
            let half = d / 2;
            for row in 0..heads * tokens {
                let tt = row % tokens;
                for j in 0..d {
                    let xv = x[row * d + j];
                    let rot = if j < half { -x[row * d + j + half] } else { x[row * d + j - half] };
                    want[row * d + j] = rnd(bf, rnd(bf, xv * cos[tt * d + j]) + rnd(bf, rot * sin[tt * d + j]));
                }
            }
            rep.check("rope", bf, &down(&dx), &want);
        }
    }

    // Greedy argmax per row (vocab 49152 and 128256, ties to the lowest index).
    for vocab in [49152usize, 128256] {
        let rows = 4;
        let mut l = rand(rows * vocab, 9);
        l[vocab + 100] = 5.0;
        l[vocab + 200] = 5.0; // a tie: the lower index wins
        let dl = s.memcpy_stod(&l).unwrap();
        let mut dout = s.alloc_zeros::<i64>(rows).unwrap();
        let f = dev.function("argmax_rows_f32").unwrap();
        let mut b = s.launch_builder(&f);
        let v = vocab as i32;
        b.arg(&dl).arg(&mut dout).arg(&v);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: matches argmax_rows_f32's signature.
        unsafe { b.launch(cfg) }.unwrap();
        let got = s.memcpy_dtov(&dout).unwrap();
        let want: Vec<i64> = l
            .chunks(vocab)
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) })
                    .0 as i64
            })
            .collect();
        let ok = got == want;
        rep.failed |= !ok;
        println!(
            "{:<28} f32   {got:?} vs {want:?}  {}",
            format!("argmax vocab={vocab}"),
            if ok { "ok" } else { "FAILED" }
        );
    }
    // The executor's attention kernels (exec::Gpu, as both attention backends launch them)
    // against one CPU reference, on random inputs: a ragged batch of a decode token (37
    // cached), a 20-token prefill and 3 tokens whose positions cross a page boundary; GQA 1, 4,
    // 8; head dims 64 and 128. `flashinfer`: KV write, then the ragged paged kernel, and the
    // split-KV decode kernel, over scattered pages. `triton`: the fused write-and-attend kernel
    // over per-sequence contiguous slots.
    let mut gpu = match autodeploy_kernels::cuda::exec::Gpu::open(ordinal) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The one-row GEMV and the gate/up + SwiGLU GEMV with 1, 2 and 4 warps a weight row
    // (AUTODEPLOY_GEMV_SPLIT, AUTODEPLOY_SWIGLU_SPLIT).
    let split = (gpu.gemv_split, gpu.swiglu_split);
    for s in [1, 2, 4] {
        (gpu.gemv_split, gpu.swiglu_split) = (s, s);
        check_gemv(&gpu, &mut rep);
    }
    (gpu.gemv_split, gpu.swiglu_split) = split;
    check_embedding(&gpu, &mut rep);
    check_fp8_codes(&gpu, &mut rep);
    check_nvfp4_gemv(&mut gpu, &mut rep);
    for bf in [false, true] {
        // GQA ratios 1, 4, 8 and 6 (the grouped split-KV decode at 1, 4, 8 and 2 heads a block).
        for (heads, kv_heads) in [(8usize, 8usize), (8, 2), (16, 2), (12, 2)] {
            for d in [64usize, 128] {
                check_attention(&gpu, &mut rep, bf, heads, kv_heads, d);
            }
        }
        // A head dim of the general builds (80 on the 128 one: lanes past it idle), with the
        // q/k norms and RoPE over a partly filled warp.
        check_attention(&gpu, &mut rep, bf, 8, 2, 80);
    }
    // GQA groups of 4, 8, 3 and 1 at the tensor-core head dims.
    for (heads, kv_heads, d) in [(32usize, 8usize, 128usize), (16, 2, 64), (12, 4, 96), (8, 8, 32)] {
        check_long_decode(&gpu, &mut rep, heads, kv_heads, d);
    }

    // cuBLAS linear (x · wᵀ) against the CPU, f32 and bf16.
    let blas = match autodeploy_kernels::cuda::blas::handle(s.clone()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    {
        use autodeploy_kernels::cuda::blas::linear;
        let (m, n, k) = (5usize, 300usize, 576usize);
        let (x, w) = (rand(m * k, 11), rand(n * k, 12));
        let mut want = vec![0f32; m * n];
        autodeploy_kernels::cpu::linear(m, n, k, &x, &w, None, &mut want);
        let (dx, dw) = (s.memcpy_stod(&x).unwrap(), s.memcpy_stod(&w).unwrap());
        let mut dy = s.alloc_zeros::<f32>(m * n).unwrap();
        linear(&blas, m, n, k, &dx, &dw, &mut dy).unwrap();
        // f32: 1e-6 of the largest output (k = 576 terms of |x|, |w| <= 1 summed in another order).
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        rep.check_scaled("cublas linear 5x300x576", false, &s.memcpy_dtov(&dy).unwrap(), &want, 1e-6 * scale);
        // bf16 inputs: the reference multiplies the same rounded values in f32, then rounds.
        let (xb, wb): (Vec<half::bf16>, Vec<half::bf16>) = (
            x.iter().map(|&v| half::bf16::from_f32(v)).collect(),
            w.iter().map(|&v| half::bf16::from_f32(v)).collect(),
        );
        let (xr, wr): (Vec<f32>, Vec<f32>) =
            (xb.iter().map(|v| v.to_f32()).collect(), wb.iter().map(|v| v.to_f32()).collect());
        autodeploy_kernels::cpu::linear(m, n, k, &xr, &wr, None, &mut want);
        let want: Vec<f32> = want.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let (dx, dw) = (s.memcpy_stod(&xb).unwrap(), s.memcpy_stod(&wb).unwrap());
        let mut dy = s.alloc_zeros::<half::bf16>(m * n).unwrap();
        linear(&blas, m, n, k, &dx, &dw, &mut dy).unwrap();
        let got: Vec<f32> = s.memcpy_dtov(&dy).unwrap().iter().map(|v| v.to_f32()).collect();
        rep.check("cublas linear 5x300x576", true, &got, &want);
    }

    // Decode-shaped GEMVs (batch 1) of Llama-3.1-8B's bf16 linears: the weight bandwidth cuBLAS
    // reaches, next to the copy floor below.
    {
        use autodeploy_kernels::cuda::blas::linear;
        let shapes = [
            ("qkv", 6144usize, 4096usize),
            ("o", 4096, 4096),
            ("gate_up", 28672, 4096),
            ("down", 4096, 14336),
            ("lm_head", 128256, 4096),
        ];
        for (name, n, k) in shapes {
            let w = s.alloc_zeros::<half::bf16>(n * k).unwrap();
            let x = s.alloc_zeros::<half::bf16>(k).unwrap();
            let mut y = s.alloc_zeros::<half::bf16>(n).unwrap();
            linear(&blas, 1, n, k, &x, &w, &mut y).unwrap();
            s.synchronize().unwrap();
            let reps = 50;
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                linear(&blas, 1, n, k, &x, &w, &mut y).unwrap();
            }
            s.synchronize().unwrap();
            let dt = t0.elapsed().as_secs_f64() / reps as f64;
            println!(
                "cublas gemv bf16 {name:<8} {n:>6}x{k:<5}: {:8.1} us  {:6.0} GB/s of weights",
                dt * 1e6,
                (n * k * 2) as f64 / dt / 1e9
            );
        }
    }

    // The memory floor this card offers: a 2 GiB device-to-device copy (read + write), best of 5.
    {
        let n = 1usize << 29; // f32s: 2 GiB
        let src = s.alloc_zeros::<f32>(n).unwrap();
        let mut dst = s.alloc_zeros::<f32>(n).unwrap();
        let mut best = f64::MAX;
        for _ in 0..5 {
            s.synchronize().unwrap();
            let t0 = std::time::Instant::now();
            s.memcpy_dtod(&src, &mut dst).unwrap();
            s.synchronize().unwrap();
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "device copy: 2 GiB in {:.3} ms = {:.0} GB/s (read + write)",
            best * 1e3,
            2.0 * (n * 4) as f64 / best / 1e9
        );
    }
    if rep.failed {
        ExitCode::FAILURE
    } else {
        println!("all kernels match the CPU reference");
        ExitCode::SUCCESS
    }
}

/// The executor's embedding gather (`Gpu::embedding`) against the rows it should copy, byte for
/// byte: 16-byte rows and rows of other lengths, a rank's slice of the table (other rows zero),
/// more tokens than a grid's y dimension holds, and ids outside the table flagged.
fn check_embedding(gpu: &Gpu, rep: &mut Report) {
    let up = |b: &[u8]| {
        let d = gpu.alloc(b.len().max(16), "embedding check").unwrap();
        gpu.upload(d.ptr, b).unwrap();
        d
    };
    // (table rows, row bytes, slice start, slice rows, tokens)
    for (vocab, row_bytes, start, rows, tokens) in [
        (1000usize, 1152usize, 0usize, 1000usize, 37usize),
        (1000, 6, 0, 1000, 29),
        (1000, 1152, 250, 300, 41),
        (64, 16, 0, 64, 70_000),
    ] {
        let table: Vec<u8> = (0..rows * row_bytes).map(|i| (i * 7 + i / row_bytes * 13) as u8).collect();
        let ids: Vec<i64> = (0..tokens).map(|t| ((t * 131 + 7) % vocab) as i64).collect();
        let want: Vec<u8> = ids
            .iter()
            .flat_map(|&id| {
                let local = id as usize;
                if (start..start + rows).contains(&local) {
                    table[(local - start) * row_bytes..(local - start + 1) * row_bytes].to_vec()
                } else {
                    vec![0u8; row_bytes]
                }
            })
            .collect();
        let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        let (dw, dids, dout, dbad) = (up(&table), up(&id_bytes), up(&vec![0xa5; tokens * row_bytes]), up(&[0u8; 8]));
        gpu.embedding(dw.ptr, dids.ptr, dout.ptr, tokens, row_bytes, (rows, start, vocab), dbad.ptr).unwrap();
        let mut got = vec![0u8; tokens * row_bytes];
        gpu.download(dout.ptr, &mut got).unwrap();
        let mut flag = [0u8; 8];
        gpu.download(dbad.ptr, &mut flag).unwrap();
        let ok = got == want && flag == [0u8; 8];
        rep.failed |= !ok;
        let what = format!("embedding (executor) {tokens} x {row_bytes} B, rows {start}..{} of {vocab}", start + rows);
        println!("{what:<60} {}", if ok { "ok" } else { "FAILED" });
        // An id past the table and a negative one: flagged (`bad_index` gives them back), their
        // rows zero.
        for wrong in [vocab as i64, -1] {
            let ids: Vec<u8> = [3i64, wrong, 5].iter().flat_map(|i| i.to_le_bytes()).collect();
            let (dids, dbad) = (up(&ids), up(&[0u8; 8]));
            gpu.embedding(dw.ptr, dids.ptr, dout.ptr, 3, row_bytes, (rows, start, vocab), dbad.ptr).unwrap();
            let mut got = vec![0u8; 3 * row_bytes];
            gpu.download(dout.ptr, &mut got).unwrap();
            let mut flag = [0u8; 8];
            gpu.download(dbad.ptr, &mut flag).unwrap();
            let read = bad_index(i64::from_le_bytes(flag));
            let ok = read == Some(wrong) && got[row_bytes..2 * row_bytes].iter().all(|&b| b == 0);
            rep.failed |= !ok;
            println!(
                "{:<60} {}",
                format!("embedding (executor) id {wrong} of {vocab}: flagged as {read:?}"),
                if ok { "ok" } else { "FAILED" }
            );
        }
    }
}

/// The executor's decode GEMVs (bf16, one row of activations): plain, accumulating into y, and
/// the gate/up + SwiGLU one, against the CPU on the same bf16-rounded inputs; rows not a
/// multiple of the kernel's block, k from 896 to 14336.
fn check_gemv(gpu: &Gpu, rep: &mut Report) {
    let up = |v: &[f32]| {
        let raw: Vec<u8> = v.iter().flat_map(|&x| bf16(x).to_le_bytes()).collect();
        let b = gpu.alloc(raw.len(), "gemv check input").unwrap();
        gpu.upload(b.ptr, &raw).unwrap();
        b
    };
    let down = |p: u64, n: usize| -> Vec<f32> {
        let mut raw = vec![0u8; n * 2];
        gpu.download(p, &mut raw).unwrap();
        raw.chunks_exact(2).map(|c| f32_of(u16::from_le_bytes([c[0], c[1]]))).collect()
    };
    let r = |n: usize, seed: u32| -> Vec<f32> { rand(n, seed).into_iter().map(|x| rnd(true, x)).collect() };
    for (n, k) in [(6144usize, 4096usize), (4099, 2048), (1000, 14336), (300, 896)] {
        let (x, w, y0) = (r(k, 31), r(2 * n * k, 32), r(n, 33));
        let dot = |row: usize| -> f32 { (0..k).map(|j| x[j] * w[row * k + j]).sum() };
        let (dx, dw) = (up(&x), up(&w));
        // Dot products of k terms in another order: 1e-5 of the terms' magnitude (k · 1 · 1).
        let atol = 1e-5 * k as f32;
        for acc in [false, true] {
            let dy = up(&y0);
            assert!(gpu.gemv(Dt::BF16, 1, n, k, dx.ptr, dw.ptr, dy.ptr, acc).unwrap());
            let want: Vec<f32> = (0..n).map(|i| rnd(true, dot(i) + if acc { y0[i] } else { 0.0 })).collect();
            let what = format!("gemv/{} {n}x{k}{}", gpu.gemv_split, if acc { " +=" } else { "" });
            rep.check_scaled(&what, true, &down(dy.ptr, n), &want, atol);
        }
        let dout = up(&y0);
        assert!(gpu.gemv_swiglu(Dt::BF16, 1, n, k, dx.ptr, dw.ptr, dout.ptr).unwrap());
        let want: Vec<f32> = (0..n)
            .map(|i| {
                let (g, u) = (rnd(true, dot(i)), rnd(true, dot(n + i)));
                rnd(true, rnd(true, g / (1.0 + (-g).exp())) * u)
            })
            .collect();
        rep.check_scaled(&format!("gemv_swiglu/{} {n}x{k}", gpu.swiglu_split), true, &down(dout.ptr, n), &want, atol);
    }
    // The executor's SiLU-mul over bf16 rows: gate and up in one [rows, 2·inter] tensor or two,
    // at an inter the 8-wide kernel takes and one it does not, and more rows than a grid's y
    // dimension holds (the 8-wide kernel strides past 65,535).
    for (rows, inter) in [(5usize, 1536usize), (3, 1500), (70_000, 8)] {
        let gu = r(rows * 2 * inter, 34);
        let want: Vec<f32> = (0..rows * inter)
            .map(|i| {
                let (g, u) = (gu[i / inter * 2 * inter + i % inter], gu[i / inter * 2 * inter + inter + i % inter]);
                rnd(true, rnd(true, g / (1.0 + (-g).exp())) * u)
            })
            .collect();
        let (gate, up_half): (Vec<f32>, Vec<f32>) = (
            gu.chunks(2 * inter).flat_map(|row| row[..inter].to_vec()).collect(),
            gu.chunks(2 * inter).flat_map(|row| row[inter..].to_vec()).collect(),
        );
        let (dgu, dg, du, dout) = (up(&gu), up(&gate), up(&up_half), up(&vec![0.0; rows * inter]));
        gpu.silu_mul(dgu.ptr, None, Dt::BF16, dout.ptr, None, rows, inter, GateAct::Silu).unwrap();
        rep.check(
            &format!("silu_mul (executor) {rows}x{inter} [gate | up]"),
            true,
            &down(dout.ptr, rows * inter),
            &want,
        );
        gpu.silu_mul(dg.ptr, Some(du.ptr), Dt::BF16, dout.ptr, None, rows, inter, GateAct::Silu).unwrap();
        rep.check(&format!("silu_mul (executor) {rows}x{inter} gate, up"), true, &down(dout.ptr, rows * inter), &want);
    }
}
