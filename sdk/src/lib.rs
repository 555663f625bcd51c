//! The surface a plugin may depend on: the vocabulary shared by the host and every plugin (the
//! SDK version, plugin kinds, pipeline stages) and, in [`ffi`], the stable ABI plugin libraries
//! are built against. A plugin crate depends on this crate alone; `abi_stable` is re-exported
//! for the types the interfaces use.

use std::fmt;

pub use abi_stable;

pub mod ffi;
pub mod pattern;

/// Version of the plugin interface: this crate's version. abi_stable refuses a library built
/// against an incompatible one (for 0.x, another minor).
pub const SDK_VERSION: (u32, u32, u32) = (0, 8, 0);
pub const SDK_VERSION_STR: &str = env!("CARGO_PKG_VERSION");

/// What a plugin does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PluginKind {
    ModelImporter,
    Transform,
    AttentionBackend,
    CompileBackend,
    Runtime,
    /// An op with its own kernels, which transforms can put in graphs.
    Op,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::ModelImporter => "model-importer",
            PluginKind::Transform => "transform",
            PluginKind::AttentionBackend => "attention-backend",
            PluginKind::CompileBackend => "compile-backend",
            PluginKind::Runtime => "runtime",
            PluginKind::Op => "op",
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pipeline stages, in the order they run (AutoDeploy's order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Import,
    PostImport,
    PatternMatcher,
    Quantize,
    Sharding,
    WeightLoad,
    PostLoadFusion,
    CacheInit,
    Compile,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Import,
        Stage::PostImport,
        Stage::PatternMatcher,
        Stage::Quantize,
        Stage::Sharding,
        Stage::WeightLoad,
        Stage::PostLoadFusion,
        Stage::CacheInit,
        Stage::Compile,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Import => "import",
            Stage::PostImport => "post_import",
            Stage::PatternMatcher => "pattern_matcher",
            Stage::Quantize => "quantize",
            Stage::Sharding => "sharding",
            Stage::WeightLoad => "weight_load",
            Stage::PostLoadFusion => "post_load_fusion",
            Stage::CacheInit => "cache_init",
            Stage::Compile => "compile",
        }
    }

    pub fn parse(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_names_match_abi_stable_and_the_crate() {
        assert_eq!(abi_stable::library::ROOT_MODULE_LOADER_NAME, ffi::ROOT_SYMBOL);
        let (a, b, c) = SDK_VERSION;
        assert_eq!(format!("{a}.{b}.{c}"), SDK_VERSION_STR);
    }

    #[test]
    fn stage_names_round_trip_in_order() {
        let mut prev = None;
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(s));
            if let Some(p) = prev {
                assert!(p < s, "{p} must run before {s}");
            }
            prev = Some(s);
        }
        assert_eq!(Stage::parse("nope"), None);
    }
}
