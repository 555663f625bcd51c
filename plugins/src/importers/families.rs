//! The model families the importers know, as data: how a family's `config.json` (HF folders) or
//! GGUF layout maps onto the options of the shared decoder blocks in `decoder.rs` (attention
//! biases, q/k norm, sliding windows, MLP biases and activation, Gemma's norms, soft-caps and
//! scales, llama.cpp's Q/K row order). A family whose
//! blocks already exist is one entry here plus its fixture and parity test; the importers read
//! the entry, never a family's name, and the pattern matchers and transforms see only the graph.

pub use super::decoder::{ExpertLayout, GateAct, MoeNames};
pub use autodeploy_core::ops::moe::Router;

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
    /// Some layers attend within the window `key` gives (`default` when the key is absent;
    /// null: none): those `layer_types` marks `sliding_attention`, or without it every layer but
    /// each `sliding_window_pattern`-th (`pattern` when that key is absent too).
    Layers { key: &'static str, default: Option<usize>, pattern: usize },
    /// Qwen's: no window unless `use_sliding_window` is true; then `sliding_window` (absent:
    /// 4096) on the layers `layer_types` marks, or without it on layers from
    /// `max_window_layers` (absent: 28) on.
    FromLayer,
}

/// Soft-capping of attention scores and logits (`attn_logit_softcapping`,
/// `final_logit_softcapping`), with the values transformers uses when a key is absent (a null
/// key: no cap).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Softcaps {
    pub attn: Option<f64>,
    pub final_logits: Option<f64>,
}

/// Where a family's layer shapes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layers {
    /// Every layer alike: `num_attention_heads`, `num_key_value_heads`, `intermediate_size`.
    Uniform,
    /// DeciLM's `block_configs` (Llama-Nemotron Super/Ultra): per layer, attention with its
    /// own KV heads or none, an MLP of its own width or none.
    BlockConfigs,
    /// OpenELM's per-layer lists: query heads, KV heads, and MLP widths as multipliers of the
    /// hidden size rounded to a multiple of the divisor (as its `make_divisible`).
    Lists { heads: &'static str, kv_heads: &'static str, ffn_multipliers: &'static str, ffn_divisor: &'static str },
}

/// How a family's configs describe its mixture-of-experts MLPs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeKeys {
    /// The expert count's keys, the first present read (transformers 5 writes Qwen3-MoE's
    /// `num_experts` as `num_local_experts`).
    pub experts: &'static [&'static str],
    /// Each expert's intermediate size (`None`: `intermediate_size`).
    pub intermediate: Option<&'static str>,
    /// Whether the chosen probabilities are renormalised.
    pub norm: Flag,
    /// The routing weights scale the experts' outputs in f32.
    pub weights_f32: bool,
    /// Which layers are sparse.
    pub sparse: SparseLayers,
    pub router: Router,
    pub layout: ExpertLayout,
    /// A shared expert beside the routed ones, `{block}.{shared}.{gate,up,down}_proj` of the
    /// experts' width, its output added to theirs (Llama 4).
    pub shared: Option<&'static str>,
    /// The dense layers' MLP width key where it is not `intermediate_size` (Llama 4's
    /// `intermediate_size_mlp`; `intermediate_size` is then the experts').
    pub dense_intermediate: Option<&'static str>,
    pub names: MoeNames,
}

