//! The mixture-of-experts launches (`moe.cu`'s `moe_route`, `moe_gate_up`, `moe_down`,
//! `moe_combine`, and for many tokens `moe_group` with the grouped gate/up and down):
//! `torch_moe` on the GPU, only the chosen experts' weights read, each once a layer when grouped.

use super::{grid, launched, Dt, GateAct, Gpu, Ptr};
use crate::cuda::Unavailable;

/// A `torch_moe` call's sizes and routing options.
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    pub tokens: usize,
    /// Experts the weights hold (this rank's, under expert parallelism).
    pub experts: usize,
    /// Experts the router scores (the router logits' last dim), of which the weights hold
    /// `offset .. offset + experts`.
    pub routed: usize,
    pub offset: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub inter: usize,
    pub norm: bool,
    pub weights_f32: bool,
    pub act: GateAct,
    /// Llama 4's routing (core's `ops::moe`, `router=sigmoid`): top-k logits, sigmoid weights
    /// scaling the experts' input.
    pub sigmoid: bool,
}

/// What a `torch_moe` call routes from.
#[derive(Clone, Copy, Debug)]
pub enum RouterIn {
    /// The router's logits `[tokens, routed]` (of that dtype), computed before the op.
    Logits(Ptr, Dt),
    /// The router's weight `[routed, hidden]` (the activations' dtype): the op computes the
    /// logits (rounded to that dtype, as the router's linear) into its sixth scratch region.
    Weight(Ptr),
}

/// The experts a token's logits may number for the router and routing in one launch
/// (moe.cu's `ROUTER_MAX_EXPERTS`), and the tokens a call may have for it (the GPU's
/// `counters`).
pub const ROUTER_FUSED_MAX_EXPERTS: usize = 512;

impl MoeShape {
    /// Scratch bytes, in [`Gpu::moe`]'s order: chosen experts (i32), their weights (f32), the
    /// activations (`dt`), the scaled outputs (f32), the grouping by expert (i32: offsets,
    /// cursors, the slots in expert order), and with `router_weight` the logits (`dt`), each
    /// rounded up to 256 bytes.
    pub fn scratch(&self, dt_bytes: usize, router_weight: bool) -> Vec<usize> {
        let slots = self.tokens * self.top_k;
        let up = |b: usize| b.div_ceil(256) * 256;
        let group = (2 * self.experts + 1 + slots) * 4;
        let mut r = vec![
            up(slots * 4),
            up(slots * 4),
            up(slots * self.inter * dt_bytes),
            up(slots * self.hidden * 4),
            up(group),
        ];
        if router_weight {
            r.push(up(self.tokens * self.routed * dt_bytes));
        }
        r
    }

    /// Whether the grouped kernels run: from `min_per_expert` token-expert slots an expert on
    /// average (`Gpu::moe_grouped_min`), where reading each chosen expert once beats reading it
    /// once a slot; decode batches below that keep one warp a slot's row and launch nothing for
    /// experts no token chose.
    pub fn grouped(&self, min_per_expert: usize) -> bool {
        self.tokens * self.top_k >= min_per_expert * self.experts
    }
}

