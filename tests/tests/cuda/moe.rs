//! `torch_moe`'s two CUDA paths against each other: the grouped kernels (many tokens: each
//! chosen expert read once) give the bits the per-slot kernels (decode) give, token by token;
//! and under expert parallelism two halves of the experts add up to the whole; the fused router
//! and the fused down + combine give the plain path's bits.

use crate::common::gpu::{gpu, launches};
use autodeploy_kernels::cuda::exec::{Buffer, Dt, GateAct, Gpu, MoeShape, Ptr, RouterIn};

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| {
            let u = x.to_bits();
            (((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16).to_le_bytes()
        })
        .collect()
}

/// Values in [-0.5, 0.5) from a xorshift generator.
fn xorshift(mut seed: u64) -> impl FnMut() -> f32 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// A layer of every expert (no expert parallelism), SiLU, weights rounded to bf16.
fn layer(
    tokens: usize,
    (experts, hidden, inter): (usize, usize, usize),
    top_k: usize,
    sigmoid: bool,
    norm: bool,
) -> MoeShape {
    MoeShape {
        tokens,
        experts,
        routed: experts,
        offset: 0,
        top_k,
        hidden,
        inter,
        norm,
        weights_f32: false,
        act: GateAct::Silu,
        sigmoid,
    }
}

/// Random experts on the GPU (bf16: gate/up `next() * 0.5`, down `next() * down_scale`), then
/// `tokens` rows of x and router logits as bf16 bytes, drawn from `next` in that order.
fn random_layer(
    g: &Gpu,
    next: &mut impl FnMut() -> f32,
    (experts, hidden, inter): (usize, usize, usize),
    tokens: usize,
    down_scale: f32,
) -> ((Buffer, Buffer), Vec<u8>, Vec<u8>) {
    let w_gu: Vec<f32> = (0..experts * 2 * inter * hidden).map(|_| next() * 0.5).collect();
    let w_down: Vec<f32> = (0..experts * hidden * inter).map(|_| next() * down_scale).collect();
    let up = |v: &[f32], what: &str| {
        let b = g.alloc(v.len() * 2, what).unwrap();
        g.upload(b.ptr, &bf16_bytes(v)).unwrap();
        b
    };
    let weights = (up(&w_gu, "gate_up"), up(&w_down, "down"));
    let x: Vec<f32> = (0..tokens * hidden).map(|_| next() * 4.0).collect();
    let logits: Vec<f32> = (0..tokens * experts).map(|_| next() * 6.0).collect();
    (weights, bf16_bytes(&x), bf16_bytes(&logits))
}

/// Runs `torch_moe` on the GPU over `tokens` rows of `x`/`logits` (bf16 bytes); returns y.
fn run(g: &Gpu, s: &MoeShape, x: &[u8], logits: &[u8], w: (Ptr, Ptr)) -> Vec<u8> {
    let up = |bytes: &[u8], what: &str| {
        let b = g.alloc(bytes.len(), what).unwrap();
        g.upload(b.ptr, bytes).unwrap();
        b
    };
    let (dx, dl) = (up(x, "x"), up(logits, "logits"));
    let y = g.alloc(s.tokens * s.hidden * 2, "y").unwrap();
    let regions: Vec<_> = s.scratch(2, false).iter().map(|&n| g.alloc(n, "scratch").unwrap()).collect();
    let scratch: Vec<Ptr> = regions.iter().map(|r| r.ptr).collect();
    g.moe(s, Dt::BF16, dx.ptr, RouterIn::Logits(dl.ptr, Dt::BF16), w.0, w.1, y.ptr, &scratch).unwrap();
    g.sync().unwrap();
    let mut out = vec![0u8; s.tokens * s.hidden * 2];
    g.download(y.ptr, &mut out).unwrap();
    out
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn grouped_moe_kernels_give_the_per_slot_kernels_bits() {
    let _turn = gpu();
    let g = Gpu::open(0).unwrap();
    let mut next = xorshift(0x9e37_79b9);
    let (experts, hidden, tokens) = (16usize, 64usize, 40usize);
    // An expert's down row of 48 (every lane's chunks held before the kernel's wait) and of
    // 1,096 (137 chunks: past the held ones, not a whole number of warp passes). The grouped
    // kernels add each lane's chunks in the same order, so any chunk dropped or added twice
    // by either shows.
    for (inter, top_k, sigmoid, norm) in [(48usize, 4usize, false, true), (48, 2, true, false), (1096, 4, false, true)]
    {
        let ((gu, down), xb, lb) = random_layer(&g, &mut next, (experts, hidden, inter), tokens, 0.5);
        let shape = |tokens| layer(tokens, (experts, hidden, inter), top_k, sigmoid, norm);
        let all = shape(tokens);
        assert!(all.grouped(g.moe_grouped_min) && !shape(1).grouped(g.moe_grouped_min));
        let (grouped, ran) = launches(|| run(&g, &all, &xb, &lb, (gu.ptr, down.ptr)));
        assert!(ran.contains_key("moe_gate_up_grouped") && ran.contains_key("moe_down_grouped"), "{ran:?}");
        for t in 0..tokens {
            let (one, ran) = launches(|| {
                let (xs, ls) = (&xb[t * hidden * 2..(t + 1) * hidden * 2], &lb[t * experts * 2..(t + 1) * experts * 2]);
                run(&g, &shape(1), xs, ls, (gu.ptr, down.ptr))
            });
            assert!(ran.contains_key("moe_gate_up") && !ran.contains_key("moe_gate_up_grouped"), "{ran:?}");
            assert_eq!(
                &grouped[t * hidden * 2..(t + 1) * hidden * 2],
                &one[..],
                "inter {inter} top_k {top_k} sigmoid {sigmoid}: token {t}'s output, grouped against alone"
            );
        }
        let nonzero = grouped.chunks_exact(2).filter(|b| b != &[0, 0]).count();
        assert!(nonzero > tokens * hidden / 2, "outputs mostly zero: {nonzero} of {}", tokens * hidden);
        // Expert parallelism: two ranks' halves of the experts (routing over all of them, the
        // other half's choices skipped), grouped and per slot, add up to the whole layer's
        // output (each half rounded to bf16 on its own: within bf16 rounding of it).
        let half = experts / 2;
        let ep = |tokens, offset| MoeShape { experts: half, routed: experts, offset, ..shape(tokens) };
        let weights =
            |o: usize| (gu.ptr + (o * 2 * inter * hidden * 2) as u64, down.ptr + (o * hidden * inter * 2) as u64);
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
        };
        for n in [tokens, 1] {
            let (xs, ls) = (&xb[..n * hidden * 2], &lb[..n * experts * 2]);
            let whole = f32s(&run(&g, &shape(n), xs, ls, (gu.ptr, down.ptr)));
            let a = f32s(&run(&g, &ep(n, 0), xs, ls, weights(0)));
            let b = f32s(&run(&g, &ep(n, half), xs, ls, weights(half)));
            let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = whole.iter().zip(a.iter().zip(&b)).map(|(w, (a, b))| (w - (a + b)).abs()).fold(0f32, f32::max);
            assert!(
                worst <= 0.02 * scale,
                "{n} tokens, top_k {top_k}: halves differ from the whole by {worst} (max {scale})"
            );
            // (One token may route to one half only; 40 cannot, in practice.)
            assert!(n == 1 || (a != whole && b != whole), "{n} tokens, top_k {top_k}: a half computed every expert");
        }
    }
}

