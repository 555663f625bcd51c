"""`autodeploy serve` driven with the official `openai` client (and raw HTTP where the client
would refuse to send a body): outputs against transformers' (the serve fixture's reference),
streaming against non-streaming, sampling parameters, bad requests, load, prefix sharing,
cancellation, overflow and shutdown. Run by scripts/serve-tests.sh (from .ci/run)."""

import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from tokenizers import Tokenizer

from conftest import FIXTURE, Server, smollm2_config

REF = json.loads((FIXTURE / "reference.json").read_text())
TOK = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
TEXT_CASES = [c for c in REF["cases"] if "text" in c]
CHAT_CASES = [c for c in REF["cases"] if "messages" in c]
N = REF["new_tokens"]


def decode(ids):
    return TOK.decode(ids, skip_special_tokens=False)


def greedy(**kw):
    return dict(temperature=0, extra_body=dict(ignore_eos=True, **kw.pop("extra_body", {})), **kw)


# --- outputs ---------------------------------------------------------------------------------


def test_models_health_and_metrics(fx):
    status, body = fx.get("/v1/models")
    assert status == 200
    data = json.loads(body)["data"]
    assert [d["id"] for d in data] == [str(FIXTURE)] and data[0]["max_model_len"] == 256
    assert fx.get("/health")[0] == 200
    m = fx.metrics()
    for name in [
        "autodeploy:num_requests_running",
        "autodeploy:num_requests_waiting",
        "autodeploy:kv_cache_usage_perc",
        "autodeploy:prefix_cache_queries_total",
        "autodeploy:prefix_cache_hits_total",
        "autodeploy:num_preemptions_total",
        "autodeploy:prompt_tokens_total",
        "autodeploy:generation_tokens_total",
        "autodeploy:time_to_first_token_seconds_count",
        "autodeploy:inter_token_latency_seconds_count",
        "autodeploy:e2e_request_latency_seconds_count",
        "autodeploy:request_queue_time_seconds_count",
    ]:
        assert name in m, name


@pytest.mark.parametrize("case", TEXT_CASES, ids=lambda c: c["text"][:20])
def test_completion_matches_transformers(fx, case):
    r = fx.client.completions.create(model=fx.model, prompt=case["text"], max_tokens=N, **greedy())
    assert r.choices[0].text == decode(case["greedy"])
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(case["prompt_ids"]), N)
    assert r.usage.total_tokens == len(case["prompt_ids"]) + N
    # The same prompt as token ids.
    r2 = fx.client.completions.create(model=fx.model, prompt=case["prompt_ids"], max_tokens=N, **greedy())
    assert r2.choices[0].text == r.choices[0].text


@pytest.mark.parametrize("case", CHAT_CASES, ids=lambda c: c["messages"][-1]["content"][:20])
def test_chat_matches_transformers(fx, case):
    r = fx.client.chat.completions.create(model=fx.model, messages=case["messages"], max_tokens=N, **greedy())
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == decode(case["greedy"])
    assert r.usage.prompt_tokens == len(case["prompt_ids"]), "the chat template renders as transformers'"
    assert r.usage.completion_tokens == N and r.object == "chat.completion"


