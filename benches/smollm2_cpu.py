#!/usr/bin/env python3
"""SmolLM2-135M-Instruct (Q4_1 GGUF) on the CPU: autodeploy against llama.cpp (llama-cpp-python)
on the same file, same prompt tokens, same thread count, in one run.

  python benches/smollm2_cpu.py [--threads 2] [--new-tokens 64] [--repeats 3] [--bf16 DIR]

With --bf16 DIR (the same model as a bf16 Hugging Face folder, `scripts/smollm2-bf16.py` makes
one from the GGUF), autodeploy also runs that folder with each CPU kernel path, against
transformers on torch's CPU kernels (if torch is importable) on the same tokens.

Needs: the release binary (cargo build --release), the GGUF (scripts/fetch-smollm2.sh) and
`pip install llama-cpp-python`. Prints the configuration, then prefill and decode tok/s for each
engine (best of --repeats runs, the engines taking turns).
"""

import argparse
import os
import platform
import re
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
BIN = os.path.join(ROOT, "target/release/autodeploy")
TEXT = (
    "The history of computing spans centuries, from the abacus and mechanical calculators to "
    "the electronic machines of the twentieth century. Charles Babbage designed the Analytical "
    "Engine, and Ada Lovelace wrote what many consider the first program. Alan Turing formalised "
    "computation, and the first stored-program computers followed after the war. Transistors "
    "replaced vacuum tubes, integrated circuits replaced transistors, and microprocessors put a "
    "whole computer on a chip. Summarise this history in two sentences and name one person."
)


def run_llama_cpp(tokens, threads, new_tokens):
    from llama_cpp import Llama

    llm = Llama(model_path=GGUF, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512, verbose=False)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    prefill = time.perf_counter() - t0
    out = []
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(tok)
        llm.eval([tok])
    decode = time.perf_counter() - t1
    return len(tokens) / prefill, new_tokens / decode, out


def run_torch(folder, tokens, threads, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = torch.tensor([tokens])
    out = []
    with torch.no_grad():
        t0 = time.perf_counter()
        res = model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            tok = res.logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(tok))
            res = model(tok, past_key_values=res.past_key_values, use_cache=True)
        decode = time.perf_counter() - t1
    return len(tokens) / prefill, new_tokens / decode, out


def run_autodeploy(tokens, threads, new_tokens, dtype, act="none", kernels="auto", model=GGUF):
    cfg = f"""model = {model!r}
dtype = "{dtype}"
device = "cpu"
activation_quant = "{act}"
cpu_kernels = "{kernels}"
max_batch_size = 1
max_seq_len = 1024
max_new_tokens = {new_tokens}
ignore_eos = true
[[prompts]]
token_ids = {tokens}
"""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(cfg)
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RUST_LOG="warn")
    out = subprocess.run([BIN, "--config", f.name], capture_output=True, text=True, env=env, check=True).stdout
    os.unlink(f.name)
    m = re.search(r"prefill (\d+) tokens in ([\d.]+) ms .*decode (\d+) tokens in ([\d.]+) ms", out)
    pt, pms, dt, dms = int(m[1]), float(m[2]), int(m[3]), float(m[4])
    return pt / (pms / 1e3), dt / (dms / 1e3), out


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", metavar="DIR", help="also run this bf16 Hugging Face folder of the model")
    a = ap.parse_args()
    from llama_cpp import Llama
    import llama_cpp

    tok = Llama(model_path=GGUF, vocab_only=True, verbose=False)
    tokens = tok.tokenize(TEXT.encode(), add_bos=False, special=True)
    print(f"model: {os.path.basename(GGUF)}  prompt: {len(tokens)} tokens  new tokens: {a.new_tokens}  "
          f"threads: {a.threads}  repeats: {a.repeats} (best)  cpu: {cpu_name()} x{os.cpu_count()}")
    print(f"llama.cpp system info: {llama_cpp.llama_print_system_info().decode().strip()}")
    print(f"llama-cpp-python {llama_cpp.__version__}; autodeploy {BIN}")
    best = {}
    engines = [
        ("llama.cpp", lambda: run_llama_cpp(tokens, a.threads, a.new_tokens)),
        ("autodeploy (auto, int8 act)", lambda: run_autodeploy(tokens, a.threads, a.new_tokens, "auto", "int8")),
        ("autodeploy (int8 act, avxvnni)", lambda: run_autodeploy(tokens, a.threads, a.new_tokens, "auto", "int8", "avxvnni")),
        ("autodeploy (int8 act, avx2)", lambda: run_autodeploy(tokens, a.threads, a.new_tokens, "auto", "int8", "avx2")),
        ("autodeploy (auto: Q4_1 kept)", lambda: run_autodeploy(tokens, a.threads, a.new_tokens, "auto")),
        ("autodeploy (float32)", lambda: run_autodeploy(tokens, a.threads, a.new_tokens, "float32")),
    ]
    if a.bf16:
        for k in ("auto", "avx2", "portable"):
            engines.append((f"autodeploy bf16 ({k})", lambda k=k: run_autodeploy(
                tokens, a.threads, a.new_tokens, "auto", kernels=k, model=a.bf16)))
        try:
            import torch  # noqa: F401
            engines.append(("transformers bf16 (torch)", lambda: run_torch(a.bf16, tokens, a.threads, a.new_tokens)))
            print(f"torch {torch.__version__} (transformers on torch's CPU kernels, same threads)")
        except ImportError:
            print("torch not importable: no transformers bf16 line")
    # Repeats interleave the engines, so a slow spell of the machine does not favour one.
    for _ in range(a.repeats):
        for name, fn in engines:
            p, d, _ = fn()
            bp, bd = best.get(name, (0.0, 0.0))
            best[name] = (max(bp, p), max(bd, d))
    print(f"{'engine':<30} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, (p, d) in best.items():
        print(f"{name:<30} {p:>14.1f} {d:>13.1f}")


if __name__ == "__main__":
    main()