/// Which layers of a mixture-of-experts family are sparse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparseLayers {
    All,
    /// Qwen's `decoder_sparse_step` (absent: 1) and `mlp_only_layers` (absent: none).
    QwenStep,
    /// Llama 4's `moe_layers` list, or without it every `interleave_moe_layer_step`-th layer
    /// (absent: 1, every layer) counting from the step's last.
    Interleave,
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
    /// The q/k norms come after the heads' transpose (Gemma 3's modeling order; the same
    /// values, a different graph).
    pub qk_norm_after_transpose: bool,
    pub window: Window,
    /// The `config.json` key of the MLP activation, and its value when absent.
    pub activation_key: (&'static str, &'static str),
    /// The activations (that key's values) the family's blocks build, and what each computes.
    pub activations: &'static [(&'static str, GateAct)],
    /// llama.cpp's converter permutes the Q and K rows of this family's GGUF files (undone at
    /// load).
    pub gguf_qk_permuted: bool,
    /// Its configs scale the residual stream (`embedding_multiplier`, `attention_multiplier`,
    /// `residual_multiplier`, `logits_scaling`: Granite).
    pub multipliers: bool,
    /// Its checkpoints store q, k and v as one `self_attn.qkv_proj` and gate and up as one
    /// `mlp.gate_up_proj` (gate rows first), split into the decoder's weights at load (Phi-3).
    pub fused_projections: bool,
    /// `tie_word_embeddings` when the config does not say (transformers' default for the family).
    pub tied_by_default: bool,
    /// Gemma's RMSNorm, `x̂ · (1 + w)`.
    pub norm_offset: bool,
    /// LayerNorm with bias instead of RMSNorm, its epsilon under `norm_epsilon` (StarCoder2).
    pub layer_norm: bool,
    /// The ungated `c_fc` / `c_proj` MLP (StarCoder2).
    pub plain_mlp: bool,
    /// The embedding times √hidden_size, rounded to the model's dtype (Gemma).
    pub embedding_scale: bool,
    /// Gemma 2/3's norms around the attention output and the MLP.
    pub sandwich_norms: bool,
    /// `None`: the family has no soft-capping.
    pub softcaps: Option<Softcaps>,
    /// Attention scaled by `query_pre_attn_scalar^-0.5` (this value when the key is absent)
    /// instead of `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// The sliding layers' own RoPE base: `rope_local_base_freq` (this value when absent), or
    /// transformers 5's `rope_parameters.sliding_attention` (Gemma 3).
    pub local_rope_theta: Option<f64>,
    /// Mixture-of-experts MLPs.
    pub moe: Option<MoeKeys>,
    /// How the layers' shapes are given.
    pub layers: Layers,
    /// `config.json` keys this family names its own way: (the importer's key, the family's).
    pub config_keys: &'static [(&'static str, &'static str)],
    /// Keys whose other values the blocks do not build: (key, the one JSON value accepted).
    pub fixed_keys: &'static [(&'static str, &'static str)],
    /// Checkpoint tensor names this family spells its own way: (the graph's fragment, the
    /// family's), each replaced wherever it occurs in a name (OpenELM's `transformer.` tree).
    pub weight_names: &'static [(&'static str, &'static str)],
    /// Its checkpoints' q/k projection rows are in Meta's interleaved RoPE order (each head's
    /// pairs `(2i, 2i + 1)` rotate together: Llama 4's complex RoPE); permuted at load into the
    /// rotate-half order the blocks use, as llama.cpp's GGUF files are.
    pub interleaved_rope: bool,
    /// Some layers have no RoPE (nor q/k norm): `no_rope_layers` (1 = RoPE), or without it
    /// each `no_rope_layer_interval`-th layer (absent: 4) (Llama 4).
    pub nope_layers: bool,
    /// A weightless RMSNorm (L2 norm) of each q and k head on the RoPE layers where this boolean
    /// key (absent: true) says so (Llama 4's `use_qk_norm`): the blocks' q/k norm with weights
    /// of ones the importer makes. transformers applies it after RoPE, the blocks before: RoPE
    /// rotates each pair, so the head's norm is the same.
    pub qk_l2_norm: Option<&'static str>,
    /// Chunked attention on the RoPE layers (`attention_chunk_size`: a query sees its own chunk
    /// of positions only) and the no-RoPE layers' query temperature (`attn_temperature_tuning`,
    /// `floor_scale`, `attn_scale`): `BlockOptions::attention_chunk` and `query_temperature`
    /// (Llama 4).
    pub chunked_attention: bool,
    /// The decoder's keys are under `text_config` (a multimodal checkpoint: its text model).
    pub text_config: bool,
    /// The `general.architecture` of this family's GGUF files where the GGUF importer maps them
    /// (llama.cpp's tensor names; its sandwich-norm names and its norms stored as `1 + w` for
    /// the Gemma families); other families' GGUF files are refused naming the architecture,
    /// never run as Llama.
    pub gguf: Option<&'static str>,
    /// The layer counts whose GGUF files llama.cpp scales queries by (hidden / heads)^-0.5
    /// instead of head_dim^-0.5 (Gemma 2/3 27B: their files do not store
    /// `query_pre_attn_scalar`; llama.cpp knows the 27B models by their depth).
    pub gguf_wide_query_layers: &'static [usize],
}

