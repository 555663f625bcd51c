//! `cuda_check`'s attention checks: the executor's KV writes, ragged paged prefill (CUDA cores
//! and tensor cores), split-KV decode builds (throughput, latency, tensor cores), an FP8 cache,
//! and the slot kernel, against one CPU reference.

use super::*;
use autodeploy_kernels::cuda::exec::{
    decode_prefix_count, plan_tiles, prefill_heads_a_block, HeadRows, ScoreMods, Split, StepMeta, PREFILL_TC_DIMS,
};

/// One attention configuration through the three kernels; see the call in `main`.
pub(crate) fn check_attention(gpu: &Gpu, rep: &mut Report, bf: bool, heads: usize, kv_heads: usize, d: usize) {
    let page = 16usize;
    let seqs: [(usize, usize); 3] = [(37, 1), (0, 20), (15, 3)]; // (cached, new)
                                                                 // Scattered pages (flashinfer): each sequence's pages interleave with unused ones.
                                                                 // Slots (triton): each sequence owns a run of `slot` consecutive pages.
    let slot = 4usize;
    let (mut scattered, mut slots): (Vec<Vec<i32>>, Vec<Vec<i32>>) = (Vec::new(), Vec::new());
    let mut next = 0i32;
    for (i, (c, n)) in seqs.iter().enumerate() {
        let pages = (c + n).div_ceil(page);
        scattered.push((0..pages).map(|j| next + 2 * j as i32 + 1).collect());
        next += 2 * pages as i32 + 1;
        slots.push((0..pages).map(|j| (i * slot + j) as i32).collect());
    }
    let n_pages = (next as usize).max(seqs.len() * slot);
    let rows = n_pages * page;
    let (mut tseq, mut tpos, mut start) = (Vec::new(), Vec::new(), Vec::new());
    for (si, (c, n)) in seqs.iter().enumerate() {
        start.push(tseq.len() as i64);
        for p in *c..c + n {
            tseq.push(si as i64);
            tpos.push(p as i64);
        }
    }
    let cached: Vec<i64> = seqs.iter().map(|s| s.0 as i64).collect();
    let tokens = tseq.len();
    let r = |n: usize, seed: u32| -> Vec<f32> { rand(n, seed).into_iter().map(|x| rnd(bf, x)).collect() };
    let (kc0, vc0) = (r(rows * kv_heads * d, 21), r(rows * kv_heads * d, 22));
    let (q, k, v) = (r(heads * tokens * d, 23), r(kv_heads * tokens * d, 24), r(kv_heads * tokens * d, 25));
    let scale = 1.0 / (d as f32).sqrt();
    let dt = if bf { Dt::BF16 } else { Dt::F32 };
    let bytes = |v: &[f32]| -> Vec<u8> {
        if bf {
            v.iter().flat_map(|&x| bf16(x).to_le_bytes()).collect()
        } else {
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
    };
    let back = |raw: &[u8]| -> Vec<f32> {
        if bf {
            raw.chunks_exact(2).map(|c| f32_of(u16::from_le_bytes([c[0], c[1]]))).collect()
        } else {
            raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        }
    };
    let mut keep = Vec::new();
    let mut put = |raw: Vec<u8>| -> u64 {
        let b = gpu.alloc(raw.len(), "attention check input").unwrap();
        gpu.upload(b.ptr, &raw).unwrap();
        let p = b.ptr;
        keep.push(b);
        p
    };
    let ints64 = |v: &[i64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let ints32 = |v: &[i32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let csr = |tables: &[Vec<i32>]| -> (Vec<i64>, Vec<i32>) {
        let mut indptr = vec![0i64];
        for t in tables {
            indptr.push(indptr.last().unwrap() + t.len() as i64);
        }
        (indptr, tables.concat())
    };
    let (dq, dk, dv) = (put(bytes(&q)), put(bytes(&k)), put(bytes(&v)));
    // The same q, k, v as one fused q/k/v linear leaves them: [tokens, (heads + 2 kv_heads) d].
    let width = (heads + 2 * kv_heads) * d;
    let mut fused = vec![0f32; tokens * width];
    for t in 0..tokens {
        for (x, n, at) in [(&q, heads, 0), (&k, kv_heads, heads * d), (&v, kv_heads, (heads + kv_heads) * d)] {
            for h in 0..n {
                let src = (h * tokens + t) * d;
                fused[t * width + at + h * d..][..d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    let dfused = put(bytes(&fused));
    let esize = if bf { 2u64 } else { 4 };
    let fused_qkv = (dfused, dfused + (heads * d) as u64 * esize, dfused + ((heads + kv_heads) * d) as u64 * esize);
    let fused_rows = HeadRows { head: d as i64, token: width as i64 };
    let (ts, tp, ss, cl) = (put(ints64(&tseq)), put(ints64(&tpos)), put(ints64(&start)), put(ints64(&cached)));
    let tiles = plan_tiles(&tseq, &tpos, seqs.len());
    let dtiles = put(ints64(&tiles));
    let meta_for = |put: &mut dyn FnMut(Vec<u8>) -> u64, tables: &[Vec<i32>]| {
        let (indptr, indices) = csr(tables);
        StepMeta {
            tokens,
            page_size: page,
            token_seq: ts,
            token_pos: tp,
            page_indptr: put(ints64(&indptr)),
            page_indices: put(ints32(&indices)),
            seq_start: ss,
            cached_len: cl,
            tiles: dtiles,
            tile_slots: tiles.len() / 2,
            decode_prefix: decode_prefix_count(&tseq),
        }
    };
    let m_scattered = meta_for(&mut put, &scattered);
    let m_slots = meta_for(&mut put, &slots);
    let esz = if bf { 2 } else { 4 };
    let out_bytes = heads * tokens * d * esz;
    let cache_bytes = rows * kv_heads * d * esz;
    // CPU reference over a page table: the step's k/v written at their positions, then causal
    // attention per (token, head).
    // (`reference_over`: the same from other cache contents and v, e.g. an FP8 cache's values.)
    let reference_over = |tables: &[Vec<i32>],
                          q: &[f32],
                          k: &[f32],
                          v: &[f32],
                          (kc0, vc0): (&[f32], &[f32])|
     -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let at = |s: usize, p: usize| tables[s][p / page] as usize * page + p % page;
        let (mut kc, mut vc) = (kc0.to_vec(), vc0.to_vec());
        for t in 0..tokens {
            let sl = at(tseq[t] as usize, tpos[t] as usize);
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
                        let o = (at(tseq[t] as usize, p) * kv_heads + j) * d;
                        qr.iter().zip(&kc[o..o + d]).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let mx = sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f32> = sc.iter().map(|x| (x - mx).exp()).collect();
                let sum: f32 = e.iter().sum();
                let o = &mut want[(h * tokens + t) * d..(h * tokens + t + 1) * d];
                for (p, w) in e.iter().enumerate() {
                    let a = (at(tseq[t] as usize, p) * kv_heads + j) * d;
                    for (x, vv) in o.iter_mut().zip(&vc[a..a + d]) {
                        *x += w / sum * vv;
                    }
                }
                o.iter_mut().for_each(|x| *x = rnd(bf, *x));
            }
        }
        (want, kc, vc)
    };
    let reference = |tables: &[Vec<i32>], q: &[f32], k: &[f32]| reference_over(tables, q, k, &v, (&kc0, &vc0));
    let fresh_cache = |put: &mut dyn FnMut(Vec<u8>) -> u64| (put(bytes(&kc0)), put(bytes(&vc0)));
    let read = |ptr: u64, n: usize| {
        let mut raw = vec![0u8; n];
        gpu.sync().unwrap();
        gpu.download(ptr, &mut raw).unwrap();
        back(&raw)
    };
    let name = |kernel: &str| format!("{kernel} h{heads}/kv{kv_heads} d{d}");
    let (want_s, want_kc_s, want_vc_s) = reference(&scattered, &q, &k);
    // RoPE (rotate-half, rounded as the `rope` kernel) of [rows, tokens, d] with a [tokens, d]
    // table, for the split-KV kernel's own rotation.
    let (cos, sin) = (r(tokens * d, 26), r(tokens * d, 27));
    let rope = |x: &[f32]| -> Vec<f32> {
        let half = d / 2;
        (0..x.len())
            .map(|i| {
                let (row, j) = (i / d, i % d);
                let tt = row % tokens;
                let rot = if j < half { -x[i + half] } else { x[i - half] };
                rnd(bf, rnd(bf, x[i] * cos[tt * d + j]) + rnd(bf, rot * sin[tt * d + j]))
            })
            .collect()
    };
    let (want_r, want_kc_r, want_vc_r) = reference(&scattered, &rope(&q), &rope(&k));
    // The q/k norms fused before the RoPE (`qk_norm`): each head row RMS-normalised with its
    // weight row, the norm's dtype the model's (`rmsnorm`'s rounding), then rotated.
    let (qn, kn, neps) = (r(d, 28), r(d, 29), 1e-6f32);
    let norm = |x: &[f32], w: &[f32]| -> Vec<f32> {
        x.chunks(d)
            .flat_map(|row| {
                let ss = row.iter().map(|a| a * a).sum::<f32>();
                let inv = 1.0 / (ss / d as f32 + neps).sqrt();
                row.iter().zip(w).map(move |(a, wj)| rnd(bf, wj * rnd(bf, a * inv)))
            })
            .collect()
    };
    let (want_n, want_kc_n, want_vc_n) = reference(&scattered, &rope(&norm(&q, &qn)), &rope(&norm(&k, &kn)));
    let (dqn, dkn) = (put(bytes(&qn)), put(bytes(&kn)));
    let (dcos, dsin) = (put(bytes(&cos)), put(bytes(&sin)));
    // flashinfer, ragged prefill kernel: one block per token on CUDA cores, and (bf16, sm_80+)
    // one warp per tile of 16 tokens on tensor cores, one head a block and (`prefill_group`,
    // where the GQA group allows) a group's heads a block.
    let tc_applies = bf && gpu.dev.cc.0 >= 8 && PREFILL_TC_DIMS.contains(&d);
    // Also the way `flashinfer` runs a mixed step with `mixed_step_split_decodes`: its decode
    // prefix (sequence 0's one token) through the split-KV decode, the tiles after it on
    // tensor cores.
    let (group0, grouped) = (gpu.prefill_group(), prefill_heads_a_block(heads, kv_heads) > 1);
    let prefill_ways = [(false, false, false), (true, false, false), (true, true, false), (true, false, true)];
    let prefill_name = |tc: bool, grp: bool, mixed: bool| match (tc, grp, mixed) {
        (false, ..) => "paged",
        (true, _, true) => "paged tensor-core after a split-KV decode prefix",
        (true, false, _) => "paged tensor-core",
        (true, true, _) => "paged tensor-core, heads grouped",
    };
    assert_eq!(m_scattered.decode_prefix, 1, "the step's decode prefix");
    // (Counters zeroed once: the kernel leaves them zero.)
    let prefix_split = Split {
        chunk: 16,
        splits: 4,
        partial: put(vec![0u8; tokens * heads * 4 * (d + 2) * 4]),
        counters: put(vec![0u8; tokens * heads * 4]),
    };
    let prefill = |m: &StepMeta, q: u64, (kc, vc): (u64, u64), out: (u64, HeadRows), mods: ScoreMods, mixed: bool| {
        if mixed {
            let split = prefix_split;
            gpu.paged_decode_split_prefix(dt, q, (kc, vc), out, m, heads, kv_heads, d, scale, split, mods).unwrap();
            gpu.paged_attention(dt, q, kc, vc, out, &m.after_decode_prefix(), heads, kv_heads, d, scale, mods).unwrap();
        } else {
            gpu.paged_attention(dt, q, kc, vc, out, m, heads, kv_heads, d, scale, mods).unwrap();
        }
    };
    for (tc, grp, mixed) in prefill_ways {
        if tc && !tc_applies || grp && !grouped {
            continue;
        }
        gpu.set_prefill_group(grp);
        let (kc, vc) = fresh_cache(&mut put);
        let out = put(vec![0u8; out_bytes]);
        gpu.write_kv(dt, dk, dv, kc, vc, &m_scattered, kv_heads, d, None).unwrap();
        let mut m = m_scattered;
        if !tc {
            m.tile_slots = 0; // no tiles planned: the CUDA-core kernel
        }
        // Written token-major (the o projection's input), transposed back here; the FP8-cache
        // runs below write heads-major.
        let rows = HeadRows::tokens_major(heads, d);
        prefill(&m, dq, (kc, vc), (out, rows), ScoreMods::default(), mixed);
        let tm = read(out, out_bytes);
        let mut got = tm.clone();
        for t in 0..tokens {
            for h in 0..heads {
                got[(h * tokens + t) * d..][..d].copy_from_slice(&tm[(t * heads + h) * d..][..d]);
            }
        }
        rep.check_scaled(&name(prefill_name(tc, grp, mixed)), bf, &got, &want_s, 1e-5);
        rep.exact("  k cache after write", bf, &read(kc, cache_bytes), &want_kc_s);
        rep.exact("  v cache after write", bf, &read(vc, cache_bytes), &want_vc_s);
    }
    gpu.set_prefill_group(group0);
    // flashinfer, split-KV decode kernel, both builds (throughput, and latency: first K/V loads
    // before the wait): 16-position chunks (several per sequence) and one 64-position chunk
    // (several passes); the step's k/v straight from the linears, written into the cache by the
    // kernel, with and without its own RoPE of q and k; the throughput build one query head a
    // block and a GQA group's heads together; the latency build at 8 and at 4 positions a warp
    // and pass (`Gpu::attn_early_u`); the tensor-core build with its plain fragment loads and with
    // ldmatrix (`Gpu::decode_ldmatrix`).
    let (early_u, group, decode_tc, ldsm0) =
        (gpu.attn_early_u(), gpu.attn_group(), gpu.decode_tc(), gpu.decode_ldmatrix());
    for (chunk, splits, early, u, grouped, tc, ldsm) in [
        (16usize, 4usize, false, 8, false, false, false),
        (64, 1, false, 8, false, false, false),
        (16, 4, false, 8, true, false, false),
        (64, 1, false, 8, true, false, false),
        (16, 4, false, 8, true, true, false),
        (64, 1, false, 8, true, true, false),
        (16, 4, false, 8, true, true, true),
        (64, 1, false, 8, true, true, true),
        (16, 4, true, 8, false, false, false),
        (64, 1, true, 8, false, false, false),
        (16, 4, true, 4, false, false, false),
        (64, 1, true, 4, false, false, false),
        // Two chunks of 8 cover 16 positions: the kernels lengthen a longer sequence's chunks
        // (position 37: two of 24; 19: two of 16), as an engine planned for sequences longer
        // than 32 chunks of its least chunk runs them (`token_chunk`).
        (8, 2, false, 8, false, false, false),
        (8, 2, false, 8, true, false, false),
        (8, 2, false, 8, true, true, false),
        (8, 2, true, 8, false, false, false),
        (8, 2, true, 4, false, false, false),
    ] {
        gpu.set_attn_early_u(u);
        gpu.set_attn_group(grouped);
        gpu.set_decode_tc(tc);
        gpu.set_decode_ldmatrix(ldsm);
        if tc && !gpu.decode_tc_applies(dt, heads, kv_heads, d, ScoreMods::default()) {
            continue;
        }
        for (rotate, normed) in [(false, false), (true, false), (true, true)] {
            let (kc, vc) = fresh_cache(&mut put);
            let out = put(vec![0u8; out_bytes]);
            let qk_norm = normed.then_some((dqn, dkn, neps));
            let split = Split {
                chunk,
                splits,
                partial: put(vec![0u8; tokens * heads * splits * (d + 2) * 4]),
                counters: put(vec![0u8; tokens * heads * 4]),
            };
            let tables = rotate.then_some((dcos, dsin));
            // The grouped runs also read q/k/v from the fused linear's output (with RoPE) and
            // write [tokens, heads, d], transposed back below.
            let out_rows = if grouped { HeadRows::tokens_major(heads, d) } else { HeadRows::heads_major(tokens, d) };
            if early {
                let qkv = (dq, dk, dv);
                gpu.paged_decode_split_fused(
                    dt,
                    qkv,
                    tables,
                    qk_norm,
                    (kc, vc),
                    (out, out_rows),
                    &m_scattered,
                    heads,
                    kv_heads,
                    d,
                    scale,
                    split,
                    None,
                )
            } else {
                // The throughput build reads rotated q and the step's k/v from the cache.
                let q = match tables {
                    Some((c, s)) => {
                        let q_out = put(vec![0u8; out_bytes]);
                        let (qkv, rows) = if grouped {
                            (fused_qkv, [fused_rows; 3])
                        } else {
                            ((dq, dk, dv), [HeadRows::heads_major(tokens, d); 3])
                        };
                        let m = &m_scattered;
                        gpu.rope_write_kv(dt, qkv, rows, (c, s), qk_norm, q_out, (kc, vc), m, heads, kv_heads, d, None)
                            .unwrap();
                        q_out
                    }
                    None => {
                        gpu.write_kv(dt, dk, dv, kc, vc, &m_scattered, kv_heads, d, None).unwrap();
                        dq
                    }
                };
                gpu.paged_decode_split(
                    dt,
                    q,
                    (kc, vc),
                    (out, out_rows),
                    &m_scattered,
                    heads,
                    kv_heads,
                    d,
                    scale,
                    split,
                    ScoreMods::default(),
                )
            }
            .unwrap();
            let what = format!(
                "split-KV decode{}{} /{chunk}x{splits}",
                if early {
                    format!(" early u{u}")
                } else if tc {
                    (if ldsm { " tensor cores ldmatrix" } else { " tensor cores" }).to_string()
                } else if grouped {
                    format!(" {} heads a block", gpu.decode_heads_a_block(heads, kv_heads, d))
                } else {
                    String::new()
                },
                prep_label(rotate, normed)
            );
            let (want, want_kc, want_vc) = match (rotate, normed) {
                (_, true) => (&want_n, &want_kc_n, &want_vc_n),
                (true, false) => (&want_r, &want_kc_r, &want_vc_r),
                _ => (&want_s, &want_kc_s, &want_vc_s),
            };
            let mut got = read(out, out_bytes);
            if grouped {
                let tm = got.clone();
                for t in 0..tokens {
                    for h in 0..heads {
                        got[(h * tokens + t) * d..][..d].copy_from_slice(&tm[(t * heads + h) * d..][..d]);
                    }
                }
            }
            rep.check_scaled(&name(&what), bf, &got, want, 1e-5);
            // Written k is a copy, or (with RoPE) the rotation rounded as the reference rounds
            // it, up to the kernel's fused multiply-adds; v is always a copy.
            if rotate {
                // (Normed: the sum of squares in another order may move a value by an ulp.)
                rep.check("  k cache after rope write", bf, &read(kc, cache_bytes), want_kc);
            } else {
                rep.exact("  k cache after write", bf, &read(kc, cache_bytes), want_kc);
            }
            rep.exact("  v cache after write", bf, &read(vc, cache_bytes), want_vc);
        }
    }
    // An FP8 KV cache (`_fp8kv` builds): E4M3 codes of x / k_scale and x / v_scale, one byte a
    // value; the reference attends over those codes' values times the scales.
    {
        use autodeploy_kernels::quant::lowbit::{e4m3_to_f32, f32_to_e4m3};
        let (ks, vs) = (0.011f32, 0.017f32);
        let codes = |x: &[f32], s: f32| -> Vec<u8> { x.iter().map(|&v| f32_to_e4m3(v / s)).collect() };
        let deq = |x: &[f32], s: f32| -> Vec<f32> { x.iter().map(|&v| e4m3_to_f32(f32_to_e4m3(v / s)) * s).collect() };
        let values = |raw: &[u8], s: f32| -> Vec<f32> { raw.iter().map(|&c| e4m3_to_f32(c) * s).collect() };
        let (kc8, vc8) = (codes(&kc0, ks), codes(&vc0, vs));
        let (kd0, vd0) = (deq(&kc0, ks), deq(&vc0, vs));
        let (want8, want8_kc, want8_vc) = reference_over(&scattered, &q, &deq(&k, ks), &deq(&v, vs), (&kd0, &vd0));
        let rk = rope(&k);
        let (want8_r, want8_kc_r, want8_vc_r) =
            reference_over(&scattered, &rope(&q), &deq(&rk, ks), &deq(&v, vs), (&kd0, &vd0));
        let nk = rope(&norm(&k, &kn));
        let (want8_n, want8_kc_n, want8_vc_n) =
            reference_over(&scattered, &rope(&norm(&q, &qn)), &deq(&nk, ks), &deq(&v, vs), (&kd0, &vd0));
        let n_cache = rows * kv_heads * d;
        let read8 = |ptr: u64, s: f32| {
            let mut raw = vec![0u8; n_cache];
            gpu.sync().unwrap();
            gpu.download(ptr, &mut raw).unwrap();
            values(&raw, s)
        };
        let kv = Some((ks, vs));
        let mods = ScoreMods { kv_fp8: kv, ..ScoreMods::default() };
        // write_kv + the ragged prefill kernel, on CUDA cores and (bf16) on tensor cores, the
        // FP8 tiles converted to bf16 as they are staged.
        for (tc, grp, mixed) in prefill_ways {
            if tc && !tc_applies || grp && !grouped {
                continue;
            }
            gpu.set_prefill_group(grp);
            let (kc, vc) = (put(kc8.clone()), put(vc8.clone()));
            let out = put(vec![0u8; out_bytes]);
            gpu.write_kv(dt, dk, dv, kc, vc, &m_scattered, kv_heads, d, kv).unwrap();
            let mut m = m_scattered;
            if !tc {
                m.tile_slots = 0;
            }
            let rows = HeadRows::heads_major(tokens, d);
            prefill(&m, dq, (kc, vc), (out, rows), mods, mixed);
            let what = format!("{}, FP8 cache", prefill_name(tc, grp, mixed));
            rep.check_scaled(&name(&what), bf, &read(out, out_bytes), &want8, 1e-5);
            rep.exact("  k cache after write (FP8 values)", false, &read8(kc, ks), &want8_kc);
            rep.exact("  v cache after write (FP8 values)", false, &read8(vc, vs), &want8_vc);
        }
        gpu.set_prefill_group(group0);
        // The tensor-core build three ways: fragments from the codes (`Gpu::decode_fp8_codes`),
        // bf16 tiles with plain loads, with ldmatrix.
        let codes0 = gpu.decode_fp8_codes();
        for (early, u, grouped, tc, rotate, ldsm, normed, codes) in [
            (false, 8, false, false, false, false, false, false),
            (false, 8, true, false, true, false, false, false),
            (false, 8, true, true, true, false, false, true),
            (false, 8, true, true, true, false, false, false),
            (false, 8, true, true, true, true, false, false),
            (true, 8, false, false, false, false, false, false),
            (true, 4, false, false, true, false, false, false),
            (true, 8, false, false, true, false, false, false),
            (false, 8, false, false, true, false, true, false),
            (true, 4, false, false, true, false, true, false),
        ] {
            let qk_norm = normed.then_some((dqn, dkn, neps));
            gpu.set_attn_early_u(u);
            gpu.set_attn_group(grouped);
            gpu.set_decode_tc(tc);
            gpu.set_decode_ldmatrix(ldsm);
            gpu.set_decode_fp8_codes(codes);
            if tc && !gpu.decode_tc_applies(dt, heads, kv_heads, d, mods) {
                continue;
            }
            let (chunk, splits) = (16usize, 4usize);
            let (kc, vc) = (put(kc8.clone()), put(vc8.clone()));
            let out = put(vec![0u8; out_bytes]);
            let split = Split {
                chunk,
                splits,
                partial: put(vec![0u8; tokens * heads * splits * (d + 2) * 4]),
                counters: put(vec![0u8; tokens * heads * 4]),
            };
            let tables = rotate.then_some((dcos, dsin));
            let out_rows = HeadRows::heads_major(tokens, d);
            if early {
                let (qkv, c) = ((dq, dk, dv), (kc, vc));
                gpu.paged_decode_split_fused(
                    dt,
                    qkv,
                    tables,
                    qk_norm,
                    c,
                    (out, out_rows),
                    &m_scattered,
                    heads,
                    kv_heads,
                    d,
                    scale,
                    split,
                    kv,
                )
            } else {
                let q = match tables {
                    Some((c, s)) => {
                        let q_out = put(vec![0u8; out_bytes]);
                        let rows3 = [HeadRows::heads_major(tokens, d); 3];
                        gpu.rope_write_kv(
                            dt,
                            (dq, dk, dv),
                            rows3,
                            (c, s),
                            qk_norm,
                            q_out,
                            (kc, vc),
                            &m_scattered,
                            heads,
                            kv_heads,
                            d,
                            kv,
                        )
                        .unwrap();
                        q_out
                    }
                    None => {
                        gpu.write_kv(dt, dk, dv, kc, vc, &m_scattered, kv_heads, d, kv).unwrap();
                        dq
                    }
                };
                gpu.paged_decode_split(
                    dt,
                    q,
                    (kc, vc),
                    (out, out_rows),
                    &m_scattered,
                    heads,
                    kv_heads,
                    d,
                    scale,
                    split,
                    mods,
                )
            }
            .unwrap();
            let what = format!(
                "split-KV decode, FP8 cache{}{}",
                if early {
                    format!(" early u{u}")
                } else if tc && codes {
                    " tensor cores from codes".to_string()
                } else if tc {
                    (if ldsm { " tensor cores ldmatrix" } else { " tensor cores" }).to_string()
                } else if grouped {
                    " grouped".to_string()
                } else {
                    String::new()
                },
                prep_label(rotate, normed)
            );
            let (want, want_kc, want_vc) = match (rotate, normed) {
                (_, true) => (&want8_n, &want8_kc_n, &want8_vc_n),
                (true, false) => (&want8_r, &want8_kc_r, &want8_vc_r),
                _ => (&want8, &want8_kc, &want8_vc),
            };
            rep.check_scaled(&name(&what), bf, &read(out, out_bytes), want, 1e-5);
            rep.check("  k cache after write (FP8 values)", false, &read8(kc, ks), want_kc);
            rep.exact("  v cache after write (FP8 values)", false, &read8(vc, vs), want_vc);
        }
        // triton's slot kernel over an FP8 cache: this step's k/v read through their codes as
        // the cached ones are, then stored as codes.
        let (want8_t, want8_kc_t, want8_vc_t) = reference_over(&slots, &q, &deq(&k, ks), &deq(&v, vs), (&kd0, &vd0));
        let (kc, vc) = (put(kc8.clone()), put(vc8.clone()));
        let out = put(vec![0u8; out_bytes]);
        gpu.slot_attention(dt, (dq, dk, dv), (kc, vc), out, &m_slots, heads, kv_heads, d, scale, kv).unwrap();
        gpu.set_decode_fp8_codes(codes0);
        rep.check_scaled(&name("triton slot, FP8 cache"), bf, &read(out, out_bytes), &want8_t, 1e-5);
        rep.exact("  k cache after write (FP8 values)", false, &read8(kc, ks), &want8_kc_t);
        rep.exact("  v cache after write (FP8 values)", false, &read8(vc, vs), &want8_vc_t);
    }
    gpu.set_attn_early_u(early_u);
    gpu.set_attn_group(group);
    gpu.set_decode_tc(decode_tc);
    gpu.set_decode_ldmatrix(ldsm0);
    // triton, fused write-and-attend over slots.
    let (want_t, want_kc_t, want_vc_t) = reference(&slots, &q, &k);
    let (kc, vc) = fresh_cache(&mut put);
    let out = put(vec![0u8; out_bytes]);
    gpu.slot_attention(dt, (dq, dk, dv), (kc, vc), out, &m_slots, heads, kv_heads, d, scale, None).unwrap();
    rep.check_scaled(&name("triton slot"), bf, &read(out, out_bytes), &want_t, 1e-5);
    rep.exact("  k cache after write", bf, &read(kc, cache_bytes), &want_kc_t);
    rep.exact("  v cache after write", bf, &read(vc, cache_bytes), &want_vc_t);
}

/// What a decode case does to the step's q and k before attending, for its label.
fn prep_label(rotate: bool, normed: bool) -> &'static str {
    match (rotate, normed) {
        (_, true) => " +norm+rope",
        (true, false) => " +rope",
        _ => "",
    }
}