impl Gpu {
    /// `y = torch_moe(x, router, w_gate_up, w_down)` (core's `ops::moe` states the math);
    /// `scratch` holds the regions of [`MoeShape::scratch`] (the sixth only for
    /// `RouterIn::Weight`).
    #[allow(clippy::too_many_arguments)]
    pub fn moe(
        &self,
        s: &MoeShape,
        dt: Dt,
        x: Ptr,
        router: RouterIn,
        w_gate_up: Ptr,
        w_down: Ptr,
        y: Ptr,
        scratch: &[Ptr],
    ) -> Result<(), Unavailable> {
        let too_big = |n: usize| i32::try_from(n).is_err();
        if too_big(s.routed) || too_big(s.top_k) || too_big(s.hidden) || too_big(s.inter) {
            return Err(Unavailable(format!("torch_moe: sizes {s:?} past the kernels' 32-bit counts")));
        }
        let Some(&[idx, wts, ..]) = scratch.get(..5) else {
            return Err(Unavailable(format!("torch_moe: {} scratch regions, want 5 or 6", scratch.len())));
        };
        let (d, t64) = (dt as i32, s.tokens as i64);
        let (e32, k32, h32) = (s.experts as i32, s.top_k as i32, s.hidden as i32);
        let (routed, offset) = (s.routed as i32, s.offset as i32);
        if s.offset + s.experts > s.routed {
            return Err(Unavailable(format!(
                "torch_moe: experts {}.. of {} past the router's {}",
                s.offset, s.experts, s.routed
            )));
        }
        let (norm, wf32, sig) = (s.norm as i32, s.weights_f32 as i32, s.sigmoid as i32);
        let (logits, logits_dt) = match router {
            RouterIn::Logits(p, ldt) => (p, ldt),
            RouterIn::Weight(w) => {
                let logits = *scratch.get(5).ok_or_else(|| Unavailable("torch_moe: no logits scratch".into()))?;
                let fused = dt == Dt::BF16
                    && s.hidden.is_multiple_of(8)
                    && (x | w).is_multiple_of(16)
                    && s.routed <= ROUTER_FUSED_MAX_EXPERTS
                    && s.tokens <= super::COUNTERS;
                if fused {
                    let counters = self.counters_ptr();
                    let mut l = self.launcher(self.f.moe_router_route);
                    l.arg(&x).arg(&w).arg(&logits).arg(&counters).arg(&t64).arg(&h32).arg(&routed);
                    l.arg(&k32).arg(&norm).arg(&wf32).arg(&sig).arg(&offset).arg(&e32).arg(&idx).arg(&wts);
                    let cfg = super::LaunchConfig {
                        grid_dim: (s.routed.div_ceil(8) as u32, s.tokens as u32, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: x [tokens, hidden] and w [routed, hidden] bf16 with 16-byte-aligned
                    // rows (hidden % 8 == 0, both pointers aligned), logits tokens × routed bf16
                    // (scratch sized so), counters ≥ tokens zeroed ints the kernel re-arms; a
                    // block of 8 warps an (8 experts, token); idx, wts as moe_route's.
                    return launched("moe_router_route", unsafe { l.launch(cfg) }.map(|_| ()))
                        .and_then(|_| self.moe_experts(s, dt, x, w_gate_up, w_down, y, scratch));
                }
                // The router's linear as the graph would run it, then the routing.
                self.gemm(dt, dt, s.tokens, s.routed, s.hidden, x, w, logits, false)?;
                (logits, dt)
            }
        };
        let ld = logits_dt as i32;
        let mut l = self.launcher(self.f.moe[0]);
        l.arg(&logits)
            .arg(&ld)
            .arg(&d)
            .arg(&t64)
            .arg(&routed)
            .arg(&k32)
            .arg(&norm)
            .arg(&wf32)
            .arg(&sig)
            .arg(&offset)
            .arg(&e32)
            .arg(&idx)
            .arg(&wts);
        // SAFETY: tokens × routed logits; tokens × top_k in idx and wts (scratch sized so); one
        // warp a token; idx then holds local expert ids < experts, or -1 (skipped below).
        launched("moe_route", unsafe { l.launch(grid(s.tokens * 32, 128)) }.map(|_| ()))?;
        self.moe_experts(s, dt, x, w_gate_up, w_down, y, scratch)
    }

    /// `torch_moe` after the routing: the chosen experts' gate/up and down, and the sum.
    #[allow(clippy::too_many_arguments)]
    fn moe_experts(
        &self,
        s: &MoeShape,
        dt: Dt,
        x: Ptr,
        w_gate_up: Ptr,
        w_down: Ptr,
        y: Ptr,
        scratch: &[Ptr],
    ) -> Result<(), Unavailable> {
        let Some(&[idx, wts, act, contrib, group]) = scratch.get(..5) else {
            return Err(Unavailable(format!("torch_moe: {} scratch regions, want 5 or 6", scratch.len())));
        };
        let d = dt as i32;
        let (t64, slots) = (s.tokens as i64, (s.tokens * s.top_k) as i64);
        let (e32, k32, h32, i32_) = (s.experts as i32, s.top_k as i32, s.hidden as i32, s.inter as i32);
        let a32 = s.act as i32;
        // The 16-byte-load kernels where bf16 rows split into whole chunks at aligned addresses
        // (the weights' rows are then aligned too: their strides are the checked sizes).
        let vector = dt == Dt::BF16
            && s.hidden.is_multiple_of(8)
            && s.inter.is_multiple_of(8)
            && (x | w_gate_up | w_down | act).is_multiple_of(16);
        // The input scaled by the routing weight (sigmoid routing) or not (a null pointer), and
        // the outputs scaled by it (softmax routing) or not.
        let scale_in: Ptr = if s.sigmoid { wts } else { 0 };
        let scale_out: Ptr = if s.sigmoid { 0 } else { wts };
        if vector && s.grouped(self.moe_grouped_min) {
            let mut l = self.launcher(self.f.moe[6]);
            l.arg(&idx).arg(&slots).arg(&e32).arg(&group);
            // SAFETY: idx holds `slots` expert ids < experts; group is sized (2·experts + 1 +
            // slots) i32 (`MoeShape::scratch`); one block.
            launched("moe_group", unsafe { l.launch(grid(1024, 1024)) }.map(|_| ()))?;
            let mut l = self.launcher(self.f.moe[7]);
            l.arg(&x).arg(&w_gate_up).arg(&group).arg(&e32).arg(&k32).arg(&h32).arg(&i32_).arg(&a32);
            l.arg(&scale_in).arg(&act);
            // SAFETY: a block of 8 warps an (expert, 8 rows); the slots it reads are group's,
            // each < slots.
            let blocks = |rows: usize| s.experts * rows.div_ceil(8) * 256;
            launched("moe_gate_up_grouped", unsafe { l.launch(grid(blocks(s.inter), 256)) }.map(|_| ()))?;
            let mut l = self.launcher(self.f.moe[8]);
            l.arg(&act).arg(&w_down).arg(&group).arg(&scale_out).arg(&e32).arg(&h32).arg(&i32_).arg(&contrib);
            // SAFETY: as above.
            launched("moe_down_grouped", unsafe { l.launch(grid(blocks(s.hidden), 256)) }.map(|_| ()))?;
        } else {
            let mut l = self.launcher(self.f.moe[if vector { 4 } else { 1 }]);
            if vector {
                l.arg(&x).arg(&w_gate_up).arg(&idx).arg(&slots).arg(&k32).arg(&h32).arg(&i32_).arg(&a32);
            } else {
                l.arg(&x).arg(&w_gate_up).arg(&idx).arg(&d).arg(&slots).arg(&k32).arg(&h32).arg(&i32_).arg(&a32);
            }
            l.arg(&scale_in).arg(&act);
            // SAFETY: expert ids < experts (routing picks among them); one warp a (slot, row).
            let cfg = grid(s.tokens * s.top_k * s.inter * 32, 256);
            launched("moe_gate_up", unsafe { l.launch(cfg) }.map(|_| ()))?;
            let mut l = self.launcher(self.f.moe[if vector { 5 } else { 2 }]);
            if vector {
                l.arg(&act).arg(&w_down).arg(&idx).arg(&scale_out).arg(&slots).arg(&h32).arg(&i32_).arg(&contrib);
            } else {
                l.arg(&act)
                    .arg(&w_down)
                    .arg(&idx)
                    .arg(&scale_out)
                    .arg(&d)
                    .arg(&slots)
                    .arg(&h32)
                    .arg(&i32_)
                    .arg(&contrib);
            }
            // SAFETY: as above.
            launched("moe_down", unsafe { l.launch(grid(s.tokens * s.top_k * s.hidden * 32, 256)) }.map(|_| ()))?;
        }
        let mut l = self.launcher(self.f.moe[3]);
        l.arg(&contrib).arg(&idx).arg(&d).arg(&t64).arg(&k32).arg(&h32).arg(&y);
        // SAFETY: tokens × hidden outputs.
        launched("moe_combine", unsafe { l.launch(grid(s.tokens * s.hidden, 256)) }.map(|_| ()))
    }
}
