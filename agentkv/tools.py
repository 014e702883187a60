"""Python functions as model tools: `@tool` derives the JSON schema, a registry runs the calls.

The schema comes from the type hints (through a msgspec Struct built from the signature, so every
type msgspec understands works: Literal, Enum, dataclasses, TypedDict, nested Structs, `X | None`)
and the descriptions from the docstring (Google `Args:`, Sphinx `:param x:` or NumPy `Parameters`).
The same Struct validates the model's arguments before the function runs: a small model that sends
`"3"` for an int still works, one that forgets a required argument gets an error it can read.

A tool that raises never crashes the agent loop: its exception becomes the tool message's content
(`ToolResult.is_error`), which is what the model sees and can recover from.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import re
import time
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, overload

import msgspec

__all__ = ["Tool", "ToolCall", "ToolRegistry", "ToolResult", "ToolArgumentsError", "tool"]


@dataclass(frozen=True)
class ToolCall:
    """A model's request to run one tool: `arguments` is the JSON text exactly as the model sent it."""

    id: str
    name: str
    arguments: str = "{}"

    @property
    def args(self) -> dict[str, Any]:
        """The arguments decoded; `{}` for an empty string. Raises ToolArgumentsError if not a JSON object."""
        return _decode_arguments(self.name, self.arguments)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolResult:
    """What one call produced; `content` is the text sent back to the model as the tool message."""

    call: ToolCall
    content: str
    is_error: bool = False
    value: Any = None  # the function's return value (None on error)
    elapsed_s: float = 0.0

    def to_message(self) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": self.call.id, "content": self.content}


class ToolArgumentsError(ValueError):
    """The model's arguments are not valid for the tool (not JSON, wrong types, missing fields)."""


@dataclass(frozen=True, eq=False)
class Tool:
    """A callable plus its OpenAI function schema. Calling the Tool calls the function unchanged."""

    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict[str, Any]
    args_type: type[msgspec.Struct] = field(repr=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    @property
    def spec(self) -> dict[str, Any]:
        """The entry for a request's `tools` list."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def bind(self, arguments: str | dict[str, Any]) -> dict[str, Any]:
        """Validate the model's arguments against the signature; returns keyword arguments."""
        raw = _decode_arguments(self.name, arguments) if isinstance(arguments, str) else arguments
        try:
            parsed = msgspec.convert(raw, self.args_type, strict=False)
        except msgspec.ValidationError as exc:
            raise ToolArgumentsError(f"invalid arguments for tool {self.name!r}: {exc}") from None
        return {name: getattr(parsed, name) for name in self.args_type.__struct_fields__}


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...
@overload
def tool(*, name: str | None = None, description: str | None = None) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(fn: Callable[..., Any] | None = None, /, *, name: str | None = None, description: str | None = None):
    """Make a function a tool: `@tool` or `@tool(name=..., description=...)`.

    Parameters must be named (no *args/**kwargs); an unannotated one accepts any JSON value.
    """

    def wrap(f: Callable[..., Any]) -> Tool:
        return _build(f, name, description)

    return wrap(fn) if fn is not None else wrap


def as_tool(obj: Tool | Callable[..., Any]) -> Tool:
    return obj if isinstance(obj, Tool) else tool(obj)


class ToolRegistry:
    """Tools by name, and the two ways to run a turn's calls concurrently (threads or asyncio)."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, obj: Tool | Callable[..., Any]) -> Tool:
        t = as_tool(obj)
        if t.name in self._tools and self._tools[t.name].fn is not t.fn:
            raise ValueError(f"two different tools are named {t.name!r}: rename one with @tool(name=...)")
        self._tools[t.name] = t
        return t

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec for t in self._tools.values()]

    def run(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run calls concurrently, one thread each (async tools get their own event loop there)."""
        if len(calls) <= 1:
            return [self._run_one_sync(c) for c in calls]
        with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="agentkv-tool") as pool:
            return list(pool.map(self._run_one_sync, calls))

    async def arun(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run calls concurrently on the running loop; sync tools go to worker threads."""
        return list(await asyncio.gather(*(self._run_one_async(c) for c in calls)))

    # -- one call ---------------------------------------------------------------------
    def _prepare(self, call: ToolCall) -> tuple[Tool, dict[str, Any]]:
        t = self._tools.get(call.name)
        if t is None:
            known = ", ".join(sorted(self._tools)) or "none"
            raise ToolArgumentsError(f"unknown tool {call.name!r} (available: {known})")
        return t, t.bind(call.arguments)

    def _run_one_sync(self, call: ToolCall) -> ToolResult:
        start = time.perf_counter()
        try:
            t, kwargs = self._prepare(call)
            value = t.fn(**kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_await(value))
        except Exception as exc:  # noqa: BLE001 - any tool failure is reported to the model
            return _error(call, exc, time.perf_counter() - start)
        return _success(call, value, time.perf_counter() - start)

    async def _run_one_async(self, call: ToolCall) -> ToolResult:
        start = time.perf_counter()
        try:
            t, kwargs = self._prepare(call)
            if t.is_async:
                value = await t.fn(**kwargs)
            else:
                value = await asyncio.to_thread(t.fn, **kwargs)
                if inspect.isawaitable(value):
                    value = await value
        except Exception as exc:  # noqa: BLE001
            return _error(call, exc, time.perf_counter() - start)
        return _success(call, value, time.perf_counter() - start)


def format_tool_output(value: Any) -> str:
    """Tool output as message text: strings unchanged, everything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        return json.dumps(value, default=str, ensure_ascii=False)


# ------------------------------------------------------------------------------------- internals


async def _await(value: Awaitable[Any]) -> Any:
    return await value


def _success(call: ToolCall, value: Any, elapsed: float) -> ToolResult:
    return ToolResult(call, format_tool_output(value), is_error=False, value=value, elapsed_s=elapsed)


def _error(call: ToolCall, exc: Exception, elapsed: float) -> ToolResult:
    text = str(exc) if isinstance(exc, ToolArgumentsError) else f"{type(exc).__name__}: {exc}"
    return ToolResult(call, f"Error: {text}", is_error=True, elapsed_s=elapsed)


def _decode_arguments(name: str, arguments: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError as exc:
        raise ToolArgumentsError(f"arguments for tool {name!r} are not valid JSON ({exc}): {arguments[:200]!r}") from None
    if not isinstance(value, dict):
        raise ToolArgumentsError(f"arguments for tool {name!r} must be a JSON object, got {type(value).__name__}")
    return value


_NO_DEFAULT = inspect.Parameter.empty


def _build(fn: Callable[..., Any], name: str | None, description: str | None) -> Tool:
    if not callable(fn):
        raise TypeError(f"@tool needs a function, got {fn!r}")
    tool_name = name or getattr(fn, "__name__", None)
    if not tool_name or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tool_name):
        raise ValueError(f"tool name {tool_name!r} must be 1-64 letters, digits, '_' or '-': pass @tool(name=...)")
    summary, param_docs = parse_docstring(inspect.getdoc(fn) or "")
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:  # an annotation that does not resolve: say which function
        raise TypeError(f"cannot resolve the type hints of tool {tool_name!r}: {exc}") from exc
    fields: list[tuple[Any, ...]] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"tool {tool_name!r}: *{p.name} is not supported; tools take named parameters only")
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"tool {tool_name!r}: positional-only parameter {p.name!r} cannot be passed by name")
        hint = hints.get(p.name, Any)
        if p.default is _NO_DEFAULT:
            fields.append((p.name, hint))
        elif isinstance(p.default, (list, dict, set)) and p.default:
            fields.append((p.name, hint, msgspec.field(default_factory=lambda d=p.default: copy.copy(d))))
        else:
            fields.append((p.name, hint, p.default))
    args_type = msgspec.defstruct(f"{tool_name}_arguments", fields, kw_only=True)
    parameters = _parameters_schema(tool_name, args_type, param_docs)
    return Tool(fn=fn, name=tool_name, description=description or summary or tool_name, parameters=parameters, args_type=args_type)