/// The router's linear and the routing in one kernel (`RouterIn::Weight`, bf16:
/// `moe_router_route`): its logits (the op's sixth scratch region) are each token's x · w_e
/// within a bf16 step of an f64 product, and the layer's output is bit for bit the one the
/// plain path (`moe_route` over logits) gives from those same logits, for 1 token and for 40,
/// softmax and sigmoid routing; run twice, so the counters it re-arms are found zero again.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn the_fused_router_routes_its_own_logits_as_moe_route_does() {
    let _turn = gpu();
    let g = Gpu::open(0).unwrap();
    let mut next = xorshift(0x2545_f491);
    let (experts, hidden, inter) = (24usize, 256usize, 48usize);
    let up = |bytes: &[u8], what: &str| {
        let b = g.alloc(bytes.len(), what).unwrap();
        g.upload(b.ptr, bytes).unwrap();
        b
    };
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
    };
    let w_gu: Vec<f32> = (0..experts * 2 * inter * hidden).map(|_| next() * 0.5).collect();
    let w_down: Vec<f32> = (0..experts * hidden * inter).map(|_| next() * 0.5).collect();
    let w_r: Vec<f32> = (0..experts * hidden).map(|_| next() * 0.4).collect();
    let (gu, down, wr) =
        (up(&bf16_bytes(&w_gu), "gate_up"), up(&bf16_bytes(&w_down), "down"), up(&bf16_bytes(&w_r), "router"));
    let wr_v = f32s(&bf16_bytes(&w_r));
    for (top_k, sigmoid, norm) in [(4usize, false, true), (1, true, false)] {
        for tokens in [1usize, 40] {
            let s = layer(tokens, (experts, hidden, inter), top_k, sigmoid, norm);
            let xb = bf16_bytes(&(0..tokens * hidden).map(|_| next() * 4.0).collect::<Vec<_>>());
            let dx = up(&xb, "x");
            let regions: Vec<_> = s.scratch(2, true).iter().map(|&n| g.alloc(n, "scratch").unwrap()).collect();
            let scratch: Vec<Ptr> = regions.iter().map(|r| r.ptr).collect();
            let y = g.alloc(tokens * hidden * 2, "y").unwrap();
            let read = |p: Ptr, n: usize| {
                g.sync().unwrap();
                let mut out = vec![0u8; n];
                g.download(p, &mut out).unwrap();
                out
            };
            for round in 0..2 {
                let ((), ran) = launches(|| {
                    g.moe(&s, Dt::BF16, dx.ptr, RouterIn::Weight(wr.ptr), gu.ptr, down.ptr, y.ptr, &scratch).unwrap()
                });
                assert!(ran.contains_key("moe_router_route") && !ran.contains_key("moe_route"), "{ran:?}");
                let (fused, logits) = (read(y.ptr, tokens * hidden * 2), read(scratch[5], tokens * experts * 2));
                let xv = f32s(&xb);
                for (i, &l) in f32s(&logits).iter().enumerate() {
                    let (t, e) = (i / experts, i % experts);
                    let want: f64 = (0..hidden).map(|k| xv[t * hidden + k] as f64 * wr_v[e * hidden + k] as f64).sum();
                    assert!(
                        (l as f64 - want).abs() <= want.abs() / 128.0 + 1e-3,
                        "round {round}, {tokens} tokens: logit ({t}, {e}) {l} against {want}"
                    );
                }
                let plain = run(&g, &s, &xb, &logits, (gu.ptr, down.ptr));
                assert_eq!(fused, plain, "round {round}: {tokens} tokens, top_k {top_k}, sigmoid {sigmoid}");
            }
        }
    }
}
