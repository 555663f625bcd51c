#!/usr/bin/env python3
"""How far llama.cpp's logits are from transformers' on SmolLM2 (the same GGUF, the same prompt
as tests/fixtures/smollm2/reference.safetensors). llama.cpp quantizes activations to 8 bits, as
autodeploy's `activation_quant = "int8"` does; this is the yardstick for that mode's tolerance.

  python benches/smollm2_llama_cpp_error.py [--batch N]

--batch 1 feeds one token per eval (decode kernels); the default feeds the whole prompt at once.
Needs: pip install llama-cpp-python safetensors numpy; the GGUF from scripts/fetch-smollm2.sh.
"""

import argparse
import os

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
REF = os.path.join(ROOT, "tests/fixtures/smollm2/reference.safetensors")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ref = load_file(REF)
    prompt = [int(t) for t in ref["prompt_ids"]]
    llm = Llama(model_path=GGUF, n_ctx=512, n_batch=a.batch, n_threads=a.threads, logits_all=True, verbose=False)
    for i in range(0, len(prompt), a.batch):
        llm.eval(prompt[i : i + a.batch])
    scores = np.array(llm.scores[: len(prompt)], dtype=np.float32)
    want = ref["logits"]
    tail = scores[-want.shape[0] :]
    am = scores.argmax(-1)
    differ = [int(i) for i in np.nonzero(am != ref["argmax"])[0]]
    print(f"prompt {len(prompt)} tokens, batch {a.batch}: max |logit error| over the last {want.shape[0]} "
          f"positions {np.abs(tail - want).max():.3f}; argmax differs at positions {differ}")
    for i in differ:
        r = int(ref["argmax"][i])
        print(f"  position {i}: picks {int(am[i])} over the reference's {r} by {scores[i, am[i]] - scores[i, r]:.3f}")


if __name__ == "__main__":
    main()
