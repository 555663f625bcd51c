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
"""

import argparse
import os

import torch
from torch.export import Dim


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
    max_seq = min(a.max_seq_len, getattr(model.config, "max_position_embeddings", a.max_seq_len))
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
