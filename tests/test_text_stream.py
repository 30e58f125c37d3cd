"""Incremental detokenization: pieces concatenate to the text; stop strings cut it."""

from __future__ import annotations

import pytest

from hetserve.leader.text import TextStream


def byte_decoder(ids: list[int]) -> str:
    """Token i = byte i, decoded like a byte-level BPE tokenizer (U+FFFD for partial chars)."""
    return bytes(ids).decode("utf-8", errors="replace")


def run(text: str, stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(byte_decoder, tuple(stop))
    pieces = []
    for b in text.encode():
        pieces.append(stream.push(b))
        if stream.stopped:
            return pieces, stream
    pieces.append(stream.finish())
    return pieces, stream


@pytest.mark.parametrize("text", ["hello world", "héllo wörld", "日本語のテキスト", "emoji 🎉🚀 done", ""])
def test_multibyte_pieces_never_split_a_character(text):
    pieces, stream = run(text)
    assert "".join(pieces) == text == stream.emitted
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_cuts_and_is_never_streamed():
    pieces, stream = run("one, two, three, four", stop=["thr"])
    assert stream.stopped and "".join(pieces) == "one, two, " == stream.emitted


def test_stop_prefix_is_held_back_then_released():
    # "th" could start "three" until "e" arrives; then it is ordinary text.
    pieces, stream = run("the end", stop=["three"])
    assert not stream.stopped and "".join(pieces) == "the end"
    assert pieces[0] == "" and pieces[1] == ""  # "t", "th" held


def test_earliest_of_several_stop_strings_wins():
    _, stream = run("abc STOP def END", stop=["END", "STOP"])
    assert stream.emitted == "abc "


def test_real_tokenizer_concatenation(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "Grüße aus Köln — 東京 🎌, naïve café.\n  indented"
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(lambda t: tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_a_stop_string_in_a_token_that_ends_mid_character_is_cut_at_finish():
    """push() waits while its window ends in a partial character, so a stop string completed by
    such a token went unseen, and a request ending then (length, EOS) sent it in its text."""
    pieces = {1: "ok", 2: ".\ufffd"}
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), (".",))
    assert stream.push(1) == "ok" and stream.push(2) == "" and not stream.stopped
    assert stream.finish() == "" and stream.stopped and stream.emitted == "ok"
