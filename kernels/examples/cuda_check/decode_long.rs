//! `cuda_check`'s long-sequence checks of the tensor-core split-KV decode (`paged_decode_tc`
//! and, over an FP8 cache, `paged_decode_tc_codes`): sequences of hundreds of positions, so each
//! warp of a block takes many passes (the FP8 build's two stages in flight and reused), chunks
//! that end mid-pass and sequences shorter than one pass, against a CPU reference in f64 over
//! the values the cache holds.

use super::*;
use autodeploy_kernels::cuda::exec::{HeadRows, ScoreMods, Split, StepMeta};
use autodeploy_kernels::quant::lowbit::{e4m3_to_f32, f32_to_e4m3};

/// One decode token a sequence at position `len - 1`, bf16 activations, `heads` query heads over
/// `kv_heads`, head dim `d`: the bf16 cache's tensor-core build (plain and ldmatrix fragment
/// loads) and the FP8 cache's (bf16 staging tiles and fragments from the codes), each at a
/// few chunk sizes.
pub(crate) fn check_long_decode(gpu: &Gpu, rep: &mut Report, heads: usize, kv_heads: usize, d: usize) {
    let page = 16usize;
    let lens = [700usize, 129, 1, 17, 300];
    // Each sequence's pages scattered: page j of sequence i at 2·(its first) + 2j + 1.
    let mut tables: Vec<Vec<i32>> = Vec::new();
    let mut next = 0i32;
    for len in lens {
        let n = len.div_ceil(page);
        tables.push((0..n).map(|j| next + 2 * j as i32 + 1).collect());
        next += 2 * n as i32 + 1;
    }
    let rows = next as usize * page;
    let tokens = lens.len();
    let scale = 1.0 / (d as f32).sqrt();
    let bfr = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| rnd(true, x)).collect() };
    // Keys with a spread of magnitudes, so the softmax is not flat over hundreds of positions.
    let kc: Vec<f32> = bfr(rand(rows * kv_heads * d, 31).into_iter().map(|x| 3.0 * x).collect());
    let vc = bfr(rand(rows * kv_heads * d, 32));
    let q = bfr(rand(heads * tokens * d, 33));
    let (ks, vs) = (0.023f32, 0.009f32);
    let codes = |x: &[f32], s: f32| -> Vec<u8> { x.iter().map(|&v| f32_to_e4m3(v / s)).collect() };
    let (k8, v8) = (codes(&kc, ks), codes(&vc, vs));
    let values = |c: &[u8], s: f32| -> Vec<f32> { c.iter().map(|&b| e4m3_to_f32(b) * s).collect() };
    let (k8v, v8v) = (values(&k8, ks), values(&v8, vs));
    // out[h][t] over the cache's values: slot of position p = table[p / page] · page + p % page.
    let reference = |kv: &[f32], vv: &[f32]| -> Vec<f32> {
        let mut out = vec![0f32; heads * tokens * d];
        for (t, len) in lens.iter().enumerate() {
            for h in 0..heads {
                let kh = h / (heads / kv_heads);
                let qr = &q[(h * tokens + t) * d..][..d];
                let slot = |p: usize| (tables[t][p / page] as usize * page + p % page) * kv_heads + kh;
                let s: Vec<f64> = (0..*len)
                    .map(|p| {
                        let kr = &kv[slot(p) * d..][..d];
                        qr.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let sum: f64 = w.iter().sum();
                for j in 0..d {
                    let o: f64 = (0..*len).map(|p| w[p] * vv[slot(p) * d + j] as f64).sum();
                    out[(h * tokens + t) * d + j] = (o / sum) as f32;
                }
            }
        }
        out
    };
    let (want, want8) = (reference(&kc, &vc), reference(&k8v, &v8v));
    let mut keep = Vec::new();
    let mut put = |raw: Vec<u8>| -> u64 {
        let b = gpu.alloc(raw.len().max(1), "long decode check input").unwrap();
        gpu.upload(b.ptr, &raw).unwrap();
        let p = b.ptr;
        keep.push(b);
        p
    };
    let bf_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|&x| bf16(x).to_le_bytes()).collect() };
    let i64s = |v: &[i64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut indptr = vec![0i64];
    for t in &tables {
        indptr.push(indptr.last().unwrap() + t.len() as i64);
    }
    let indices: Vec<u8> = tables.concat().iter().flat_map(|x| x.to_le_bytes()).collect();
    let seq: Vec<i64> = (0..tokens as i64).collect();
    let pos: Vec<i64> = lens.iter().map(|&l| l as i64 - 1).collect();
    let ts = put(i64s(&seq));
    let meta = StepMeta {
        tokens,
        page_size: page,
        token_seq: ts,
        token_pos: put(i64s(&pos)),
        page_indptr: put(i64s(&indptr)),
        page_indices: put(indices),
        seq_start: ts,
        cached_len: put(i64s(&pos)),
        tiles: ts,
        tile_slots: 0,
        decode_prefix: 0,
    };
    let dq = put(bf_bytes(&q));
    let caches = [(put(bf_bytes(&kc)), put(bf_bytes(&vc))), (put(k8), put(v8))];
    let saved = (gpu.attn_group(), gpu.decode_tc(), gpu.decode_ldmatrix(), gpu.decode_fp8_codes());
    gpu.set_attn_group(true);
    gpu.set_decode_tc(true);
    let out_bytes = heads * tokens * d * 2;
    let longest = *lens.iter().max().unwrap();
    for (fp8, alt) in [(false, false), (false, true), (true, false), (true, true)] {
        // alt: ldmatrix for the bf16 cache; the bf16 staging tiles for the FP8 one.
        gpu.set_decode_ldmatrix(alt && !fp8);
        gpu.set_decode_fp8_codes(!(fp8 && alt));
        let mods = ScoreMods { kv_fp8: fp8.then_some((ks, vs)), ..ScoreMods::default() };
        if !gpu.decode_tc_applies(Dt::BF16, heads, kv_heads, d, mods) {
            continue;
        }
        // The last: 4 chunks of 64 cover 256 positions, so the kernel lengthens the longer
        // sequences' chunks (700 positions: 4 of 192; 300: 4 of 128).
        for (chunk, splits) in [64usize, 200, 1024].map(|c| (c, longest.div_ceil(c))).into_iter().chain([(64, 4)]) {
            let out = put(vec![0u8; out_bytes]);
            let split = Split {
                chunk,
                splits,
                partial: put(vec![0u8; tokens * heads * splits * (d + 2) * 4]),
                counters: put(vec![0u8; tokens * heads * 4]),
            };
            let rows = HeadRows::heads_major(tokens, d);
            let c = caches[usize::from(fp8)];
            gpu.paged_decode_split(Dt::BF16, dq, c, (out, rows), &meta, heads, kv_heads, d, scale, split, mods)
                .unwrap();
            gpu.sync().unwrap();
            let mut raw = vec![0u8; out_bytes];
            gpu.download(out, &mut raw).unwrap();
            let got: Vec<f32> = raw.chunks_exact(2).map(|c| f32_of(u16::from_le_bytes([c[0], c[1]]))).collect();
            let build = match (fp8, alt) {
                (false, false) => "bf16 cache",
                (false, true) => "bf16 cache ldmatrix",
                (true, false) => "FP8 cache from codes",
                (true, true) => "FP8 cache bf16 tiles",
            };
            let what = format!("long decode {build} g{}d{d} /{chunk}x{splits}", heads / kv_heads);
            rep.check_scaled(&what, true, &got, if fp8 { &want8 } else { &want }, 1e-5);
        }
    }
    gpu.set_attn_group(saved.0);
    gpu.set_decode_tc(saved.1);
    gpu.set_decode_ldmatrix(saved.2);
    gpu.set_decode_fp8_codes(saved.3);
}
