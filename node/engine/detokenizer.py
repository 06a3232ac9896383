"""Incremental detokenization with stop strings.

Text is decoded from all generated ids each time (robust for byte-level BPE, where one character
may span tokens). Text that ends in an incomplete character, or that could still grow into a stop
string, is held back until it is settled.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._emitted = 0  # chars of the full text already returned
        self.text = ""  # full text so far (after stop-string truncation)

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """Add tokens; returns (new text to emit, whether a stop string was hit)."""
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        # the earliest match wins, whatever the order of the stop strings
        hits = [at for stop in self._stop if (at := text.find(stop, max(0, self._emitted - len(stop)))) != -1]
        if hits:
            at = min(hits)
            self.text = text[:at]
            return self._take(at), True
        self.text = text
        settled = len(text)
        if text.endswith("\ufffd"):
            settled = len(text.rstrip("\ufffd"))
        if self._stop:
            settled = min(settled, max(self._emitted, len(text) - self._hold))
        return self._take(settled), False

    def flush(self) -> str:
        """Everything not yet emitted (call when the sequence ends without a stop string)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self.text[self._emitted : upto] if upto <= len(self.text) else ""
        self._emitted = max(self._emitted, min(upto, len(self.text)))
        return out