/// SiLU-gated MLPs, as Llama's.
const SILU: (&str, &str) = ("hidden_act", "silu");
const SILU_ONLY: &[(&str, GateAct)] = &[("silu", GateAct::Silu)];

/// Llama's blocks; each family below says how it differs.
const LLAMA: Family = Family {
    name: "llama",
    qkv_bias: Flag::Key("attention_bias", false),
    o_bias: Flag::Key("attention_bias", false),
    mlp_bias: Flag::Key("mlp_bias", false),
    qk_norm: false,
    qk_norm_after_transpose: false,
    window: Window::None,
    activation_key: SILU,
    activations: SILU_ONLY,
    gguf_qk_permuted: true,
    multipliers: false,
    fused_projections: false,
    tied_by_default: false,
    norm_offset: false,
    layer_norm: false,
    plain_mlp: false,
    embedding_scale: false,
    sandwich_norms: false,
    softcaps: None,
    query_pre_attn_scalar: None,
    local_rope_theta: None,
    moe: None,
    layers: Layers::Uniform,
    config_keys: &[],
    fixed_keys: &[],
    weight_names: &[],
    interleaved_rope: false,
    nope_layers: false,
    qk_l2_norm: None,
    chunked_attention: false,
    text_config: false,
    gguf: Some("llama"),
    gguf_wide_query_layers: &[],
};

const MISTRAL: Family = Family {
    name: "mistral",
    qkv_bias: Flag::Fixed(false),
    o_bias: Flag::Fixed(false),
    mlp_bias: Flag::Fixed(false),
    window: Window::Key("sliding_window"),
    gguf: Some("mistral"),
    ..LLAMA
};

const QWEN3: Family = Family {
    name: "qwen3",
    mlp_bias: Flag::Fixed(false),
    qk_norm: true,
    window: Window::FromLayer,
    gguf_qk_permuted: false,
    gguf: Some("qwen3"),
    ..LLAMA
};

/// Gemma's blocks: (1 + w) RMSNorm, the embedding scaled by √hidden, GeGLU.
const GEMMA: Family = Family {
    name: "gemma",
    qkv_bias: Flag::Key("attention_bias", false),
    o_bias: Flag::Key("attention_bias", false),
    mlp_bias: Flag::Fixed(false),
    qk_norm: false,
    qk_norm_after_transpose: false,
    window: Window::None,
    // transformers reads `hidden_act` for Gemma and maps the legacy `gelu` of the official
    // configs to the tanh approximation.
    activation_key: ("hidden_act", "gelu_pytorch_tanh"),
    activations: &[("gelu_pytorch_tanh", GateAct::GeluTanh), ("gelu", GateAct::GeluTanh)],
    gguf_qk_permuted: false,
    multipliers: false,
    fused_projections: false,
    tied_by_default: true,
    norm_offset: true,
    layer_norm: false,
    plain_mlp: false,
    embedding_scale: true,
    sandwich_norms: false,
    softcaps: None,
    query_pre_attn_scalar: None,
    local_rope_theta: None,
    moe: None,
    layers: Layers::Uniform,
    config_keys: &[],
    fixed_keys: &[],
    weight_names: &[],
    interleaved_rope: false,
    nope_layers: false,
    qk_l2_norm: None,
    chunked_attention: false,
    text_config: false,
    gguf: Some("gemma"),
    gguf_wide_query_layers: &[],
};

/// Llama 4's text model (`Llama4ForCausalLM`): MoE with sigmoid top-k routing and a shared
/// expert on `interleave_moe_layer_step`'s layers, no RoPE on every fourth layer, weightless
/// q/k norm, interleaved RoPE, chunked attention; its MLPs are `feed_forward`.
const LLAMA4_TEXT: Family = Family {
    name: "llama4_text",
    mlp_bias: Flag::Fixed(false),
    moe: Some(MoeKeys {
        experts: &["num_local_experts"],
        intermediate: None,
        norm: Flag::Fixed(false),
        weights_f32: false,
        sparse: SparseLayers::Interleave,
        router: Router::Sigmoid,
        layout: ExpertLayout::Fused,
        shared: Some("shared_expert"),
        dense_intermediate: Some("intermediate_size_mlp"),
        names: MoeNames { block: "mlp", router: "router", gate: "gate_proj", up: "up_proj", down: "down_proj" },
    }),
    weight_names: &[(".mlp.", ".feed_forward.")],
    interleaved_rope: true,
    nope_layers: true,
    qk_l2_norm: Some("use_qk_norm"),
    chunked_attention: true,
    // llama.cpp's `llama4` files (its converter keeps the checkpoint's interleaved Q/K rows,
    // which is the order its llama files are permuted into).
    gguf: Some("llama4"),
    ..LLAMA
};

