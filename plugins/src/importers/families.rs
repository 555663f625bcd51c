//! The model families the importers know, as data: how a family's `config.json` (HF folders) or
//! GGUF layout maps onto the options of the shared decoder blocks in `decoder.rs` (attention
//! biases, q/k norm, a sliding window, MLP biases, llama.cpp's Q/K row order). A family whose
//! blocks already exist is one entry here plus its fixture and parity test; the importers read
//! the entry, never a family's name, and the pattern matchers and transforms see only the graph.

/// Where a block option's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// Fixed for the family.
    Fixed(bool),
    /// A boolean `config.json` key, and its value when the key is absent.
    Key(&'static str, bool),
}

/// A family's attention window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// None: a config asking for sliding-window layers (`use_sliding_window: true`) is refused,
    /// naming the key.
    None,
    /// Every layer attends within the window this `config.json` key gives (absent or null: no
    /// window).
    Key(&'static str),
}

/// One family: the `model_type` of its HF configs (the `general.architecture` of its GGUF
/// files) and how its checkpoints set the decoder's options.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub name: &'static str,
    /// Biases of the q, k and v projections.
    pub qkv_bias: Flag,
    /// Bias of the output projection.
    pub o_bias: Flag,
    /// Biases of the MLP's gate, up and down projections.
    pub mlp_bias: Flag,
    /// RMSNorm of each q and k head before RoPE (`self_attn.q_norm` / `k_norm` weights).
    pub qk_norm: bool,
    pub window: Window,
    /// The MLP activations (`hidden_act`) the family's blocks build.
    pub activations: &'static [&'static str],
    /// llama.cpp's converter permutes the Q and K rows of this family's GGUF files (undone at
    /// load).
    pub gguf_qk_permuted: bool,
    /// Its configs scale the residual stream (`embedding_multiplier`, `attention_multiplier`,
    /// `residual_multiplier`, `logits_scaling`: Granite).
    pub multipliers: bool,
    /// Its checkpoints store q, k and v as one `self_attn.qkv_proj` and gate and up as one
    /// `mlp.gate_up_proj` (gate rows first), split into the decoder's weights at load (Phi-3).
    pub fused_projections: bool,
}

pub const FAMILIES: &[Family] = &[
    Family {
        name: "llama",
        qkv_bias: Flag::Key("attention_bias", false),
        o_bias: Flag::Key("attention_bias", false),
        mlp_bias: Flag::Key("mlp_bias", false),
        qk_norm: false,
        window: Window::None,
        activations: &["silu"],
        gguf_qk_permuted: true,
        multipliers: false,
        fused_projections: false,
    },
    Family {
        name: "mistral",
        qkv_bias: Flag::Fixed(false),
        o_bias: Flag::Fixed(false),
        mlp_bias: Flag::Fixed(false),
        qk_norm: false,
        window: Window::Key("sliding_window"),
        activations: &["silu"],
        gguf_qk_permuted: true,
        multipliers: false,
        fused_projections: false,
    },
    Family {
        name: "qwen2",
        qkv_bias: Flag::Fixed(true),
        o_bias: Flag::Fixed(false),
        mlp_bias: Flag::Fixed(false),
        qk_norm: false,
        window: Window::None,
        activations: &["silu"],
        gguf_qk_permuted: false,
        multipliers: false,
        fused_projections: false,
    },
    Family {
        name: "qwen3",
        qkv_bias: Flag::Key("attention_bias", false),
        o_bias: Flag::Key("attention_bias", false),
        mlp_bias: Flag::Fixed(false),
        qk_norm: true,
        window: Window::None,
        activations: &["silu"],
        gguf_qk_permuted: false,
        multipliers: false,
        fused_projections: false,
    },
    Family {
        name: "granite",
        qkv_bias: Flag::Key("attention_bias", false),
        o_bias: Flag::Key("attention_bias", false),
        mlp_bias: Flag::Key("mlp_bias", false),
        qk_norm: false,
        window: Window::None,
        activations: &["silu"],
        gguf_qk_permuted: true,
        multipliers: true,
        fused_projections: false,
    },
    Family {
        name: "phi3",
        qkv_bias: Flag::Fixed(false),
        o_bias: Flag::Fixed(false),
        mlp_bias: Flag::Fixed(false),
        qk_norm: false,
        window: Window::Key("sliding_window"),
        activations: &["silu"],
        gguf_qk_permuted: false,
        multipliers: false,
        fused_projections: true,
    },
];

/// The family named `name` (a `model_type` or GGUF architecture).
pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// Every family's name, for "not supported" errors.
pub fn names() -> String {
    FAMILIES.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_is_listed_once_and_found_by_name() {
        for f in FAMILIES {
            assert_eq!(FAMILIES.iter().filter(|g| g.name == f.name).count(), 1, "{} twice", f.name);
            assert_eq!(family(f.name).map(|g| g.name), Some(f.name));
        }
        assert!(family("gpt2").is_none());
        assert_eq!(names(), "llama, mistral, qwen2, qwen3, granite, phi3");
    }
}
