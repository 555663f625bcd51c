"""Servers for the tests: `autodeploy serve` started on a free port with a config written here,
waited for on /health, and stopped with SIGTERM (which must drain and exit 0).

AUTODEPLOY_BIN names the binary (default: target/debug/autodeploy, what `cargo test` builds)."""

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("AUTODEPLOY_BIN", ROOT / "target" / "debug" / "autodeploy"))
FIXTURE = ROOT / "tests" / "fixtures" / "serve"
SMOLLM2 = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
START_TIMEOUT_S = 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config: str, name: str):
        if not BIN.exists():
            raise RuntimeError(f"{BIN} does not exist: build it with `cargo build` or set AUTODEPLOY_BIN")
        self.dir = tempfile.mkdtemp(prefix=f"autodeploy-{name}-")
        cfg = Path(self.dir) / "serve.toml"
        cfg.write_text(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(self.dir) / "server.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--config", str(cfg), "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if self.get("/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not answer /health in {START_TIMEOUT_S} s:\n{self.log_text()}")
            time.sleep(0.1)
        self.model = json.loads(self.get("/v1/models")[1])["data"][0]["id"]
        # No retries: a 429 or 5xx must reach the test as it is.
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def log_text(self):
        self.log.flush()
        return self.log_path.read_text()

    def get(self, path):
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path, body):
        """POSTs raw JSON (for bodies the openai client would not send); returns (status, json)."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self):
        """Every sample of /metrics: `name` -> value, or `name{label=...}` for labelled extras."""
        status, text = self.get("/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r'^([^{ ]+)\{model_name="[^"]*"(?:,([^}]*))?\} (\S+)$', line)
            assert m, f"malformed metrics line: {line!r}"
            name, extra, value = m.groups()
            out[name + (f"{{{extra}}}" if extra else "")] = float(value)
        return out

    def wait_idle(self, timeout=30):
        """Waits until no request runs or waits and no page is held; returns the metrics."""
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            idle = (
                m["autodeploy:num_requests_running"] == 0
                and m["autodeploy:num_requests_waiting"] == 0
                and m["autodeploy:kv_cache_pages_in_use"] == 0
            )
            if idle or time.time() > deadline:
                return m
            time.sleep(0.05)

    def stop(self, timeout=60):
        """SIGTERM, then the exit code (killed and failed if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the server did not stop {timeout} s after SIGTERM:\n{self.log_text()}")
        self.log.close()
        return self.proc.returncode


def fixture_config(**extra):
    lines = [
        f'model = "{FIXTURE}"',
        'dtype = "float32"',
        "max_seq_len = 256",
        "attn_page_size = 16",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def smollm2_config(**extra):
    if not SMOLLM2.exists():
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"{SMOLLM2} is missing: scripts/fetch-smollm2.sh fetches it")
        pytest.skip(f"{SMOLLM2} is missing: run scripts/fetch-smollm2.sh")
    lines = [f'model = "{SMOLLM2}"', "max_seq_len = 1024", 'activation_quant = "int8"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def started(config, name):
    s = Server(config, name)
    yield s
    code = s.stop()
    assert code == 0, f"the server exited with {code} after SIGTERM:\n{s.log_text()}"


@pytest.fixture(scope="session")
def fx():
    """The fixture model in flight: batches of 8, prefill chunks within 32 tokens, a queue of 300."""
    yield from started(
        fixture_config(runtime="trtllm", max_batch_size=8, max_num_tokens=32, max_waiting_requests=300), "fx"
    )


@pytest.fixture(scope="session")
def fx_alone():
    """The fixture model one request at a time through `demollm`, without prefix caching: what
    each prompt gives alone."""
    yield from started(
        fixture_config(runtime="demollm", max_batch_size=1, enable_prefix_caching=False), "fx-alone"
    )


@pytest.fixture(scope="session")
def smol():
    """SmolLM2 in flight with room for two requests (one running, one waiting)."""
    yield from started(
        smollm2_config(runtime="trtllm", max_batch_size=1, max_waiting_requests=1), "smol"
    )


@pytest.fixture(scope="session")
def smol_nocache():
    yield from started(smollm2_config(runtime="demollm", enable_prefix_caching=False), "smol-nocache")
