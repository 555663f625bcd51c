#!/usr/bin/env python3
"""Export a model with torch.export into a .pt2 archive that `autodeploy` can import.

For a Hugging Face causal LM (a folder or hub id):

  python scripts/export.py MODEL out.pt2 [--dtype float32|bfloat16] [--max-seq-len 2048]

For your own nn.Module, do what `export_module` does: torch.export.export(module, example_args,
dynamic_shapes=...) with the batch and sequence dims dynamic, then torch.export.save(ep, path).

The exported graph takes `input_ids` and `position_ids` (int64 [batch, seq]) and returns the
logits [batch, seq, vocab]; no KV cache, no attention mask (causal attention): autodeploy's
pipeline inserts its own cache. The model's tokenizer, when it has one, is saved beside the
archive in `out.tokenizer/` (where the torch-export importer looks for it), so text prompts
and chat work on the archive as on the Hugging Face folder. Needs: pip install torch transformers.

Mixture-of-experts blocks (Qwen3-MoE, Mixtral) do not export as plain ATen ops: their routing
is `aten.topk` and transformers loops over the experts a step chooses. As AutoDeploy's export
patches do, `patch_moe` replaces each sparse block's forward for the export with the router
linear and one custom op, `autodeploy::torch_moe(x, router_logits, w_gate_up, w_down, top_k,
norm, weights_f32)` (registered below with a reference implementation), which the importer
reads as its canonical `torch_moe`. Llama 4's text layers are patched too (`patch_llama4`:
its complex-number RoPE as real cos/sin arithmetic, its MoE block as `torch_moe` with sigmoid
routing, its query temperature from `position_ids`). Each patch is checked: the patched model's
logits must equal the unpatched ones before it exports. LongRoPE models (Phi-4-mini) export with their short
factors up to `original_max_position_embeddings` (`patch_longrope`).
"""

import argparse
import os

import torch
from torch.export import Dim


