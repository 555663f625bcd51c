//! Deliberate bugs for the mutation check of the test suite (tests/README.md, `scripts/mutations.sh`):
//! each one breaks the engine the way a real bug would, so the suite can show it notices. They
//! exist only in builds with the `mutations` feature (the test crate turns it on; the release
//! binary never has it) and only while `AUTODEPLOY_MUTATION` names one.

/// One deliberate bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// The last layer's cached attention does not write this step's keys and values.
    SkipKvWrite,
    /// Tokens after the first of a sequence get position + 1 (the cache slots stay right).
    ShiftRope,
    /// Attention ignores causality: every query sees its whole sequence.
    NoCausalMask,
    /// Query heads 0 and 1 swap their attention outputs.
    SwapHeads,
    /// Cached attention reads page 1 of a sequence from its page 0.
    WrongPage,
    /// FP8 linears skip their input's E4M3 quantization (weight-only, as if the scale were lost).
    Fp8RawInput,
    /// `all_reduce` keeps this rank's partial sums (the ranks never combine them).
    ReduceOneRank,
}

impl Mutation {
    pub const ALL: [(&'static str, Mutation); 7] = [
        ("skip_kv_write", Mutation::SkipKvWrite),
        ("shift_rope", Mutation::ShiftRope),
        ("no_causal_mask", Mutation::NoCausalMask),
        ("swap_heads", Mutation::SwapHeads),
        ("wrong_page", Mutation::WrongPage),
        ("fp8_raw_input", Mutation::Fp8RawInput),
        ("reduce_one_rank", Mutation::ReduceOneRank),
    ];
}

/// The mutation this process runs with, if any.
#[cfg(feature = "mutations")]
pub fn active() -> Option<Mutation> {
    static ACTIVE: std::sync::OnceLock<Option<Mutation>> = std::sync::OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let name = std::env::var("AUTODEPLOY_MUTATION").ok()?;
        let m = Mutation::ALL.iter().find(|(n, _)| *n == name).map(|&(_, m)| m);
        match m {
            Some(_) => eprintln!("AUTODEPLOY_MUTATION: running with the deliberate bug `{name}`"),
            None => panic!(
                "AUTODEPLOY_MUTATION={name} names no mutation (one of: {})",
                Mutation::ALL.map(|(n, _)| n).join(", ")
            ),
        }
        m
    })
}

#[cfg(not(feature = "mutations"))]
#[inline(always)]
pub fn active() -> Option<Mutation> {
    None
}

/// Whether the deliberate bug `m` is switched on.
#[inline(always)]
pub fn is(m: Mutation) -> bool {
    active() == Some(m)
}
