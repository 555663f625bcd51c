#!/usr/bin/env python3
"""A serving load: N streamed completion requests of random token-id prompts (ISL tokens, OSL
generated with ignore_eos) at a fixed concurrency against an OpenAI-compatible server, measured
the way `vllm bench serve` reports: output tok/s, requests/s, and TTFT / TPOT / ITL / E2E
percentiles. Standard library only, for machines that cannot install a load generator (the GPU
machine has no network); where one can be installed, BENCHMARKS.md also uses NVIDIA's aiperf.

  python benches/serve_bench.py --url http://127.0.0.1:8000 --concurrency 16 --num-requests 64 --isl 128 --osl 128

Prints one JSON object with its configuration and the numbers. TTFT is measured to the first
chunk carrying a token; TPOT is (E2E - TTFT) / (tokens - 1) per request; ITL is the gap between
consecutive chunks (one per token when the server sends one per token)."""

import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse


def one_request(url, model, prompt, osl, timeout, temperature=0.0):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": osl,
            "temperature": temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:300]!r}")
    times, tokens = [], None
    buf = b""
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is None:
            times.append(time.perf_counter())
        elif chunk.get("choices"):
            times.append(time.perf_counter())
    conn.close()
    end = time.perf_counter()
    return {"start": t0, "chunks": times, "end": end, "tokens": tokens}


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs, scale=1e3):
    return {
        "mean": statistics.fmean(xs) * scale if xs else None,
        "p50": pct(xs, 50) * scale if xs else None,
        "p90": pct(xs, 90) * scale if xs else None,
        "p99": pct(xs, 99) * scale if xs else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="default: the server's first /v1/models entry")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy; OpenAI's default, 1, samples on the device"
    )
    a = ap.parse_args()
    model = a.model
    if model is None:
        u = urllib.parse.urlparse(a.url)
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        c.request("GET", "/v1/models")
        model = json.loads(c.getresponse().read())["data"][0]["id"]
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(1, a.vocab) for _ in range(a.isl)] for _ in range(a.num_requests + a.warmup)]
    for p in prompts[: a.warmup]:
        one_request(a.url, model, p, min(a.osl, 4), a.timeout, a.temperature)
    todo = list(enumerate(prompts[a.warmup :]))
    results = [None] * len(todo)
    lock = threading.Lock()
    errors = []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, p = todo.pop(0)
            try:
                results[i] = one_request(a.url, model, p, a.osl, a.timeout, a.temperature)
            except Exception as e:  # noqa: BLE001 (counted and reported)
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r]
    ttft = [r["chunks"][0] - r["start"] for r in done if r["chunks"]]
    tpot = [
        (r["end"] - r["chunks"][0]) / (r["tokens"] - 1) for r in done if r["chunks"] and r["tokens"] and r["tokens"] > 1
    ]
    itl = [b - a_ for r in done for a_, b in zip(r["chunks"], r["chunks"][1:])]
    e2e = [r["end"] - r["start"] for r in done]
    out_tokens = sum(r["tokens"] or 0 for r in done)
    print(
        json.dumps(
            {
                "config": {
                    "url": a.url, "model": model, "concurrency": a.concurrency, "num_requests": a.num_requests,
                    "isl": a.isl, "osl": a.osl, "warmup": a.warmup, "temperature": a.temperature, "client": "benches/serve_bench.py (stdlib)",
                },
                "completed": len(done),
                "errors": len(errors),
                "first_error": errors[0] if errors else None,
                "wall_s": wall,
                "output_tok_per_s": out_tokens / wall,
                "requests_per_s": len(done) / wall,
                "ttft_ms": summary(ttft),
                "tpot_ms": summary(tpot),
                "itl_ms": summary(itl),
                "e2e_ms": summary(e2e),
            }
        )
    )


if __name__ == "__main__":
    main()