@torch.library.custom_op("autodeploy::torch_moe", mutates_args=())
def torch_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    norm: bool,
    weights_f32: bool,
    router: str = "softmax",
) -> torch.Tensor:
    """Routing over `router_logits` [.., experts], then each chosen expert's SwiGLU MLP
    (`w_gate_up` [experts, 2·inter, hidden], gate rows first; `w_down` [experts, hidden, inter]),
    summed, as transformers' sparse blocks compute it. `router = "softmax"` (Qwen3-MoE,
    Mixtral): the `top_k` best softmax probabilities (renormalised with `norm`; kept in f32 with
    `weights_f32`, else rounded to x's dtype) scale the experts' outputs. `router = "sigmoid"`
    (Llama 4): the `top_k` largest logits, each weight `sigmoid(logit)` in f32 rounded to x's
    dtype, scale the experts' input."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    logits = router_logits.reshape(-1, router_logits.shape[-1])
    if router == "sigmoid":
        top, chosen = torch.topk(logits, top_k, dim=-1)
        weights = torch.sigmoid(top.float()).to(x.dtype)
    elif router == "softmax":
        weights, chosen = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
        if norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not weights_f32:
            weights = weights.to(x.dtype)
    else:
        raise ValueError(f"router {router!r}: softmax or sigmoid")
    out = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.where(chosen == e)
        if tok.numel() == 0:
            continue
        w = weights[tok, slot, None]
        xin = x[tok] * w if router == "sigmoid" else x[tok]
        gate, up = torch.nn.functional.linear(xin, w_gate_up[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w_down[e])
        out.index_add_(0, tok, (y if router == "sigmoid" else y * w).to(out.dtype))
    return out.reshape(shape)


@torch_moe.register_fake
def _(x, router_logits, w_gate_up, w_down, top_k, norm, weights_f32, router="softmax"):
    return torch.empty_like(x)


def patch_moe(model):
    """Each Qwen3-MoE / Mixtral sparse block's forward as the router linear and one
    `autodeploy::torch_moe` (their weights as the block holds them: experts.gate_up_proj,
    experts.down_proj, gate.weight). Returns how many blocks were patched."""
    import types

    def forward(self, hidden_states):
        logits = torch.nn.functional.linear(hidden_states, self.gate.weight)
        return torch.ops.autodeploy.torch_moe(
            hidden_states, logits, self.experts.gate_up_proj, self.experts.down_proj, self.ad_top_k,
            self.ad_norm, self.ad_weights_f32,
        )

    n = 0
    for m in model.modules():
        kind = type(m).__name__
        if kind not in ("Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock"):
            continue
        cfg = model.config
        m.ad_top_k = cfg.num_experts_per_tok
        # Mixtral always renormalises and scales in f32; Qwen3-MoE as its config says.
        m.ad_norm = True if kind.startswith("Mixtral") else bool(cfg.norm_topk_prob)
        m.ad_weights_f32 = kind.startswith("Mixtral")
        m.forward = types.MethodType(forward, m)
        n += 1
    return n


def patch_llama4(model):
    """Llama 4's text layers, as ops the importer reads (AutoDeploy patches the same places):

    - RoPE: transformers multiplies complex numbers (`polar`, `view_as_complex`), which ATen
      graphs carry but the importer does not. The rotary embedding returns cos/sin tables
      (`cat(freqs, freqs)`, as Llama's), and each RoPE layer's q/k are de-interleaved (pairs
      (2i, 2i+1) moved to (i, i + d/2)) and rotated by halves: the same rotation, with q and k
      in the same new channel order, so the scores do not change (the L2 q/k norm after it
      is order-blind).
    - The weightless L2 q/k norm as an RMSNorm with a unit weight (a buffer): the same values.
    - The query temperature of the no-RoPE layers from `position_ids` (transformers uses
      `arange(seq)` plus the cache length: the same positions for a fresh sequence).
    - The MoE block as its router linear, `autodeploy::torch_moe` with `router = "sigmoid"`
      (experts' weights transposed to [experts, out, in]) and the shared expert's MLP.

    Returns how many decoder layers were patched."""
    import types

    def rotary_forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def rope(x, cos, sin):
        # x [batch, heads, seq, d] with interleaved pairs; cos/sin [batch, seq, d].
        *lead, d = x.shape
        x = x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        rot = torch.cat((-x2, x1), dim=-1)
        return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)

    def l2_forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.ad_weight

    def attention_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.use_rope:
            cos, sin = position_embeddings
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        if hasattr(self, "qk_norm"):
            q, k = self.qk_norm(q), self.qk_norm(k)
        if self.attn_temperature_tuning and not self.use_rope:
            pos = kwargs["position_ids"].float()
            scales = torch.log1p(torch.floor((pos + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scales[:, None, :, None]).to(q.dtype)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    def layer_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                      position_embeddings=None, **kwargs):
        h = self.input_layernorm(hidden_states)
        a, _ = self.self_attn(hidden_states=h, position_embeddings=position_embeddings,
                              attention_mask=attention_mask, position_ids=position_ids)
        hidden_states = hidden_states + a
        out = self.feed_forward(self.post_attention_layernorm(hidden_states))
        if self.is_moe_layer:
            out = out[0]
        return hidden_states + out.view(hidden_states.shape)

    def moe_forward(self, hidden_states):
        logits = torch.nn.functional.linear(hidden_states, self.router.weight)
        routed = torch.ops.autodeploy.torch_moe(
            hidden_states, logits, self.experts.gate_up_proj.transpose(1, 2),
            self.experts.down_proj.transpose(1, 2), self.top_k, False, False, "sigmoid",
        )
        return self.shared_expert(hidden_states) + routed, logits

    n = 0
    for m in model.modules():
        kind = type(m).__name__
        if kind == "Llama4TextRotaryEmbedding":
            m.forward = types.MethodType(rotary_forward, m)
        elif kind == "Llama4TextL2Norm":
            m.register_buffer("ad_weight", torch.ones(model.config.head_dim), persistent=False)
            m.forward = types.MethodType(l2_forward, m)
        elif kind == "Llama4TextAttention":
            m.forward = types.MethodType(attention_forward, m)
        elif kind == "Llama4TextMoe":
            m.forward = types.MethodType(moe_forward, m)
        elif kind == "Llama4TextDecoderLayer":
            m.forward = types.MethodType(layer_forward, m)
            n += 1
    return n


def patch_longrope(model):
    """LongRoPE (Phi-3/4): transformers picks the short or long factors from
    `max(position_ids)` at run time, which torch.export cannot trace. Below
    `original_max_position_embeddings` the short ones apply (the module's buffer from its
    init), so each such rotary embedding runs its undecorated forward and the export stops at
    that length, as the importer's own LongRoPE graphs do. Returns that length, or None."""
    import types

    limit = None
    for m in model.modules():
        if getattr(m, "rope_type", None) != "longrope":
            continue
        inner = getattr(type(m).forward, "__wrapped__", None)
        if inner is None:
            raise SystemExit(f"{type(m).__name__}: no undecorated forward to export LongRoPE with")
        m.forward = types.MethodType(inner, m)
        params = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
        orig = params.get("original_max_position_embeddings") or model.config.original_max_position_embeddings
        limit = orig if limit is None else min(limit, orig)
    return limit


class CausalLM(torch.nn.Module):
    """input_ids, position_ids -> logits, with the HF model's cache and mask handling off."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids):
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def export_module(module, max_seq_len, max_batch=64):
    """torch.export with dynamic batch and sequence dims over (input_ids, position_ids)."""
    batch = Dim("batch", min=1, max=max_batch)
    seq = Dim("seq", min=1, max=max_seq_len)
    ids = torch.zeros(2, 8, dtype=torch.long)
    pos = torch.arange(8).unsqueeze(0).expand(2, 8).contiguous()
    shapes = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
    return torch.export.export(module, (ids, pos), dynamic_shapes=shapes, strict=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-seq-len", type=int, default=2048)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, a.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa")
    except ValueError as e:
        # Models whose attention has no SDPA form (Gemma 2's soft-capped scores): the eager
        # attention, matmul -> scale -> soft-cap -> mask -> softmax -> matmul, which the
        # importer's eager-attention matcher recognises.
        print(f"no SDPA attention for this model ({str(e).splitlines()[0][:80]}...): exporting the eager one")
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="eager")
    model.eval()
    # Long enough to cross the window/chunk/temperature steps of the tiny test models.
    vocab = model.config.get_text_config().vocab_size
    ids = torch.tensor([[(i * 37 + 11) % vocab for i in range(24)]])
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    for what, patch in [("mixture-of-experts blocks into autodeploy::torch_moe", patch_moe),
                        ("Llama 4 decoder layers (real RoPE, torch_moe, temperature from position_ids)", patch_llama4)]:
        n = patch(model)
        if not n:
            continue
        with torch.no_grad():
            err = (model(input_ids=ids, use_cache=False).logits - before).abs().max().item()
        print(f"patched {n} {what} (logits moved by {err:.2e})")
        if err > 1e-3 * max(1.0, before.abs().max().item()):
            raise SystemExit(f"the patch of {what} changed the logits by {err}: not exporting")
    max_seq = min(a.max_seq_len, getattr(model.config, "max_position_embeddings", a.max_seq_len))
    longrope = patch_longrope(model)
    if longrope is not None and longrope < max_seq:
        print(f"LongRoPE: exporting sequences up to original_max_position_embeddings = {longrope} (short factors)")
        max_seq = longrope
    with torch.no_grad():
        ep = export_module(CausalLM(model), max_seq)
    torch.export.save(ep, a.out)
    print(f"saved {a.out} (torch {torch.__version__}); graph: {len(ep.graph.nodes)} nodes")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model)
    except (OSError, ValueError):
        tok = None
    # A folder without tokenizer files can still yield an empty stand-in: not a tokenizer.
    if tok is None or len(tok) < 2:
        print("no tokenizer found for the model: prompts to the archive must be token ids")
    else:
        tok_dir = os.path.splitext(a.out)[0] + ".tokenizer"
        tok.save_pretrained(tok_dir)
        print(f"saved its tokenizer in {tok_dir}")


if __name__ == "__main__":
    main()
