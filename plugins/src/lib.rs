//! Built-in plugins. Each registers itself with `inventory` under its kind and name; the host
//! finds them through `autodeploy_core::registry`, `transform`, `kvcache` and `runtime`.

pub mod attention {
    pub mod cuda;
    pub mod torch_cpu;
}
pub mod compile {
    pub mod cuda;
    pub mod simple;
}
pub mod importers {
    pub mod decoder;
    pub mod families;
    pub mod gguf;
    pub mod hf;
    mod hf_keys;
    mod hf_quant;
    mod layer_shapes;
    pub mod torch_export;
}
pub mod runtime {
    pub mod builtin;
}
pub mod transforms {
    pub mod compile_fusion;
    pub mod fusion;
    pub mod kvcache;
    pub mod matchers;
    pub mod quantize;
    pub mod rope_weights;
    pub mod sharding;
    pub mod simplify;
}

/// Referencing this from a binary keeps the crate (and so its registrations) linked in.
pub fn link() {}
