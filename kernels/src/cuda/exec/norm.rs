//! The norm kernels' launches (`graph.cu`'s `rmsnorm`, `rmsnorm_bf16x8` and `layer_norm`).

use cudarc::driver::LaunchConfig;

use super::{launched, Dt, Gpu, Ptr};
use crate::cuda::Unavailable;

impl Gpu {
    /// RMSNorm over `rows` of `n`; with `residual = Some((res, res_out))`, `x + res` is formed,
    /// stored to `res_out` and normalised. With `codes_scale = Some(s)` (one f32 on the device)
    /// `out.0` gets one E4M3 code a value, of the output (rounded to `out.1`) divided by `s`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(
        &self,
        x: (Ptr, Dt),
        residual: Option<(Ptr, Ptr)>,
        w: (Ptr, Dt),
        out: (Ptr, Dt),
        codes_scale: Option<Ptr>,
        norm_dt: Dt,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<(), Unavailable> {
        let (res, res_out) = residual.unwrap_or((0, 0));
        let qs = codes_scale.unwrap_or(0);
        let all_bf16 = [x.1, w.1, out.1, norm_dt].iter().all(|&d| d == Dt::BF16);
        if all_bf16
            && n.is_multiple_of(8)
            && n <= 8 * 1024
            && [x.0, w.0, out.0, res, res_out].iter().all(|p| p.is_multiple_of(16))
        {
            let n32 = n as i32;
            let mut l = self.launcher(self.f.rmsnorm_bf16x8);
            l.arg(&x.0).arg(&res).arg(&res_out).arg(&w.0).arg(&out.0).arg(&n32).arg(&eps).arg(&qs);
            let block = (n / 8).div_ceil(32) * 32;
            let cfg =
                LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block as u32, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: rows × n bf16 in x, res, res_out, out (bytes with qs); n in w; 16-byte
            // aligned (checked); qs one f32 or null.
            let name = if qs == 0 { "rmsnorm_bf16x8" } else { "rmsnorm_bf16x8_fp8" };
            return launched(name, unsafe { l.launch(cfg) }.map(|_| ()));
        }
        let (dx, dw, dout, dn, n32) = (x.1 as i32, w.1 as i32, out.1 as i32, norm_dt as i32, n as i32);
        let mut l = self.launcher(self.f.rmsnorm);
        l.arg(&x.0)
            .arg(&res)
            .arg(&res_out)
            .arg(&dx)
            .arg(&w.0)
            .arg(&dw)
            .arg(&out.0)
            .arg(&dout)
            .arg(&dn)
            .arg(&n32)
            .arg(&eps)
            .arg(&qs);
        let block = (n.div_ceil(32) * 32).clamp(32, 1024) as u32;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: rows × n elements in each of x, res, res_out, out (bytes with qs); n in w; qs
        // one f32 or null.
        launched(if qs == 0 { "rmsnorm" } else { "rmsnorm_fp8" }, unsafe { l.launch(cfg) }.map(|_| ()))
    }

    /// LayerNorm of `rows` rows of `n`: `out = (x - mean) · rsqrt(var + eps) · w + b`, in f32,
    /// rounded once to the output's dtype (`b` None: no bias).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        x: (Ptr, Dt),
        w: (Ptr, Dt),
        b: Option<(Ptr, Dt)>,
        out: (Ptr, Dt),
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<(), Unavailable> {
        let (bp, bd) = b.unwrap_or((0, Dt::F32));
        let (dx, dw, db, dout, n32) = (x.1 as i32, w.1 as i32, bd as i32, out.1 as i32, n as i32);
        let mut l = self.launcher(self.f.layer_norm);
        l.arg(&x.0).arg(&dx).arg(&w.0).arg(&dw).arg(&bp).arg(&db).arg(&out.0).arg(&dout).arg(&n32).arg(&eps);
        let block = (n.div_ceil(32) * 32).clamp(32, 1024) as u32;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: rows × n elements in x and out; n in w and b.
        launched("layer_norm", unsafe { l.launch(cfg) }.map(|_| ()))
    }
}
