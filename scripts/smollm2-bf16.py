#!/usr/bin/env python3
"""Writes SmolLM2-135M-Instruct as a bf16 Hugging Face folder (config, tokenizer, one
safetensors file), dequantized from the quick start's Q4_1 GGUF by transformers, for the bf16 CPU
benchmark (`benches/smollm2_cpu.py --bf16 DIR`).

  python scripts/smollm2-bf16.py OUT_DIR      (needs torch, transformers, gguf)
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, ".cache/models")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, ".cache/models/smollm2-bf16")
    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=GGUF, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=GGUF)
    os.makedirs(out, exist_ok=True)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    # The weights are plain bf16 now: drop the GGUF quantization note transformers kept.
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "bfloat16"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"wrote {out} ({len(state)} tensors, bf16)")


if __name__ == "__main__":
    main()
