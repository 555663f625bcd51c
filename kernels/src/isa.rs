//! Which CPU kernels run: chosen once at run time from the CPU's features (one binary for
//! every x86-64), and lowered on request to compare paths.

use std::sync::OnceLock;

/// The CPU kernel paths, lowest first: a path runs only where the CPU has its features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuKernels {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2, FMA and F16C (x86-64 since 2013).
    Avx2,
    /// AVX-512 F/BW with VNNI (`vpdpbusd`), on top of AVX2: the int8 decode linears read
    /// row-interleaved weights, 16 output rows to a register.
    Avx512Vnni,
}

impl CpuKernels {
    pub const ALL: [CpuKernels; 3] = [CpuKernels::Portable, CpuKernels::Avx2, CpuKernels::Avx512Vnni];

    /// The best path this CPU runs (detected once).
    pub fn detected() -> CpuKernels {
        static BEST: OnceLock<CpuKernels> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                let avx2 = has!("avx2") && has!("fma") && has!("f16c");
                if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                    return CpuKernels::Avx512Vnni;
                }
                if avx2 {
                    return CpuKernels::Avx2;
                }
            }
            CpuKernels::Portable
        })
    }

    /// Whether this CPU runs this path.
    pub fn supported(self) -> bool {
        self <= CpuKernels::detected()
    }

    /// The name the log and the `cpu_kernels` setting use.
    pub fn name(self) -> &'static str {
        match self {
            CpuKernels::Portable => "portable",
            CpuKernels::Avx2 => "avx2",
            CpuKernels::Avx512Vnni => "avx512vnni",
        }
    }

    pub fn parse(s: &str) -> Option<CpuKernels> {
        CpuKernels::ALL.into_iter().find(|k| k.name() == s)
    }

    /// `self` where the CPU runs it, else the best path it does.
    pub fn at_most_detected(self) -> CpuKernels {
        self.min(CpuKernels::detected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_ordered_and_named() {
        assert!(CpuKernels::Portable < CpuKernels::Avx2 && CpuKernels::Avx2 < CpuKernels::Avx512Vnni);
        for k in CpuKernels::ALL {
            assert_eq!(CpuKernels::parse(k.name()), Some(k));
        }
        assert_eq!(CpuKernels::parse("avx9"), None);
        assert!(CpuKernels::Portable.supported());
        assert_eq!(CpuKernels::Avx512Vnni.at_most_detected(), CpuKernels::detected());
    }
}
