"""`sampling.engine: server`: sample from a running `vllm serve --enable-lora` instead of an in-process engine.

The server runs on other GPUs or another node (see README, "vLLM server"). Each new adapter is loaded
through vLLM's runtime LoRA endpoint (`/v1/load_lora_adapter`, which needs
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=true` on the server), so the server never reloads the base model.
Adapter directories must be readable by the server at the same path (a shared filesystem).
Prompts go as token ids and come back as token ids (`return_token_ids`), so this engine is
interchangeable with the in-process ones.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from train.config import SamplingConfig
from train.sampling import Conversation, GenParams, Sample, render_prompts, skip_overlong


class ServerError(RuntimeError):
    pass


class ServerSampler:
    def __init__(self, model_path: str, cfg: SamplingConfig, seed: int, trust_remote_code: bool = False):
        from train.models import load_tokenizer

        start = time.perf_counter()
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.url = cfg.server_url.rstrip("/")
        self.timeout = cfg.server_timeout_s
        self.batch_size = cfg.batch_size
        base = self._wait_for_server()
        self.base_model: str = base["id"]
        # The server's own context length decides what it rejects (vLLM lists it in /v1/models).
        self.max_model_len: int = base.get("max_model_len") or cfg.max_model_len
        self._lora: str | None = None
        self._next_id = 1
        self.engine_start_s, self.generate_s = time.perf_counter() - start, 0.0

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise ServerError(f"vLLM server {self.url}{path} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"vLLM server {self.url}{path} unreachable: {e}") from None
        return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode(errors="replace")

    def _wait_for_server(self) -> dict[str, Any]:
        """The served base model's card (`id`, `max_model_len`); waits up to `server_timeout_s` for a server that is still loading."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                models = self._request("GET", "/v1/models")["data"]
                return next(m for m in models if not m.get("parent"))
            except ServerError as e:
                if time.monotonic() > deadline:
                    raise ServerError(f"{e} (waited {self.timeout:.0f}s; set sampling.server_url)") from None
                time.sleep(2)

    def set_adapter(self, path: str | None) -> None:
        previous = self._lora
        if path is not None:
            name = f"selfreward-{self._next_id}"
            self._next_id += 1
            self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(path).resolve())})
            self._lora = name
        else:
            self._lora = None
        if previous is not None:  # keep the server's LoRA slots free for the next adapter
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": previous})

    def generate(self, conversations: list[Conversation], params: GenParams, desc: str = "") -> list[list[Sample]]:
        return self.generate_ids(render_prompts(self.tokenizer, conversations), params, desc)

    def generate_ids(self, prompt_ids: list[list[int]], params: GenParams, desc: str = "") -> list[list[Sample]]:
        return skip_overlong(prompt_ids, params, self.max_model_len, lambda fit: self._generate(fit, params))

    def _generate(self, prompt_ids: list[list[int]], params: GenParams) -> list[list[Sample]]:
        out: list[list[Sample]] = []
        t0 = time.perf_counter()
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
        self.generate_s += time.perf_counter() - t0
        return out

    def sleep(self) -> None:  # the server has its own GPUs
        pass

    def wake(self) -> None:
        pass
