"""From token ids to the text a client sees: incremental decoding and stop strings.

Every push decodes the whole output again and emits what is new. Decoding piecewise
would split characters that span tokens (byte-level BPE) and drop the spaces some
decoders add between tokens; decoding all of it costs O(n) per step, small next to a
forward pass of the model at these lengths. Text that could still be the start of a stop
string, or that ends in an incomplete character, is held back until it cannot be.
"""

from __future__ import annotations

from collections.abc import Sequence

from respec.engine.tokenizer import TextTokenizer

INCOMPLETE = "\ufffd"  # what decoding shows for the first bytes of an unfinished character


class TextStream:
    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the decoded output so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False  # a stop string was found: the output ends before it

    def push(self, ids: Sequence[int]) -> str:
        """New text that is safe to show; empty while held back or after a stop string."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        self.text = self.tokenizer.decode(self.ids)
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(self.text) - hold
        while safe > self.emitted and self.text[safe - 1] == INCOMPLETE:
            safe -= 1
        return self._emit(safe)

    def flush(self) -> str:
        """The rest of the text: the output ended (no stop string can complete any more)."""
        return self._emit(len(self.text))

    def _first_stop(self) -> int | None:
        # held-back text is at least len(stop) - 1 characters, so a stop string that ends in
        # new text cannot start before what was emitted
        found = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:end], end
        return piece