def test_streaming_equals_whole(fx):
    case, chat = TEXT_CASES[1], CHAT_CASES[0]
    chunks = list(
        fx.client.completions.create(
            model=fx.model, prompt=case["text"], max_tokens=N, stream=True,
            stream_options={"include_usage": True}, **greedy(),
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == decode(case["greedy"])
    assert len([c for c in chunks if c.choices]) >= 2, "streamed in pieces, not at the end"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N
    assert chunks[-1].usage.prompt_tokens == len(case["prompt_ids"])
    chunks = list(
        fx.client.chat.completions.create(
            model=fx.model, messages=chat["messages"], max_tokens=N, stream=True, **greedy()
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == decode(chat["greedy"])
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks), "usage only when stream_options asks"


def test_stop_strings_cut_the_text_streamed_or_not(fx):
    case = TEXT_CASES[3]
    full = decode(case["greedy"])
    # A stop string that starts inside the completion, spans token boundaries, and first
    # occurs at its own position.
    stop = next(full[i : i + 3] for i in range(2, len(full) - 3) if full.find(full[i : i + 3]) == i)
    want = full[: full.index(stop)]
    r = fx.client.completions.create(model=fx.model, prompt=case["text"], max_tokens=N, stop=[stop, "zzz-never"], **greedy())
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    streamed = fx.client.completions.create(model=fx.model, prompt=case["text"], max_tokens=N, stop=stop, stream=True, **greedy())
    parts = [c.choices[0].text for c in streamed if c.choices]
    assert "".join(parts) == want, "no piece of the stop string is streamed"


def test_stop_token_ids_and_max_tokens(fx):
    case = TEXT_CASES[0]
    g = case["greedy"]
    k = next(i for i in range(2, N) if g[i] not in g[:i])
    r = fx.client.completions.create(
        model=fx.model, prompt=case["text"], max_tokens=N, **greedy(extra_body=dict(stop_token_ids=[g[k]]))
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (decode(g[:k]), "stop")
    assert r.usage.completion_tokens == k + 1, "the stop token is generated (counted), not shown"
    r = fx.client.completions.create(model=fx.model, prompt=case["text"], max_tokens=3, **greedy())
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (decode(g[:3]), "length", 3)


def test_min_tokens_holds_back_stop_tokens(fx):
    case = TEXT_CASES[0]
    g = case["greedy"]
    r = fx.client.completions.create(
        model=fx.model, prompt=case["text"], max_tokens=N,
        **greedy(extra_body=dict(stop_token_ids=[g[0]], min_tokens=6)),
    )
    # Without min_tokens it would stop at once; with it, the stop token cannot come before the 7th.
    assert r.usage.completion_tokens >= 6


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_choices(fx):
    case = TEXT_CASES[2]
    kw = dict(model=fx.model, prompt=case["text"], max_tokens=N, temperature=1.0, extra_body=dict(ignore_eos=True))
    a = fx.client.completions.create(seed=42, **kw).choices[0].text
    b = fx.client.completions.create(seed=42, **kw).choices[0].text
    c = fx.client.completions.create(seed=43, **kw).choices[0].text
    assert a == b and a != c
    assert a != decode(case["greedy"]), "temperature 1 samples, not argmax"
    r = fx.client.completions.create(seed=42, n=3, **kw)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    texts = [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
    assert texts[0] == a, "choice 0 of n uses the seed itself"
    assert len(set(texts)) == 3
    assert r.usage.completion_tokens == 3 * N and r.usage.prompt_tokens == len(case["prompt_ids"])
    again = fx.client.completions.create(seed=42, n=3, **kw)
    assert [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)] == texts
    # Greedy choices are all the reference.
    r = fx.client.completions.create(model=fx.model, prompt=case["text"], max_tokens=N, n=2, **greedy())
    assert [ch.text for ch in r.choices] == [decode(case["greedy"])] * 2


def test_logprobs(fx):
    case = TEXT_CASES[0]
    r = fx.client.completions.create(model=fx.model, prompt=case["text"], max_tokens=N, logprobs=3, **greedy())
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == N and len(lp.tokens) == N and len(lp.top_logprobs) == N
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        # Greedy: the chosen token is the most likely one.
        assert abs(chosen - max(top.values())) < 1e-6
    r = fx.client.chat.completions.create(
        model=fx.model, messages=CHAT_CASES[0]["messages"], max_tokens=N, logprobs=True, top_logprobs=2, **greedy()
    )
    content = r.choices[0].logprobs.content
    assert len(content) == N
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6


# --- bad requests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/v1/completions", {"prompt": list(range(3, 300))}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
        ("/v1/completions", {"prompt": [5, 9999]}, "prompt[1]"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids[0]"),
        ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"prompt": {"text": "hi"}}, "prompt"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]}, "messages"),
    ],
)
def test_bad_request_names_the_field(fx, path, body, field):
    status, err = fx.post(path, {"model": fx.model, **body})
    assert status == 400, err
    assert err["error"]["param"] == field and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["message"].startswith(field), err


def test_bad_requests_through_the_client_and_the_server_keeps_serving(fx):
    with pytest.raises(openai.BadRequestError) as e:
        fx.client.completions.create(model=fx.model, prompt="hi", max_tokens=-1)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        fx.client.chat.completions.create(model=fx.model, messages=[])
    assert "messages" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        fx.client.completions.create(model="no-such-model", prompt="hi")
    status, err = fx.post("/v1/completions", "not an object")
    assert status == 400
    case = TEXT_CASES[0]
    r = fx.client.completions.create(model=fx.model, prompt=case["text"], max_tokens=N, **greedy())
    assert r.choices[0].text == decode(case["greedy"])


# --- load --------------------------------------------------------------------------------------


def test_200_requests_at_concurrency_32_each_as_alone(fx, fx_alone):
    rng = random.Random(7)
    jobs = []
    for i in range(200):
        n = rng.choice([1, 3, 8, 17, 40, 90, 150, 200])
        jobs.append(([rng.randrange(3, 512) for _ in range(n)], rng.randrange(1, 25)))
    before = fx.metrics()

    def run(server, job):
        prompt, max_tokens = job
        r = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens, **greedy())
        assert r.usage.completion_tokens == max_tokens
        return r.choices[0].text

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda j: run(fx, j), jobs))
    alone = [run(fx_alone, j) for j in jobs]
    differ = [i for i in range(200) if together[i] != alone[i]]
    assert not differ, f"{len(differ)} of 200 differ from the same prompt alone, e.g. #{differ[0]}"
    assert len(set(alone)) > 150, "the outputs are informative (not one repeated text)"
    m = fx.wait_idle()
    assert m["autodeploy:kv_cache_pages_in_use"] == 0
    assert m["autodeploy:num_requests_running"] == 0 and m["autodeploy:num_requests_waiting"] == 0
    done = m['autodeploy:request_success_total{finished_reason="length"}'] - before[
        'autodeploy:request_success_total{finished_reason="length"}'
    ]
    assert done == 200
    assert m["autodeploy:generation_tokens_total"] - before["autodeploy:generation_tokens_total"] == sum(j[1] for j in jobs)
    # Requests queued behind the batch of 8: some waited.
    assert m["autodeploy:request_queue_time_seconds_count"] - before["autodeploy:request_queue_time_seconds_count"] == 200


