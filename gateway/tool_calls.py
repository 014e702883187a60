"""Tool calls out of model text: `<tool_call>` blocks -> OpenAI `tool_calls`.

Two shapes are understood, in one or several blocks, optionally after some plain text:
SmolLM2's list form  `<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>` and Hermes'
single-object form `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.

The parser is incremental: `feed()` takes text as it streams and returns deltas as soon as they
are certain. Plain text flows through at once, except a tail that could be the start of
`<tool_call>` (held back until it can't be). A call is emitted when its JSON object is complete
and valid: first a delta with index, id, type and name, then its arguments. Anything that does
not parse (broken JSON, an object without a name) falls back to plain content, unless some calls
were already emitted, in which case the broken rest is dropped.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

import partial_json_parser

_JSON = json.JSONDecoder()
OPEN = "<tool_call>"
CLOSE = "</tool_call>"


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class ContentDelta:
    text: str


@dataclass
class CallDelta:
    """One OpenAI tool-call delta: the first per call has id and name, later ones only arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


Delta = ContentDelta | CallDelta


@dataclass
class ToolCallParser:
    parallel: bool = True  # parallel_tool_calls=False keeps only the first call
    names: frozenset[str] | None = None  # if given, a call to another name is not a tool call
    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    _buf: str = ""  # text not yet classified
    _pos: int = 0  # parse position in `_buf` inside a block
    _in_call: bool = False  # inside a <tool_call> block (after OPEN)
    _failed: bool = False  # the text stopped parsing: the rest is content

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Delta]:
        return self._drain(final=True)

    # -- internals ----------------------------------------------------------------------
    def _drain(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while self._buf:
            before = (self._buf, self._pos, self._in_call)
            if self._failed:
                if not self.calls:  # after emitted calls, broken text is dropped, not content
                    self._emit_content(self._buf, out)
                self._buf = ""
            elif self._in_call:
                self._parse_block(final, out)
            else:
                self._scan_text(final, out)
            if (self._buf, self._pos, self._in_call) == before:
                break  # need more text
        return out

    def _scan_text(self, final: bool, out: list[Delta]) -> None:
        at = self._buf.find(OPEN)
        if at >= 0:
            self._emit_content(self._buf[:at], out)
            self._buf, self._in_call = self._buf[at + len(OPEN) :], True
            return
        keep = 0 if final else _partial_suffix(self._buf, OPEN)
        self._emit_content(self._buf[: len(self._buf) - keep], out)
        self._buf = self._buf[len(self._buf) - keep :]

    def _parse_block(self, final: bool, out: list[Delta]) -> None:
        """Consume JSON values inside a block (a list of calls, or call objects), then CLOSE.

        The block's raw text stays in `_buf` (parsed up to `_pos`) until CLOSE, so a block that
        turns out not to be a tool call can be handed back verbatim as content.
        """
        text = self._buf
        i = _skip_ws(text, self._pos)
        if i == len(text):
            return self._incomplete(final, out)
        if text.startswith(CLOSE, i):
            self._buf, self._pos, self._in_call = text[i + len(CLOSE) :], 0, False
            return
        if CLOSE.startswith(text[i:]) and not final:
            return  # maybe a CLOSE arriving
        if text[i] in ",[]":  # the list form's brackets and separators
            self._pos = i + 1
            return
        if text[i] != "{":
            return self._fail(out)
        try:
            obj, end = _JSON.raw_decode(text, i)
        except ValueError:
            return self._incomplete(final, out) if _json_prefix(text[i:]) else self._fail(out)
        call = _as_call(obj)
        if call is None or (self.names is not None and call.name not in self.names):
            return self._fail(out)
        self._pos = end
        if self.parallel or not self.calls:
            self.calls.append(call)
            index = len(self.calls) - 1
            out.append(CallDelta(index, "", id=call.id, name=call.name))
            out.append(CallDelta(index, call.arguments))

    def _incomplete(self, final: bool, out: list[Delta]) -> None:
        if final:
            if self.calls:
                self._buf = ""  # a truncated trailing call (max_tokens hit): drop it
            else:
                self._fail(out)

    def _fail(self, out: list[Delta]) -> None:
        """Not a tool call after all: the block's text (with its tag) becomes content."""
        self._failed, self._in_call, self._pos = True, False, 0
        if self.calls:
            self._buf = ""  # keep the calls we have; drop the garbage after them
        else:
            self._buf = OPEN + self._buf

    def _emit_content(self, text: str, out: list[Delta]) -> None:
        if not text:
            return
        if self.calls and not text.strip():
            return  # whitespace between/after calls is formatting, not content
        self.content += text
        if out and isinstance(out[-1], ContentDelta):
            out[-1].text += text
        else:
            out.append(ContentDelta(text))


def _as_call(obj: object) -> ParsedCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall("call_" + secrets.token_hex(12), name, json.dumps(args, ensure_ascii=False))


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _json_prefix(text: str) -> bool:
    """Whether `text` can still become valid JSON (vs. is already broken)."""
    try:
        partial_json_parser.loads(text)
        return True
    except Exception:  # noqa: BLE001 - MalformedJSON, but also IndexError/AssertionError on some broken texts
        return False


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
