"""What the benchmark sends: a list of requests (prompt text, output length). Pure but for I/O helpers.

Synthetic prompts are windows of real English text (the shipped GPL-3 calibration text) cut to an
exact token count with the served model's tokenizer, each window starting elsewhere so no two
prompts are alike. Natural text rather than random token ids because random ids make models emit
the end-of-sequence token early, and the line protocol has no way to ignore it: the output
lengths would drift far below what was asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..client import request_line
from ..config import MAX_LINE_BYTES

# The same file plan/quality.py calibrates on; named here so `bench` does not import torch for it.
SOURCE_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
WINDOW_STRIDE = 97  # tokens between the starts of consecutive synthetic prompts
FIT_ATTEMPTS = 4  # re-tokenizing a decoded window rarely changes its length by more than a token
PROMPT_FIELDS = {"prompt", "max_tokens"}


class WorkloadError(Exception):
    """A workload that cannot be built; the message says why (and where, for a file)."""


@dataclass(frozen=True)
class RequestSpec:
    prompt: str  # raw text, sent as `prompt` (no chat template)
    max_tokens: int


def parse_prompts(text: str, source: str, default_max_tokens: int) -> list[RequestSpec]:
    """JSONL: one {"prompt": str, "max_tokens": int (optional)} per line; blank lines skipped."""
    specs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(obj, dict):
            raise WorkloadError(f"{where}: expected an object like {{\"prompt\": \"...\", \"max_tokens\": 64}}")
        unknown = set(obj) - PROMPT_FIELDS
        if unknown:
            raise WorkloadError(f"{where}: unknown fields {', '.join(sorted(unknown))} (known: prompt, max_tokens)")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise WorkloadError(f"{where}: 'prompt' must be a non-empty string")
        max_tokens = obj.get("max_tokens", default_max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise WorkloadError(f"{where}: 'max_tokens' must be an integer of at least 1")
        _check_sendable(prompt, where)
        specs.append(RequestSpec(prompt, max_tokens))
    if not specs:
        raise WorkloadError(f"{source} holds no prompts")
    return specs


def request_body(index: int, spec: RequestSpec, temperature: float) -> dict:
    """The request bench sends for `spec`, the index-th of the run (the client adds an id)."""
    # A seed per request makes a sampled run repeatable; greedy ignores it.
    return {"prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": temperature, "seed": index}


def _check_sendable(prompt: str, where: str) -> None:
    """The request line fits what the server reads, and its text is valid Unicode: the server answers
    a line past MAX_LINE_BYTES unread, so its error could not name the request."""
    # Its other fields at their longest: the client's id, the largest index, tokens and temperature.
    widest = {"id": "c" + "9" * 20, **request_body((1 << 63) - 1, RequestSpec(prompt, 1 << 31), 100.0)}
    try:
        size = len(request_line(widest)) - 1
    except UnicodeEncodeError:
        raise WorkloadError(f"{where}: 'prompt' is not valid Unicode (an unpaired surrogate such as \\ud800)") from None
    if size > MAX_LINE_BYTES:
        raise WorkloadError(f"{where}: the request would be {size} bytes of JSON; the server reads lines of up to "
                            f"{MAX_LINE_BYTES}")


def load_prompts(path: Path, default_max_tokens: int) -> list[RequestSpec]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise WorkloadError(f"{path} is not UTF-8 text") from None
    return parse_prompts(text, str(path), default_max_tokens)


def token_count(tokenizer, text: str) -> int:
    """Tokens the leader will count for `text` sent as `prompt` (leader/tokens.py encodes it so)."""
    return len(tokenizer(text)["input_ids"])


def synthetic_prompts(tokenizer, count: int, prompt_tokens: int, source: str) -> list[str]:
    """`count` different prompts of `prompt_tokens` tokens each (as `token_count` counts them)."""
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    if not ids:
        raise WorkloadError("the source text for synthetic prompts is empty")
    # Repeat the text so that any window fits, wherever it starts.
    ids = ids * (1 + (prompt_tokens + count * WINDOW_STRIDE) // len(ids))
    return [_fit_window(tokenizer, ids, i * WINDOW_STRIDE, prompt_tokens) for i in range(count)]


def _fit_window(tokenizer, ids: list[int], start: int, want: int) -> str:
    """Decode ids[start:start+n] with n tuned until the text tokenizes to `want` tokens.

    Decoding and encoding again is not exact at the window's edges (a cut word merges, special
    tokens get added), so the window length is corrected by the difference a few times. If it
    never lands exactly the closest text is used; the server's usage reports the true count.
    """
    take, best = want, None
    for _ in range(FIT_ATTEMPTS):
        text = tokenizer.decode(ids[start:start + max(1, take)])
        got = token_count(tokenizer, text)
        if best is None or abs(got - want) < abs(best[1] - want):
            best = (text, got)
        if got == want:
            break
        take += want - got
    return best[0]


def synthetic_workload(tokenizer, count: int, prompt_tokens: int, output_tokens: int) -> list[RequestSpec]:
    source = SOURCE_TEXT.read_text(encoding="utf-8")
    return [RequestSpec(p, output_tokens) for p in synthetic_prompts(tokenizer, count, prompt_tokens, source)]
