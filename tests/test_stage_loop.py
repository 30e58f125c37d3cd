"""A host's data path on one micro-batch (StageLoop._compute, no sockets): token ids are checked
against the vocabulary before they reach the device, and a good batch flows on."""

from __future__ import annotations

import pytest
import torch

from hetserve.model.stage import StageModel, StageSpec
from hetserve.wire.codec import WireError, decode
from hetserve.wire.messages import SamplingRows, Step
from hetserve.wire.tensors import to_frame
from hetserve.worker.stage_loop import StageLoop


@pytest.fixture(scope="module")
def loop(model_dir):
    model = StageModel(model_dir, StageSpec(0, 2, first=True, last=False, max_seqs=2, max_context=64))
    return StageLoop(model, 0, data_in=None, data_out=None, torch_thread=None)


def step_of(ids: torch.Tensor) -> tuple[Step, list]:
    rows, tokens = ids.shape
    meta, frame = to_frame(ids)
    sampling = SamplingRows([0.0] * rows, [0] * rows, [1.0] * rows, [0] * rows, [0] * rows)
    return Step(1, "prefill", list(range(rows)), [0] * rows, [tokens] * rows, sampling, meta), [frame]


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_token_ids_outside_the_vocabulary_are_refused(loop, bad):
    vocab = loop.model.embed.num_embeddings
    ids = torch.tensor([[5, 7, vocab if bad == "vocab" else bad]])
    with pytest.raises(WireError, match="out of the vocabulary"):
        loop._compute(*step_of(ids))


def test_a_good_micro_batch_goes_downstream(loop):
    header, frame = loop._compute(*step_of(torch.tensor([[5, 7, 9], [11, 13, 17]])))
    step = decode(header, expect=(Step,))
    assert step.tensor.shape == [2, 3, loop.model.hidden_size] and len(step.stage_ms) == 1
