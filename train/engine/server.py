"""`sampling.engine: server`: sample from a running `vllm serve --enable-lora` instead of an in-process engine.

The server runs on other GPUs or another node (see README, "vLLM server"). Each new adapter is loaded
through vLLM's runtime LoRA endpoint (`/v1/load_lora_adapter`, which needs
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=true` on the server), so the server never reloads the base model.
Adapter directories must be readable by the server at the same path (a shared filesystem).
Prompts go as token ids and come back as token ids (`return_token_ids`), so this engine is
interchangeable with the in-process ones.

Under `accelerate launch` every rank has its own ServerSampler and calls `set_adapter` in step with the
others. An adapter's server-side name is a function of its resolved path and the bytes of its files
(`adapter_name`): the same for every rank and for a resumed run, and a new one whenever the files change
(SCoRe rewrites one directory every step). Rank 0 alone computes it, loads the adapter and broadcasts the
name (or its error) to the others, which wait in that broadcast: one collective, which every rank needs
anyway to wait for the load, and no rank ever uses a name the server does not have. The previous adapter
is unloaded by rank 0 after a barrier, once no rank samples from it any more. A "400 already loaded"
answer for that name (a resumed run against the same server) counts as loaded.

Timeouts: `sampling.server_timeout_s` bounds the wait for a server that is still starting;
`sampling.server_request_timeout_s` bounds each request once it is up (a completion call can be long).
API key: when the environment variable named by `sampling.server_api_key_env` (default `VLLM_API_KEY`,
the variable `vllm serve` itself reads) is set, every request carries `Authorization: Bearer <key>`; the
key is never logged or put in an error message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from train.config import SamplingConfig
from train.engine import Conversation, GenParams, Sample, render_prompts, skip_overlong
from train.runtime import distributed as dist
from train.runtime.progress import ChunkProgress

log = logging.getLogger("selfreward")


class ServerError(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status the server answered; None when it did not answer


def adapter_name(path: str | Path) -> str:
    """The server-side name of the adapter in directory `path`: a function of its resolved path and of the bytes of
    its `adapter_*` files, so every rank (and a resumed run) derives the same name, and new weights get a new one."""
    p = Path(path).resolve()
    files = sorted(f for f in p.iterdir() if f.is_file() and f.name.startswith("adapter_")) if p.is_dir() else []
    if not files:
        raise ServerError(f"no adapter files (adapter_*) in {p}")
    h = hashlib.sha256(str(p).encode())
    for f in files:
        h.update(f"\0{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    hint = re.sub(r"[^A-Za-z0-9_.-]", "_", p.parent.name)[:40] or "adapter"
    return f"selfreward-{hint}-{h.hexdigest()[:16]}"


class ServerSampler:
    def __init__(self, model_path: str, cfg: SamplingConfig, seed: int, trust_remote_code: bool = False):
        from train.models import load_tokenizer

        start = time.perf_counter()
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.url = cfg.server_url.rstrip("/")
        self.startup_timeout = cfg.server_timeout_s
        self.request_timeout = cfg.server_request_timeout_s
        self.batch_size = cfg.batch_size
        self._key_env = cfg.server_api_key_env
        self._api_key = os.environ.get(self._key_env) or None  # never logged; only sent in the Authorization header
        base = self._wait_for_server()
        self.base_model: str = base["id"]
        # The server's own context length decides what it rejects (vLLM lists it in /v1/models).
        self.max_model_len: int = base.get("max_model_len") or cfg.max_model_len
        self._lora: str | None = None
        self.engine_start_s, self.generate_s = time.perf_counter() - start, 0.0

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
        timeout_key: str = "sampling.server_request_timeout_s",
    ) -> Any:
        timeout = self.request_timeout if timeout is None else timeout
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self._api_key:
            req.add_header("Authorization", f"Bearer {self._api_key}")
        where = f"vLLM server {self.url}{path}"
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            if self._api_key:
                detail = detail.replace(self._api_key, "***")
            if e.code == 401:
                detail += (
                    f" (the key in ${self._key_env} was refused)"
                    if self._api_key
                    else f" (the server wants an API key: export it in ${self._key_env}, see sampling.server_api_key_env)"
                )
            raise ServerError(f"{where} answered {e.code}: {detail}", e.code) from None
        except TimeoutError:  # the response did not come in time (a connect timeout arrives as URLError below)
            raise ServerError(f"{where}: no answer within {timeout:g}s ({timeout_key})") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"{where} unreachable: {e}") from None
        return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode(errors="replace")

    def _wait_for_server(self) -> dict[str, Any]:
        """The served base model's card (`id`, `max_model_len`); waits up to `server_timeout_s` for a server that is
        still loading. An answer that is a client error (401, 404) stops at once: the server is up and said no."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            probe = max(1.0, min(30.0, deadline - time.monotonic()))
            try:
                models = self._request("GET", "/v1/models", timeout=probe, timeout_key="sampling.server_timeout_s")
                return next(m for m in models["data"] if not m.get("parent"))
            except ServerError as e:
                if e.status is not None and e.status < 500:
                    raise
                if time.monotonic() > deadline:
                    msg = (
                        f"{e} (waited {self.startup_timeout:.0f}s, sampling.server_timeout_s; set sampling.server_url)"
                    )
                    raise ServerError(msg, e.status) from None
                time.sleep(2)

    def set_adapter(self, path: str | None) -> None:
        """Sample from the adapter in `path` (None: the base model) from the next call on.

        Collective under accelerate: every rank calls it with the same `path`. Rank 0 loads the adapter once and
        broadcasts its name (or the error, which every rank then raises); the previous adapter is unloaded by rank 0
        after a barrier, i.e. once every rank has switched away from it. Branches depend only on `path` and on
        names every rank got from rank 0, so all ranks make the same collective calls."""
        previous = self._lora
        new: str | None = None
        if path is not None:
            name: str | None = None
            error: str | None = None
            if dist.is_main():
                try:
                    name = adapter_name(path)
                    if name != previous:
                        self._load(name, Path(path).resolve())
                except Exception as e:  # every rank must get past the broadcast, so errors travel in it
                    error = str(e) if isinstance(e, ServerError) else f"adapter {path}: {type(e).__name__}: {e}"
            name, error = dist.broadcast((name, error))
            if error is not None:
                raise ServerError(error)
            new = name
        self._lora = new
        if previous is not None and previous != new:  # keep the server's LoRA slots free for the next adapter
            dist.barrier()  # every rank has switched: nobody samples from `previous` any more
            if dist.is_main():
                self._unload(previous)

    def _load(self, name: str, path: Path) -> None:
        try:
            self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        except ServerError as e:
            # The name is derived from the files, so "already loaded" means these very weights (a resumed run).
            if e.status == 400 and re.search(r"already (been )?loaded", str(e)):
                log.info("adapter %s is already loaded on the server: using it", name)
                return
            raise

    def _unload(self, name: str) -> None:
        # Rank 0 only, after the barrier: a failure here must not stop rank 0 alone (the others would wait for it in
        # the next collective), and a leftover adapter only holds a LoRA slot.
        try:
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except ServerError as e:
            log.warning("could not unload adapter %s from the vLLM server: %s", name, e)

    def generate(self, conversations: list[Conversation], params: GenParams, desc: str = "") -> list[list[Sample]]:
        return self.generate_ids(render_prompts(self.tokenizer, conversations), params, desc)

    def generate_ids(self, prompt_ids: list[list[int]], params: GenParams, desc: str = "") -> list[list[Sample]]:
        return skip_overlong(prompt_ids, params, self.max_model_len, lambda fit, _: self._generate(fit, params, desc))

    def _generate(self, prompt_ids: list[list[int]], params: GenParams, desc: str = "") -> list[list[Sample]]:
        out: list[list[Sample]] = []
        t0 = time.perf_counter()
        chunks = ChunkProgress(len(prompt_ids), desc or "generate", min_total=self.batch_size + 1)
        for i in range(0, len(prompt_ids), self.batch_size):
            chunk = [list(p) for p in prompt_ids[i : i + self.batch_size]]
            body: dict[str, Any] = {
                "model": self._lora or self.base_model,
                "prompt": chunk,
                "n": params.n,
                "temperature": params.temperature,
                "top_p": params.top_p if params.temperature > 0 else 1.0,
                "max_tokens": params.max_tokens,
                "return_token_ids": True,  # no per-request seed: it crashed the CPU engine; the server's --seed holds
            }
            if params.stop:
                body["stop"] = params.stop
            if params.allowed_token_ids is not None:
                body["allowed_token_ids"] = params.allowed_token_ids
            choices = sorted(self._request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            # OpenAI numbering: choice index = prompt index * n + sample index.
            for p in range(len(chunk)):
                out.append(
                    [
                        Sample(
                            c["text"],
                            list(c["token_ids"] or []),
                            "length" if c["finish_reason"] == "length" else "stop",
                        )
                        for c in choices[p * params.n : (p + 1) * params.n]
                    ]
                )
            chunks.update(len(chunk))
        self.generate_s += time.perf_counter() - t0
        return out

    def sleep(self) -> None:  # the server has its own GPUs
        pass

    def wake(self) -> None:
        pass
