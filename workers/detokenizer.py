"""Incremental detokenization with stop strings.

`tokenizers`' DecodeStream turns one id at a time into text (holding back incomplete multi-byte
characters); on top of it, text that may be the start of a stop string is held back until the next
tokens show whether it is.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self._tokenizer = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self.stop = stop
        self._held = ""  # text withheld because it may be the start of a stop string

    def push(self, token_id: int) -> tuple[str, bool]:
        """Feed one generated id; returns (new text to emit, whether a stop string matched)."""
        new = self._stream.step(self._tokenizer, token_id) or ""
        if not self.stop:
            return new, False
        pending = self._held + new
        # Emitted text never ends in a stop string's prefix (it is held back), so a match lies in `pending`.
        hits = [at for stop in self.stop if (at := pending.find(stop)) >= 0]
        if hits:
            self._held = ""
            return pending[: min(hits)], True
        # hold back the longest tail that could still grow into a stop string
        keep = max((n for stop in self.stop for n in range(1, len(stop)) if pending.endswith(stop[:n])), default=0)
        out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        return out, False

    def flush(self) -> str:
        """Text held back for a possible stop string, released when the sequence ends otherwise."""
        out, self._held = self._held, ""
        return out