# --- prefix sharing, cancellation, overflow, shutdown (SmolLM2) --------------------------------


def first_token_time(server, **kw):
    """Seconds to the first streamed chunk carrying a token (logprobs make every token a chunk),
    and the whole text."""
    t0 = time.perf_counter()
    ttft, text = None, ""
    for c in server.client.completions.create(model=server.model, stream=True, logprobs=0, **kw):
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.tokens and ttft is None:
            ttft = time.perf_counter() - t0
        if c.choices:
            text += c.choices[0].text
    return ttft, text


def test_prefix_sharing_hits_is_faster_and_gives_the_same_output(smol, smol_nocache):
    rng = random.Random(3)
    words = "alpha beta gamma delta river stone cloud paper engine garden window silver".split()
    system = "You are a helpful assistant. Context: " + " ".join(rng.choice(words) for _ in range(300))
    tok_a, tok_b = "\nQuestion: which word comes first?", "\nQuestion: which word is last?"
    before = smol.metrics()
    kw = dict(max_tokens=8, **greedy())
    ttft_a, text_a = first_token_time(smol, prompt=system + tok_a, **kw)
    mid = smol.metrics()
    ttft_b, text_b = first_token_time(smol, prompt=system + tok_b, **kw)
    after = smol.metrics()
    hits = after["autodeploy:prefix_cache_hits_total"] - mid["autodeploy:prefix_cache_hits_total"]
    assert mid["autodeploy:prefix_cache_hits_total"] == before["autodeploy:prefix_cache_hits_total"], "a is new"
    assert hits >= 256, f"b should find most of its {after['autodeploy:prefix_cache_queries_total'] - mid['autodeploy:prefix_cache_queries_total']:.0f} prompt tokens cached, found {hits:.0f}"
    print(f"ttft without prefix {ttft_a:.3f} s, with {ttft_b:.3f} s, {hits:.0f} tokens hit")
    assert ttft_b < ttft_a / 2, f"time to first token: {ttft_a:.3f} s without the prefix, {ttft_b:.3f} s with it"
    for prompt, text in [(system + tok_a, text_a), (system + tok_b, text_b)]:
        ref = smol_nocache.client.completions.create(model=smol_nocache.model, prompt=prompt, **kw)
        assert text == ref.choices[0].text


def test_cancelled_stream_frees_its_pages(smol):
    before = smol.metrics()
    stream = smol.client.completions.create(model=smol.model, prompt="Tell me a long story.", max_tokens=400, stream=True, **greedy())
    got = 0
    for c in stream:
        got += len(c.choices) > 0
        if got >= 3:
            break
    running = smol.metrics()
    assert running["autodeploy:kv_cache_pages_in_use"] > 0
    stream.close()
    m = smol.wait_idle(timeout=20)
    assert m["autodeploy:kv_cache_pages_in_use"] == 0 and m["autodeploy:num_requests_running"] == 0
    aborted = m['autodeploy:request_success_total{finished_reason="abort"}']
    assert aborted == before['autodeploy:request_success_total{finished_reason="abort"}'] + 1
    assert m["autodeploy:generation_tokens_total"] - before["autodeploy:generation_tokens_total"] < 400


def test_queue_overflow_answers_429(smol):
    # Room for 2: one running, one waiting. Both streams are accepted (headers sent) before the third.
    kw = dict(model=smol.model, max_tokens=400, stream=True, **greedy())
    s1 = smol.client.completions.create(prompt="Count to one hundred:", **kw)
    s2 = smol.client.completions.create(prompt="List every country:", **kw)
    try:
        with pytest.raises(openai.RateLimitError) as e:
            smol.client.completions.create(model=smol.model, prompt="hi", max_tokens=2)
        assert e.value.status_code == 429
        assert smol.metrics()["autodeploy:request_rejected_total"] >= 1
    finally:
        s1.close()
        s2.close()
    smol.wait_idle(timeout=20)
    r = smol.client.completions.create(model=smol.model, prompt="hi", max_tokens=2, **greedy())
    assert r.usage.completion_tokens == 2


def test_sigterm_drains_requests_in_flight():
    s = Server(smollm2_config(runtime="trtllm"), "drain")
    result = {}

    def long_request():
        try:
            r = s.client.completions.create(model=s.model, prompt="Write a poem about the sea.", max_tokens=60, **greedy())
            result["r"] = r
        except Exception as e:  # noqa: BLE001 (reported below)
            result["e"] = e

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 30
    while s.metrics()["autodeploy:generation_tokens_total"] < 1:
        assert time.time() < deadline, "the request never started"
        time.sleep(0.02)
    code = s.stop()
    t.join(60)
    assert code == 0, s.log_text()
    assert "e" not in result, f"the request in flight failed: {result.get('e')}"
    assert result["r"].usage.completion_tokens == 60 and result["r"].choices[0].finish_reason == "length"
    with pytest.raises(Exception):
        s.get("/health")
