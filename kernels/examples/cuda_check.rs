//! Runs every CUDA kernel on the GPU against a CPU reference, f32 and bf16, and prints the
//! largest error of each; exits non-zero if one is outside its tolerance.
//!
//!   cargo run --release -p autodeploy-kernels --example cuda_check [-- ORDINAL]
//!
//! Tolerances: f32 1e-5 relative (summation order); bf16 two bf16 ulps of the larger of the two
//! values (2/128 relative): a block sum in another order can move RMSNorm's f32 scale by an ulp,
//! `x·r` then rounds one bf16 ulp away, and the weight multiplies that step (|w| up to 2 here).
use std::process::ExitCode;

use autodeploy_kernels::cuda::Device;
use cudarc::driver::{LaunchConfig, PushKernelArg};

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
    // Paged attention over a ragged batch: a decode token (37 cached), a 20-token prefill, and 3
    // tokens whose positions cross a page boundary; pages scattered; GQA 1, 4, 8; head dim 64, 128.
    for bf in [false, true] {
        for (heads, kv_heads) in [(8usize, 8usize), (8, 2), (16, 2)] {
            for d in [64usize, 128] {
                let page = 16usize;
                let seqs: [(usize, usize); 3] = [(37, 1), (0, 20), (15, 3)]; // (cached, new)
                let mut page_tables: Vec<Vec<i32>> = Vec::new();
                let mut next_page = 0i32;
                for (c, n) in seqs {
                    let pages = (c + n).div_ceil(page);
                    // Scattered: this sequence's pages interleave with unused ones.
                    page_tables.push((0..pages).map(|i| next_page + 2 * i as i32 + 1).collect());
                    next_page += 2 * pages as i32 + 1;
                }
                let slots = next_page as usize * page;
                let (mut tseq, mut tpos) = (Vec::new(), Vec::new());
                for (si, (c, n)) in seqs.iter().enumerate() {
                    for p in *c..c + n {
                        tseq.push(si as i64);
                        tpos.push(p as i64);
                    }
                }
                let tokens = tseq.len();
                let r = |n: usize, seed: u32| -> Vec<f32> { rand(n, seed).into_iter().map(|x| rnd(bf, x)).collect() };
                let (mut kc, mut vc) = (r(slots * kv_heads * d, 21), r(slots * kv_heads * d, 22));
                let (q, k, v) = (r(heads * tokens * d, 23), r(kv_heads * tokens * d, 24), r(kv_heads * tokens * d, 25));
                let scale = 1.0 / (d as f32).sqrt();
                let indptr: Vec<i64> = std::iter::once(0)
                    .chain(page_tables.iter().scan(0i64, |a, t| {
                        *a += t.len() as i64;
                        Some(*a)
                    }))
                    .collect();
                let indices: Vec<i32> = page_tables.concat();
                let slot = |s: usize, p: usize| page_tables[s][p / page] as usize * page + p % page;
                // Device side.
                let sfx = if bf { "bf16" } else { "f32" };
                let dev_ints = (
                    s.memcpy_stod(&tseq).unwrap(),
                    s.memcpy_stod(&tpos).unwrap(),
                    s.memcpy_stod(&indptr).unwrap(),
                    s.memcpy_stod(&indices).unwrap(),
                );
                let (ps, kvh_i, tok_i, d_i, h_i) =
                    (page as i32, kv_heads as i32, tokens as i64, d as i32, heads as i32);
                macro_rules! run {
                    ($ty:ty, $conv:expr, $back:expr) => {{
                        let up = |v: &[f32]| s.memcpy_stod(&v.iter().map(|&x| $conv(x)).collect::<Vec<$ty>>()).unwrap();
                        let (dq, dk, dv) = (up(&q), up(&k), up(&v));
                        let (mut dkc, mut dvc) = (up(&kc), up(&vc));
                        let mut dout = s.alloc_zeros::<$ty>(heads * tokens * d).unwrap();
                        let f = dev.function(&format!("write_kv_{sfx}")).unwrap();
                        let mut b = s.launch_builder(&f);
                        b.arg(&dk).arg(&dv).arg(&mut dkc).arg(&mut dvc);
                        b.arg(&dev_ints.0).arg(&dev_ints.1).arg(&dev_ints.2).arg(&dev_ints.3);
                        b.arg(&ps).arg(&kvh_i).arg(&tok_i).arg(&d_i);
                        // SAFETY: matches write_kv's signature; every slot addressed is in the caches.
                        unsafe { b.launch(LaunchConfig::for_num_elems((kv_heads * tokens * d) as u32)) }.unwrap();
                        let f = dev.function(&format!("paged_attention_d{d}_{sfx}")).unwrap();
                        let mut b = s.launch_builder(&f);
                        b.arg(&dq).arg(&dkc).arg(&dvc);
                        b.arg(&dev_ints.0).arg(&dev_ints.1).arg(&dev_ints.2).arg(&dev_ints.3);
                        b.arg(&ps).arg(&h_i).arg(&kvh_i).arg(&tok_i).arg(&scale).arg(&mut dout);
                        let cfg = LaunchConfig {
                            grid_dim: (tokens as u32, heads as u32, 1),
                            block_dim: (128, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        // SAFETY: matches paged_attention's signature.
                        unsafe { b.launch(cfg) }.unwrap();
                        let back = |d: &cudarc::driver::CudaSlice<$ty>| -> Vec<f32> {
                            s.memcpy_dtov(d).unwrap().into_iter().map($back).collect()
                        };
                        (back(&dout), back(&dkc))
                    }};
                }
                let (got, got_kc) = if bf { run!(u16, bf16, f32_of) } else { run!(f32, |x: f32| x, |x: f32| x) };
                // Reference: the same cache writes, then causal attention per (token, head).
                for t in 0..tokens {
                    let sl = slot(tseq[t] as usize, tpos[t] as usize);
                    for j in 0..kv_heads {
                        let (src, dst) = ((j * tokens + t) * d, (sl * kv_heads + j) * d);
                        kc[dst..dst + d].copy_from_slice(&k[src..src + d]);
                        vc[dst..dst + d].copy_from_slice(&v[src..src + d]);
                    }
                }
                let mut want = vec![0f32; heads * tokens * d];
                for h in 0..heads {
                    let j = h / (heads / kv_heads);
                    for t in 0..tokens {
                        let qr = &q[(h * tokens + t) * d..(h * tokens + t + 1) * d];
                        let sc: Vec<f32> = (0..=tpos[t] as usize)
                            .map(|p| {
                                let at = (slot(tseq[t] as usize, p) * kv_heads + j) * d;
                                qr.iter().zip(&kc[at..at + d]).map(|(a, b)| a * b).sum::<f32>() * scale
                            })
                            .collect();
                        let mx = sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                        let e: Vec<f32> = sc.iter().map(|x| (x - mx).exp()).collect();
                        let sum: f32 = e.iter().sum();
                        let o = &mut want[(h * tokens + t) * d..(h * tokens + t + 1) * d];
                        for (p, w) in e.iter().enumerate() {
                            let at = (slot(tseq[t] as usize, p) * kv_heads + j) * d;
                            for (x, vv) in o.iter_mut().zip(&vc[at..at + d]) {
                                *x += w / sum * vv;
                            }
                        }
                        o.iter_mut().for_each(|x| *x = rnd(bf, *x));
                    }
                }
                let name = format!("paged attn h{heads}/kv{kv_heads} d{d}");
                rep.check_scaled(&name, bf, &got, &want, 1e-5);
                rep.check("  k cache after write", bf, &got_kc, &kc);
            }
        }
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
