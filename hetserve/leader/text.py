"""Incremental detokenization with stop strings, for one request.

Streaming pieces must concatenate to exactly the final text. Two things make a piece unsafe to
send yet: a trailing partial UTF-8 character (the tokenizer decodes it as U+FFFD until the rest
arrives), and a tail that could be the start of a stop string (if the string completes, that text
is cut). Such text is held back until it is settled or the request finishes.

Each token decodes only a short window of the newest tokens, not the whole completion (vLLM's
prefix/read offsets): `decode(tokens[prefix:])` minus `decode(tokens[prefix:read])` is the new
text, where the window starts one settled token back so that tokenizers which treat a leading
space specially (SentencePiece) see the same context they would in the whole text. The whole
completion is decoded once, at finish(), to release what was held back.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self._decode = decode
        self._stop = stop
        self._tokens: list[int] = []
        self._prefix = 0  # window start: one settled token back
        self._read = 0  # tokens whose text is in self._text
        self._text = ""  # text of tokens[:read], settled (no partial character at its end)
        self.emitted = ""  # what has been sent; always a prefix of the final text
        self.stopped = False  # a stop string was found; the text ends before it

    def push(self, token_id: int) -> str:
        """Add a generated token; return the piece that may be sent now."""
        self._tokens.append(token_id)
        before = self._decode(self._tokens[self._prefix:self._read])
        window = self._decode(self._tokens[self._prefix:])
        if len(window) <= len(before) or window.endswith(REPLACEMENT) or not window.startswith(before):
            # A partial character, or no new text yet: wait for the next token (finish() settles all).
            return ""
        self._text += window[len(before):]
        self._prefix, self._read = self._read, len(self._tokens)
        text = self._text
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        safe = len(text) - self._held_back(text)
        return self._emit(text[:safe])

    def finish(self) -> str:
        """The request ends (length, EOS, cancel): release whatever was held back, up to a stop
        string in it (one whose last token also ended in a partial character was never seen by
        push(); `stopped` then says so)."""
        if self.stopped:
            return ""
        text = self._decode(self._tokens)
        if not text.startswith(self.emitted):
            # Keep the contract that pieces concatenate to the final text.
            return ""
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        return self._emit(text)

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.emitted):
            return ""
        piece = upto[len(self.emitted):]
        self.emitted = upto
        return piece

    def _find_stop(self, text: str) -> int | None:
        # A stop string can only newly appear in text not yet emitted (held-back tails included).
        hits = [i for s in self._stop if (i := text.find(s, max(0, len(self.emitted) - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """How many trailing characters must wait."""
        hold = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold
