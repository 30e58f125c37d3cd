"""Token ids from 1-, 2- and 3-stage pipelines (real processes) equal transformers greedy."""

from __future__ import annotations

import asyncio

import pytest

from conftest import PROMPTS, connect

MAX_NEW = 24


async def greedy_ids(client, prompt: str, max_tokens: int = MAX_NEW) -> tuple[list[int], dict]:
    events = await client.call({"prompt": prompt, "max_tokens": max_tokens})
    assert events[-1]["event"] == "done", events[-1]
    return [e["token_id"] for e in events if e["event"] == "token"], events[-1]


@pytest.mark.parametrize("stages", [1, 2, 3])
async def test_pipeline_equals_transformers_greedy(cluster_factory, reference, stages):
    cluster = cluster_factory(stages)
    client = await connect(cluster)
    try:
        status = await client.status()
        layers = [h["layers"] for h in status["hosts"]]
        assert len(layers) == stages and layers[0][0] == 0 and layers[-1][1] == 30
        assert all(a[1] == b[0] for a, b in zip(layers, layers[1:])), "slices must be contiguous"

        # One at a time, then all 8 at once with different prompt lengths (continuous batching).
        for prompt in PROMPTS[:2]:
            ids, done = await greedy_ids(client, prompt)
            prompt_ids = reference.tokenizer(prompt)["input_ids"]
            assert ids == reference(prompt_ids, MAX_NEW)
            assert done["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids)}

        results = await asyncio.gather(*(greedy_ids(client, p, MAX_NEW + 4 * i) for i, p in enumerate(PROMPTS)))
        for i, (prompt, (ids, _)) in enumerate(zip(PROMPTS, results)):
            assert ids == reference(reference.tokenizer(prompt)["input_ids"], MAX_NEW + 4 * i), prompt
        status = await client.status()
        assert status["running"] == 0 and status["free_slots"] == 8
    finally:
        await client.close()


async def test_chunked_prefill_and_chat_template(cluster_factory, reference):
    """A prompt longer than the prefill budget is prefilled in chunks; chat messages use the
    model's template; both give transformers' greedy continuation."""
    cluster = cluster_factory(2, "--prefill-tokens", "16")
    client = await connect(cluster)
    try:
        prompt = " ".join(PROMPTS)  # ~70 tokens: 5 chunks of 16
        ids, _ = await greedy_ids(client, prompt, 16)
        assert ids == reference(reference.tokenizer(prompt)["input_ids"], 16)

        messages = [{"role": "user", "content": "Name a planet."}]
        events = await client.call({"messages": messages, "max_tokens": 16})
        chat_ids = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False)
        got = [e["token_id"] for e in events if e["event"] == "token"]
        want = reference(list(chat_ids), 16)
        eos = reference.tokenizer.eos_token_id
        assert got == want[: want.index(eos) + 1] if eos in want else got == want
    finally:
        await client.close()


async def test_mixed_precision_with_w8a8_equals_one_process(cluster_factory, reference, model_dir, tmp_path):
    """A plan of native, int8 and w8a8 layers on two hosts: the leader calibrates the w8a8 scales
    and ships each stage its own; greedy tokens equal the same precisions run in one process."""
    import torch

    from hetserve.plan.planner import Plan, PlannedStage, Workload
    from hetserve.plan.quality import whole_model

    precisions = [("native", "int8", "w8a8")[i % 3] for i in range(30)]
    plan = Plan(model="smollm2-135m", dtype="float32", workload=Workload(32, 16, 2), max_ppl_increase=1.0,
                base_ppl=0.0, predicted_ppl=0.0, prefill_microbatch=1, decode_microbatch=1, predicted_tokens_per_s=0.0,
                stages=[PlannedStage("worker-0", 0, 14, precisions[:14], 0.0, 0.0, 0, 0),
                        PlannedStage("worker-1", 14, 30, precisions[14:], 0.0, 0.0, 0, 0)])
    plan.save(tmp_path / "plan.json")
    client = await connect(cluster_factory(2, "--plan", str(tmp_path / "plan.json")))
    try:
        status = await client.status()
        ids, _ = await greedy_ids(client, PROMPTS[0], 12)
    finally:
        await client.close()
    assert [h["layers"] for h in status["hosts"]] == [[0, 14], [14, 30]]
    assert all("w8a8 x" in h["precision"] and "int8 x" in h["precision"] for h in status["hosts"])

    prompt = reference.tokenizer(PROMPTS[0])["input_ids"]
    whole = whole_model(model_dir, 32, precisions=precisions)  # the scales the leader cached

    def step(start: int, tokens: list[int]) -> int:
        return int(whole.forward(torch.tensor([0]), torch.tensor([start]), torch.tensor([len(tokens)]),
                                 torch.tensor([tokens]))[0])

    want = [step(0, prompt)]
    while len(want) < 12:
        want.append(step(len(prompt) + len(want) - 1, [want[-1]]))
    eos = reference.tokenizer.eos_token_id
    assert ids == (want[: want.index(eos) + 1] if eos in want else want)
    assert want != reference(prompt, 12), "w8a8 and int8 layers should change some greedy token"


async def test_decode_ahead_samples_what_waiting_for_each_token_samples(cluster_factory):
    """One stage queues each request's next decode step before its token is back (the stage feeds
    it); seeded sampling, stop strings and max_tokens give exactly what the leader waiting for every
    token gives."""
    bodies = [{"prompt": p, "max_tokens": 12 + 3 * i, "temperature": 0.8, "top_k": 40, "seed": 100 + i}
              for i, p in enumerate(PROMPTS[:4])] + [{"prompt": PROMPTS[4], "max_tokens": 24, "stop": [" the"]}]
    runs = {}
    for ahead in ("on", "off"):  # "auto" leaves it off on a CPU stage
        client = await connect(cluster_factory(1, "--decode-ahead", ahead))
        try:
            status = await client.status()
            runs[ahead] = await asyncio.gather(*(client.call(body) for body in bodies))
        finally:
            await client.close()
        assert status["batching"]["decode_ahead"] == (ahead == "on")
    def without_ids(events):
        return [{k: v for k, v in e.items() if k != "id"} for e in events]
    for with_ahead, without in zip(runs["on"], runs["off"]):
        assert with_ahead[-1]["event"] == "done"
        assert without_ids(with_ahead) == without_ids(without)
    assert runs["on"][-1][-1]["finish_reason"] == "stop"
