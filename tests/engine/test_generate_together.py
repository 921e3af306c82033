"""`generate_together`: several prompt batches with their own params in one engine call where the engine can, and the
same results, in the same order, where it cannot; prompts longer than the context get empty samples either way."""

from __future__ import annotations

from train.engine import GenParams, Sample, ShardedSampler, generate_together, skip_overlong


class _OneCallPerBatch:
    """An engine without per-prompt params (HF, the server): each sample names its prompt and its params' n."""

    tokenizer = None

    def __init__(self):
        self.calls: list[int] = []

    def generate_ids(self, prompt_ids, params, desc=""):
        self.calls.append(len(prompt_ids))
        return [[Sample(f"{ids[0]}/{params.n}", list(ids), "stop") for _ in range(params.n)] for ids in prompt_ids]


class _Together(_OneCallPerBatch):
    def generate_ids_together(self, batches, desc=""):
        self.calls.append(sum(len(ids) for ids, _ in batches))
        return [[[Sample(f"{ids[0]}/{p.n}", list(ids), "stop")] * p.n for ids in part] for part, p in batches]


BATCHES = [([[1], [2], [3]], GenParams(n=1, temperature=0.0)), ([[1], [2], [3]], GenParams(n=4, temperature=0.8))]
WANT = [[["1/1"], ["2/1"], ["3/1"]], [["1/4"] * 4, ["2/4"] * 4, ["3/4"] * 4]]


def _texts(out):
    return [[[s.text for s in row] for row in part] for part in out]


def test_one_engine_call_where_the_engine_takes_per_prompt_params():
    engine = _Together()
    assert _texts(generate_together(engine, BATCHES)) == WANT
    assert engine.calls == [6], "both batches in one call"


def test_one_call_per_batch_otherwise_with_the_same_results():
    engine = _OneCallPerBatch()
    assert _texts(generate_together(engine, BATCHES)) == WANT
    assert engine.calls == [3, 3]


def test_a_sharded_sampler_keeps_batches_and_order_on_one_process():
    for engine, calls in ((_Together(), [6]), (_OneCallPerBatch(), [3, 3])):
        assert _texts(generate_together(ShardedSampler(engine), BATCHES)) == WANT
        assert engine.calls == calls


def test_overlong_prompts_get_n_empty_samples_of_their_own_params():
    seen = []

    def generate(prompts, params):
        seen.append((prompts, [p.n for p in params]))
        return [[Sample("ok", ids, "stop")] * p.n for ids, p in zip(prompts, params)]

    params = [GenParams(n=1), GenParams(n=3), GenParams(n=2)]
    out = skip_overlong([[1] * 4, [1] * 9, [2] * 3], params, 8, generate)
    assert seen == [([[1] * 4, [2] * 3], [1, 2])], "only the prompts that fit, with their own params"
    assert [[s.text for s in row] for row in out] == [["ok"], ["", "", ""], ["ok", "ok"]]
    assert out[1][0].finish_reason == "length"
    # one GenParams for all prompts, as before
    out = skip_overlong([[1] * 9, [2]], GenParams(n=2), 8, generate)
    assert [[s.text for s in row] for row in out] == [["", ""], ["ok", "ok"]]


def test_two_batches_sharing_one_params_object_stay_apart():
    same = GenParams(n=2)
    for engine in (_Together(), _OneCallPerBatch()):
        out = generate_together(ShardedSampler(engine), [([[1], [2]], same), ([[3]], same)])
        assert _texts(out) == [[["1/2"] * 2, ["2/2"] * 2], [["3/2"] * 2]]