/// Llama 4's released models' values where a config or file is silent: transformers'
/// defaults for `no_rope_layer_interval`, `floor_scale` and `attn_scale`, and the chunk size
/// llama.cpp runs its `llama4` files with (they store none of these).
pub const LLAMA4_NOPE_INTERVAL: usize = 4;
pub const LLAMA4_FLOOR_SCALE: usize = 8192;
pub const LLAMA4_ATTN_SCALE: f64 = 0.1;
pub const LLAMA4_CHUNK: usize = 8192;

/// Gemma 2/3's GeGLU activations (`hidden_activation`; `gelu` is the exact one there).
const GEMMA2_ACTS: &[(&str, GateAct)] =
    &[("gelu_pytorch_tanh", GateAct::GeluTanh), ("gelu_new", GateAct::GeluTanh), ("gelu", GateAct::Gelu)];

pub const FAMILIES: &[Family] = &[
    LLAMA,
    MISTRAL,
    Family {
        name: "qwen2",
        qkv_bias: Flag::Fixed(true),
        o_bias: Flag::Fixed(false),
        mlp_bias: Flag::Fixed(false),
        window: Window::FromLayer,
        gguf_qk_permuted: false,
        gguf: Some("qwen2"),
        ..LLAMA
    },
    QWEN3,
    Family {
        name: "qwen3_moe",
        moe: Some(MoeKeys {
            experts: &["num_experts", "num_local_experts"],
            intermediate: Some("moe_intermediate_size"),
            norm: Flag::Key("norm_topk_prob", false),
            weights_f32: false,
            sparse: SparseLayers::QwenStep,
            router: Router::Softmax,
            layout: ExpertLayout::PerExpert,
            shared: None,
            dense_intermediate: None,
            names: MoeNames { block: "mlp", router: "gate", gate: "gate_proj", up: "up_proj", down: "down_proj" },
        }),
        gguf: Some("qwen3moe"),
        ..QWEN3
    },
    Family {
        name: "mixtral",
        moe: Some(MoeKeys {
            experts: &["num_local_experts"],
            intermediate: None,
            norm: Flag::Fixed(true),
            weights_f32: true,
            sparse: SparseLayers::All,
            router: Router::Softmax,
            layout: ExpertLayout::PerExpert,
            shared: None,
            dense_intermediate: None,
            names: MoeNames { block: "block_sparse_moe", router: "gate", gate: "w1", up: "w3", down: "w2" },
        }),
        // llama.cpp writes Mixtral as `llama` with experts.
        gguf: Some("llama"),
        ..MISTRAL
    },
    LLAMA4_TEXT,
    // The multimodal checkpoint's text model (`Llama4ForConditionalGeneration`), under
    // `text_config` and `language_model.`; its vision tower is not read.
    Family {
        name: "llama4",
        weight_names: &[
            ("model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            (".mlp.", ".feed_forward."),
        ],
        text_config: true,
        // Its GGUF files are `llama4_text`'s.
        gguf: None,
        ..LLAMA4_TEXT
    },
    Family { name: "granite", multipliers: true, gguf: Some("granite"), ..LLAMA },
    Family { name: "nemotron-nas", layers: Layers::BlockConfigs, gguf: Some("deci"), ..LLAMA },
    Family {
        name: "openelm",
        qkv_bias: Flag::Fixed(false),
        o_bias: Flag::Fixed(false),
        mlp_bias: Flag::Fixed(false),
        qk_norm: true,
        activation_key: ("activation_fn_name", "swish"),
        activations: &[("swish", GateAct::Silu), ("silu", GateAct::Silu)],
        fused_projections: true,
        tied_by_default: true,
        layers: Layers::Lists {
            heads: "num_query_heads",
            kv_heads: "num_kv_heads",
            ffn_multipliers: "ffn_multipliers",
            ffn_divisor: "ffn_dim_divisor",
        },
        config_keys: &[
            ("hidden_size", "model_dim"),
            ("num_hidden_layers", "num_transformer_layers"),
            ("rope_theta", "rope_freq_constant"),
            ("tie_word_embeddings", "share_input_output_layers"),
            ("max_position_embeddings", "max_context_length"),
        ],
        fixed_keys: &[
            ("ffn_with_glu", "true"),
            ("normalize_qk_projections", "true"),
            ("normalization_layer_name", "\"rms_norm\""),
        ],
        weight_names: &[
            ("model.embed_tokens.", "transformer.token_embeddings."),
            ("model.norm.", "transformer.norm."),
            ("model.layers.", "transformer.layers."),
            (".input_layernorm.", ".attn_norm."),
            (".post_attention_layernorm.", ".ffn_norm."),
            (".self_attn.qkv_proj.", ".attn.qkv_proj."),
            (".self_attn.o_proj.", ".attn.out_proj."),
            (".self_attn.q_norm.", ".attn.q_norm."),
            (".self_attn.k_norm.", ".attn.k_norm."),
            (".mlp.gate_up_proj.", ".ffn.proj_1."),
            (".mlp.down_proj.", ".ffn.proj_2."),
        ],
        gguf: Some("openelm"),
        // llama.cpp runs OpenELM's rotate-half RoPE as such (NeoX order): rows as stored.
        gguf_qk_permuted: false,
        ..LLAMA
    },
    Family {
        name: "phi3",
        qkv_bias: Flag::Fixed(false),
        o_bias: Flag::Fixed(false),
        mlp_bias: Flag::Fixed(false),
        window: Window::Key("sliding_window"),
        gguf_qk_permuted: false,
        fused_projections: true,
        gguf: Some("phi3"),
        ..LLAMA
    },
    GEMMA,
    Family {
        name: "gemma2",
        window: Window::Layers { key: "sliding_window", default: Some(4096), pattern: 2 },
        activation_key: ("hidden_activation", "gelu_pytorch_tanh"),
        activations: GEMMA2_ACTS,
        sandwich_norms: true,
        softcaps: Some(Softcaps { attn: Some(50.0), final_logits: Some(30.0) }),
        query_pre_attn_scalar: Some(256.0),
        gguf: Some("gemma2"),
        gguf_wide_query_layers: &[46],
        ..GEMMA
    },
    Family {
        name: "gemma3_text",
        qk_norm: true,
        qk_norm_after_transpose: true,
        window: Window::Layers { key: "sliding_window", default: Some(4096), pattern: 6 },
        activation_key: ("hidden_activation", "gelu_pytorch_tanh"),
        activations: GEMMA2_ACTS,
        sandwich_norms: true,
        softcaps: Some(Softcaps { attn: None, final_logits: None }),
        query_pre_attn_scalar: Some(256.0),
        local_rope_theta: Some(10000.0),
        gguf: Some("gemma3"),
        gguf_wide_query_layers: &[62],
        ..GEMMA
    },
    Family {
        name: "starcoder2",
        qkv_bias: Flag::Key("use_bias", true),
        o_bias: Flag::Key("use_bias", true),
        mlp_bias: Flag::Key("use_bias", true),
        window: Window::Key("sliding_window"),
        activation_key: ("hidden_act", "gelu_pytorch_tanh"),
        activations: &[("gelu_pytorch_tanh", GateAct::GeluTanh), ("gelu", GateAct::Gelu)],
        gguf_qk_permuted: false,
        tied_by_default: true,
        layer_norm: true,
        plain_mlp: true,
        gguf: Some("starcoder2"),
        ..LLAMA
    },
];

/// The family named `name` (a `model_type` or GGUF architecture).
pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// The family whose GGUF files say `general.architecture = arch`, with experts (`moe`: an
/// `expert_count` above 0, as Mixtral's `llama` files) or without.
pub fn gguf_family(arch: &str, moe: bool) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.gguf == Some(arch) && f.moe.is_some() == moe)
}

/// The GGUF architectures the importer maps, for its "not supported" errors.
pub fn gguf_names() -> String {
    let mut names: Vec<&str> = Vec::new();
    for n in FAMILIES.iter().filter_map(|f| f.gguf) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names.join(", ")
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
        assert_eq!(
            names(),
            "llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, llama4_text, llama4, granite, nemotron-nas, openelm, phi3, gemma, gemma2, gemma3_text, starcoder2"
        );
    }
}
