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
    /// AVX-VNNI (`vpdpbusd` on 256-bit registers) on top of AVX2, without AVX-512 (Intel since
    /// Alder Lake): the int8 decode linears read the row-interleaved weights 8 rows a register.
    AvxVnni,
    /// AVX-512 F/BW with VNNI (`vpdpbusd`), on top of AVX2: the int8 decode linears read
    /// row-interleaved weights, 16 output rows to a register.
    Avx512Vnni,
}

impl CpuKernels {
    pub const ALL: [CpuKernels; 4] =
        [CpuKernels::Portable, CpuKernels::Avx2, CpuKernels::AvxVnni, CpuKernels::Avx512Vnni];

    /// The best path this CPU runs (detected once).
    pub fn detected() -> CpuKernels {
        static BEST: OnceLock<CpuKernels> = OnceLock::new();
        *BEST.get_or_init(|| {
            CpuKernels::ALL.into_iter().rev().find(|k| k.has_features()).unwrap_or(CpuKernels::Portable)
        })
    }

    /// Whether the CPU has this path's features.
    fn has_features(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                CpuKernels::Portable => true,
                CpuKernels::Avx2 => avx2,
                CpuKernels::AvxVnni => avx2 && has!("avxvnni"),
                CpuKernels::Avx512Vnni => avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == CpuKernels::Portable
        }
    }

    /// Whether this CPU runs this path.
    pub fn supported(self) -> bool {
        self.has_features()
    }

    /// The name the log and the `cpu_kernels` setting use.
    pub fn name(self) -> &'static str {
        match self {
            CpuKernels::Portable => "portable",
            CpuKernels::Avx2 => "avx2",
            CpuKernels::AvxVnni => "avxvnni",
            CpuKernels::Avx512Vnni => "avx512vnni",
        }
    }

    pub fn parse(s: &str) -> Option<CpuKernels> {
        CpuKernels::ALL.into_iter().find(|k| k.name() == s)
    }

    /// `self` where the CPU runs it, else the best path below it that the CPU runs (an AVX-512
    /// CPU without AVX-VNNI asked for `avxvnni` gets `avx2`).
    pub fn at_most_detected(self) -> CpuKernels {
        CpuKernels::ALL
            .into_iter()
            .rev()
            .filter(|&k| k <= self)
            .find(|k| k.has_features())
            .unwrap_or(CpuKernels::Portable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_ordered_and_named() {
        assert!(CpuKernels::Portable < CpuKernels::Avx2 && CpuKernels::Avx2 < CpuKernels::AvxVnni);
        assert!(CpuKernels::AvxVnni < CpuKernels::Avx512Vnni);
        for k in CpuKernels::ALL {
            assert_eq!(CpuKernels::parse(k.name()), Some(k));
        }
        assert_eq!(CpuKernels::parse("avx9"), None);
        assert!(CpuKernels::Portable.supported());
        assert_eq!(CpuKernels::Avx512Vnni.at_most_detected(), CpuKernels::detected());
        for k in CpuKernels::ALL {
            let got = k.at_most_detected();
            assert!(got <= k && got.supported(), "{k:?} -> {got:?}");
        }
    }
}
