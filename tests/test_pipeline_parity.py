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
