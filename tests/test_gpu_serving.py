"""On a GPU, through the real daemons: one stage serving from CUDA graphs, with decode-ahead and
mixed micro-batches (decode rows riding among prompt chunks), gives transformers' greedy tokens.
Skipped without CUDA (CI has none); run on the GPU machine with
`python -m pytest tests/test_gpu_serving.py`.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import Cluster, connect

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WORDS = re.findall(r"\w+", (Path(__file__).resolve().parent.parent / "hetserve" / "data" / "calibration.txt")
                   .read_text())


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """A small Llama with random weights and a word-level tokenizer (benchmarks/random_model.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from random_model import word_tokenizer

    path = tmp_path_factory.mktemp("gpu-serving-model")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                  max_position_embeddings=1024)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    word_tokenizer(config.vocab_size).save_pretrained(path)
    return path


async def serve(cluster: Cluster, prompts: list[str]) -> tuple[list[list[dict]], dict]:
    client = await connect(cluster)
    try:
        results = await asyncio.gather(*(client.call({"prompt": p, "max_tokens": 24}) for p in prompts))
        return results, (await client.status())["batching"]
    finally:
        await client.close()


def test_one_gpu_stage_serves_transformers_greedy_tokens(random_model):
    """Synchronous (asyncio.run): the GPU machine's image has no pytest-asyncio."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [" ".join(WORDS[7 * i: 7 * i + 5 + 13 * i]) for i in range(8)]  # 5 to 96 words
    cluster = Cluster(1, "--model", str(random_model), "--device", "cuda", "--dtype", "float32", "--max-seqs", "8",
                      "--prefill-seqs", "2", "--prefill-tokens", "48")
    try:
        results, batching = asyncio.run(serve(cluster, prompts))
    finally:
        assert cluster.stop() == 0
    assert batching["decode_ahead"] and batching["mix_tokens"] > 0 and batching["mixed_microbatches"] > 0

    tokenizer = AutoTokenizer.from_pretrained(random_model)
    model = AutoModelForCausalLM.from_pretrained(random_model, dtype=torch.float32).to("cuda").eval()
    for prompt, events in zip(prompts, results):
        assert events[-1]["event"] == "done", events[-1]
        got = [e["token_id"] for e in events if e["event"] == "token"]
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device="cuda")
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                                  do_sample=False)[0, ids.shape[1]:].tolist()
        assert got == want[:len(got)] and (len(got) == 24 or events[-1]["finish_reason"] == "stop"), prompt
