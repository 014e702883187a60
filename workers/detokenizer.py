"""Incremental detokenization with stop strings.

Decoding only a short window of ids per step keeps streaming O(1) per token; a trailing U+FFFD
means a multi-byte character is incomplete, so we hold it back until the next token completes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    stop: list[str] = field(default_factory=list)
    text: str = ""  # everything emitted so far
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _held: str = ""  # text withheld because it may be the start of a stop string

    def push(self, token_id: int) -> tuple[str, bool]:
        """Feed one generated id; returns (new text to emit, whether a stop string matched)."""
        self._ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return "", False
        new = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._emit(new)

    def _emit(self, new: str) -> tuple[str, bool]:
        if not self.stop:
            self.text += new
            return new, False
        pending = self._held + new
        # Emitted text never ends in a stop string's prefix (it is held back), so a match lies in `pending`.
        hits = [at for stop in self.stop if (at := pending.find(stop)) >= 0]
        if hits:
            out = pending[: min(hits)]
            self.text += out
            self._held = ""
            return out, True
        # hold back the longest tail that could still grow into a stop string
        keep = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(pending)), 0, -1):
                if pending.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out, False

    def flush(self) -> str:
        """Text held back for a possible stop string, released when the sequence ends otherwise."""
        out, self._held = self._held, ""
        self.text += out
        return out
