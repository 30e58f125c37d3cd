"""The OpenAI front end's pure pieces: a request body translated into the line protocol's fields,
and Prometheus sample values (the served API is tests/test_http_api.py)."""

from __future__ import annotations

import pytest

MODEL = "smollm2-135m"


@pytest.mark.parametrize("chat, extra, refused", [
    (False, {"response_format": {"type": "text"}, "tool_choice": "none", "logprobs": 0, "n": 1, "echo": False,
             "frequency_penalty": 0.0, "logit_bias": {}, "tools": []}, None),
    (True, {"tool_choice": "auto", "logprobs": False, "parallel_tool_calls": True}, None),
    (True, {"prompt": "x"}, "unrecognized request arguments: prompt"),  # was silently ignored
    (False, {"messages": []}, "unrecognized request arguments: messages"),
    (False, {"n": True}, "'n'"), (False, {"echo": 0}, "'echo'"),
    (False, {"response_format": {"type": "json_object"}}, "'response_format'"),
    (True, {"tool_choice": "auto", "tools": [{"type": "function"}]}, "'tools'"),
    (False, {"model": None}, "must provide a model"),  # 400, as OpenAI (was 404 model_not_found)
])
def test_neutral_values_pass_and_the_other_endpoints_fields_do_not(chat, extra, refused):
    """OpenAI's neutral spellings ({"type": "text"}, "none") were refused as unsupported, and each
    endpoint took the other's input field and ignored it."""
    from hetserve.leader.http_api import translate
    from hetserve.wire.client import ProtocolError

    body = {"model": MODEL, "max_tokens": 4, **({"messages": [{"role": "user", "content": "Hi"}]} if chat else
                                                  {"prompt": "Hi"}), **extra}
    if refused is None:
        assert translate(body, chat, MODEL, "r1").max_tokens == 4
    else:
        with pytest.raises(ProtocolError, match=refused):
            translate(body, chat, MODEL, "r1")


def test_metrics_keep_every_digit():
    """`:g` kept 6 significant digits: a counter past 10^6 moved in steps."""
    from hetserve.leader.metrics import sample_value

    assert [sample_value(v) for v in (1234567, 8589934592, True, 0.125, 1e-7, float("nan"), float("inf"))] == \
        ["1234567", "8589934592", "1", "0.125", "1e-07", "NaN", "+Inf"]
