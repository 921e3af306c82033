"""Plain HF `generate` with PEFT adapters: slower than vLLM, but needs nothing beyond transformers."""

from __future__ import annotations

import time

from train.config import SamplingConfig
from train.engine.base import Conversation, GenParams, Sample, render_prompts
from train.runtime import distributed as dist
from train.runtime.progress import ChunkProgress, progress_enabled


class HFSampler:
    """Plain `model.generate` with PEFT adapters: slower, but needs nothing beyond transformers."""

    def __init__(self, model_path: str, cfg: SamplingConfig, seed: int, trust_remote_code: bool = False):
        start = time.perf_counter()
        import torch

        from train.models import load_causal_lm, load_tokenizer

        torch.manual_seed(seed)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.base = load_causal_lm(model_path, trust_remote_code, cfg.dtype)
        self.device = f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu"
        self.base.to(self.device).eval()
        self.model = self.base
        self.batch_size = cfg.batch_size
        self.engine_start_s, self.generate_s = time.perf_counter() - start, 0.0

    def set_adapter(self, path: str | None) -> None:
        from peft import PeftModel

        from train.models import load_adapter

        if isinstance(self.model, PeftModel):
            self.base = self.model.unload()
        self.model = self.base if path is None else load_adapter(self.base, path).eval()

    def generate(self, conversations: list[Conversation], params: GenParams, desc: str = "") -> list[list[Sample]]:
        return self.generate_ids(render_prompts(self.tokenizer, conversations), params, desc)

    def generate_ids(self, prompt_ids: list[list[int]], params: GenParams, desc: str = "") -> list[list[Sample]]:
        import torch
        from tqdm.auto import tqdm

        tok = self.tokenizer
        prompts = [list(ids) for ids in prompt_ids]
        stop_ids = {tok.eos_token_id, tok.pad_token_id} - {None}
        results: list[list[Sample]] = []
        starts = range(0, len(prompts), self.batch_size)
        chunks = ChunkProgress(len(prompts), desc or "hf generate", min_total=self.batch_size + 1)
        for start in tqdm(starts, desc=desc or "hf generate", disable=not progress_enabled()):
            batch = prompts[start : start + self.batch_size]
            width = max(len(p) for p in batch)
            pad = tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
            sampled = params.temperature > 0
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=params.max_tokens,
                    do_sample=sampled,
                    temperature=params.temperature if sampled else None,
                    top_p=params.top_p if sampled else None,
                    top_k=None,
                    num_return_sequences=params.n,
                    pad_token_id=pad,
                    prefix_allowed_tokens_fn=_allow(params.allowed_token_ids),
                )
            self.generate_s += time.perf_counter() - t0
            for i in range(len(batch)):
                row = []
                for j in range(params.n):
                    ids = out[i * params.n + j, width:].tolist()
                    cut = next((k for k, t in enumerate(ids) if t in stop_ids), None)
                    reason = "stop" if cut is not None else "length"
                    ids = ids[:cut] if cut is not None else ids
                    text = tok.decode(ids, skip_special_tokens=True)
                    for s in params.stop:
                        if s in text:
                            text, reason = text[: text.index(s)], "stop"
                    row.append(Sample(text, ids, reason))
                results.append(row)
            chunks.update(len(batch))
        return results

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def _allow(ids: list[int] | None):
    return (lambda _batch, _prefix: ids) if ids else None