def _parameters_schema(tool_name: str, args_type: type[msgspec.Struct], docs: dict[str, str]) -> dict[str, Any]:
    try:
        schema = msgspec.json.schema(args_type)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tool {tool_name!r}: a parameter type has no JSON schema ({exc})") from exc
    defs = schema.pop("$defs", {})
    root = dict(defs.pop(args_type.__name__))
    root.pop("title", None)
    root.setdefault("properties", {})
    root.setdefault("required", [])
    for pname, prop in root["properties"].items():
        if pname in docs:
            prop["description"] = docs[pname]
    if defs:  # nested types keep their `#/$defs/...` references, now relative to this root
        root["$defs"] = defs
    return root


_SECTION = re.compile(
    r"^(args|arguments|parameters|params|keyword args|returns?|yields?|raises|examples?|notes?|see also|attributes)\s*:?$",
    re.IGNORECASE,
)
_PARAM_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args"}
_GOOGLE_PARAM = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")  # name (type): text
_NUMPY_PARAM = re.compile(r"^(\w+)\s+:\s*.*$|^(\w+)$")  # name : type
_SPHINX_PARAM = re.compile(r"^:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")  # :param type name: text


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google, Sphinx or NumPy style docstring."""
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    description: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None  # None: still in the description
    numpy = False
    base_indent: int | None = None
    current: str | None = None
    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        indent = len(line) - len(line.lstrip())
        underlined = i + 1 < len(lines) and lines[i + 1].strip() and set(lines[i + 1].strip()) == {"-"}
        header = _SECTION.match(stripped) if indent == 0 else None
        if header and (stripped.endswith(":") or underlined):
            section, numpy, base_indent, current = header.group(1).lower(), bool(underlined), None, None
            i += 2 if underlined else 1
            continue
        sphinx = _SPHINX_PARAM.match(stripped)
        if sphinx:
            section, current = "sphinx", sphinx.group(1)
            params[current] = sphinx.group(2).strip()
        elif stripped.startswith(":"):  # :returns:, :raises: ...
            section, current = "sphinx", None
        elif section is None:
            description.append(stripped)
        elif stripped and section in _PARAM_SECTIONS:
            if base_indent is None:
                base_indent = indent
            if indent > base_indent and current:
                params[current] = f"{params[current]} {stripped}".strip()
            else:
                match = _NUMPY_PARAM.match(stripped) if numpy else _GOOGLE_PARAM.match(stripped)
                current = (match.group(1) or match.group(2)) if match else None
                if current:
                    params[current] = "" if numpy else match.group(2).strip()
        elif stripped and section == "sphinx" and current and indent > 0:
            params[current] = f"{params[current]} {stripped}".strip()
        i += 1
    paragraphs = " ".join(line or "\n\n" for line in description).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip()), params
