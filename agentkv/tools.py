"""Python functions as model tools: `@tool` derives the JSON schema, a registry runs the calls.

The schema comes from the type hints (through a msgspec Struct, which also validates and coerces the
model's arguments) and the descriptions from the docstring (docstring_parser). A tool that raises
never crashes the agent loop: the model reads the error as the tool's output and can recover.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import json
import re
import sys
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docstring_parser
import msgspec

__all__ = ["Tool", "ToolArgumentsError", "ToolCall", "ToolRegistry", "ToolResult", "tool"]


class ToolArgumentsError(ValueError):
    """The model's arguments are not valid for the tool (not JSON, wrong types, missing fields)."""


@dataclass(frozen=True)
class ToolCall:
    """A model's request to run one tool: `arguments` is the JSON text exactly as the model sent it."""

    id: str
    name: str
    arguments: str = "{}"

    @property
    def args(self) -> dict[str, Any]:
        try:
            value = json.loads(self.arguments) if self.arguments.strip() else {}
        except ValueError as exc:
            raise ToolArgumentsError(f"arguments for tool {self.name!r} are not valid JSON ({exc}): {self.arguments[:200]!r}") from None
        if not isinstance(value, dict):
            raise ToolArgumentsError(f"arguments for tool {self.name!r} must be a JSON object, got {type(value).__name__}")
        return value

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


@dataclass(frozen=True, eq=False)
class Tool:
    """A callable plus its OpenAI function schema. Calling the Tool calls the function unchanged."""

    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict[str, Any]
    args_type: type[msgspec.Struct]
    method: bool = dataclasses.field(default=False, init=False, repr=False)  # `@tool` on a def in a class body

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __set_name__(self, owner: type, name: str) -> None:
        if inspect.isfunction(self.fn) and self.fn.__qualname__ == f"{owner.__qualname__}.{self.fn.__name__}":
            object.__setattr__(self, "method", True)  # frozen: set once, while the class is made

    def __get__(self, instance: Any, owner: type | None = None) -> Tool:
        """`@tool` on a method, read from an instance: the tool bound to it (no `self` parameter). A tool
        defined elsewhere and kept as a class attribute is returned as it is."""
        if instance is None or not self.method:
            return self
        return tool(self.fn.__get__(instance, owner), name=self.name, description=self.description)

    @property
    def spec(self) -> dict[str, Any]:
        """The entry for a request's `tools` list."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def bind(self, arguments: str) -> dict[str, Any]:
        """The model's arguments validated against the signature, as keyword arguments."""
        try:
            parsed = msgspec.convert(ToolCall("", self.name, arguments).args, self.args_type, strict=False)
        except msgspec.ValidationError as exc:
            raise ToolArgumentsError(f"invalid arguments for tool {self.name!r}: {exc}") from None
        return {name: getattr(parsed, name) for name in self.args_type.__struct_fields__}


def tool(fn: Callable[..., Any] | None = None, /, *, name: str | None = None, description: str | None = None) -> Any:
    """Make a function a tool: `@tool` or `@tool(name=..., description=...)`. Parameters must be
    nameable (no *args, **kwargs or positional-only); an unannotated one accepts any JSON value.
    Any callable works (a method, a functools.partial, an object with __call__); a Tool is renamed."""
    if fn is None:
        return lambda f: tool(f, name=name, description=description)
    if isinstance(fn, Tool):
        return dataclasses.replace(fn, name=_checked_name(name or fn.name), description=description or fn.description)
    if isinstance(fn, Mapping) or not callable(fn):
        raise TypeError(f"a tool must be a function the SDK can run, not {type(fn).__name__} (a JSON spec goes to "
                        "client.chat(tools=[...]), which does not run tools)")  # fmt: skip
    name = _checked_name(name or getattr(fn, "__name__", ""))
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    hints, namespace = _hints(fn)
    fields = [_field(name, p, hints, namespace) for p in inspect.signature(fn).parameters.values()]
    args_type = msgspec.defstruct(f"{name}_arguments", fields, kw_only=True)
    try:
        defs = msgspec.json.schema(args_type).get("$defs", {})
    except (TypeError, NameError, msgspec.EncodeError):
        raise _unsupported_parameter(name, fields) from None
    schema = {k: v for k, v in defs.pop(args_type.__name__).items() if k != "title"}
    for param in doc.params:
        if param.arg_name in schema["properties"] and param.description:
            schema["properties"][param.arg_name]["description"] = _prose(param.description)
    if defs:  # nested types keep their `#/$defs/...` references, now relative to this root
        schema["$defs"] = defs
    return Tool(fn, name, description or _prose(doc.description or "") or name, schema, args_type)


def _checked_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ValueError(f"tool name {name!r} must be 1-64 letters, digits, '_' or '-': pass @tool(name=...)")
    return name


def _hints(fn: Callable[..., Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The function's type hints as typing.get_type_hints resolves them (following functools.wraps),
    and the namespace to resolve one by one when some annotation cannot be (a type local to a function,
    perhaps only the return type's)."""
    target = getattr(fn, "func", fn)  # a functools.partial
    target = getattr(target, "__func__", target)  # a bound method
    module = sys.modules.get(getattr(target, "__module__", None) or type(target).__module__)
    if isinstance(target, type):
        target = target.__init__  # a class (a dataclass, a Struct): its constructor's parameters
    elif not inspect.isfunction(inspect.unwrap(target)):
        target = type(target).__call__  # a callable object
    namespace = getattr(inspect.unwrap(target), "__globals__", None) or (vars(module) if module else {})
    try:
        return typing.get_type_hints(target, include_extras=True), namespace
    except Exception:  # noqa: BLE001 - resolved per parameter instead, with an error naming the one that fails
        return {}, namespace


def _field(tool_name: str, p: inspect.Parameter, hints: dict[str, Any], namespace: dict[str, Any]) -> tuple[Any, ...]:
    """One parameter as a msgspec field: (name, type[, default]). A `None` default makes the type
    optional, so the model may send null for it."""
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
        kind = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "positional-only ")
        raise TypeError(f"tool {tool_name!r}: {kind}{p.name} is not supported; tools take named parameters only")
    hint = hints.get(p.name, Any if p.annotation is p.empty else p.annotation)
    if isinstance(hint, str):
        try:
            hint = eval(hint, namespace)  # noqa: S307 - the function's own annotation, as typing.get_type_hints does
        except NameError as exc:
            raise TypeError(f"tool {tool_name!r}: parameter {p.name!r} is annotated {hint!r}, and {exc.name!r} is not "
                            "defined in its module (define the type at module level)") from None  # fmt: skip
    if p.default is p.empty:
        return (p.name, hint)
    if p.default is None and hint is not Any:
        hint = typing.Optional[hint]  # noqa: UP007 - hint may be a string-free typing form
    if isinstance(p.default, (list, dict, set)):
        return (p.name, hint, msgspec.field(default_factory=lambda d=p.default: copy.copy(d)))
    return (p.name, hint, p.default)


def _unsupported_parameter(tool_name: str, fields: list[tuple[Any, ...]]) -> TypeError:
    """Which parameter has no JSON schema (a type msgspec does not know, or a default JSON cannot hold)."""
    for field in fields:
        single = msgspec.defstruct("probe", [field], kw_only=True)
        try:
            msgspec.json.schema(single)
        except (TypeError, NameError, msgspec.EncodeError):
            hint = getattr(field[1], "__name__", repr(field[1]))
            return TypeError(f"tool {tool_name!r}: parameter {field[0]!r} ({hint}) has no JSON schema: use a JSON type, a "
                             "dataclass, a TypedDict, an Enum or a msgspec Struct, with a JSON default")  # fmt: skip
    return TypeError(f"tool {tool_name!r}: its parameters have no JSON schema")


def _prose(text: str) -> str:
    """Docstring text with its line breaks undone, paragraphs kept."""
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n") if p.strip())


class ToolRegistry(dict[str, Tool]):
    """Tools by name, and the way to run a turn's calls concurrently."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        super().__init__()
        for t in tools:
            self.add(t)

    def add(self, obj: Tool | Callable[..., Any]) -> Tool:
        t = obj if isinstance(obj, Tool) else tool(obj)
        if self.get(t.name, t).fn != t.fn:  # `!=`: a method bound twice to one instance is one tool
            raise ValueError(f"two different tools are named {t.name!r}: rename one with @tool(name=...)")
        self[t.name] = t
        return t

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec for t in self.values()]

    def run(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """`arun` on an event loop of its own, in a thread of its own (so it also works under a running loop)."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="agentkv-tools")
        try:
            return pool.submit(asyncio.run, self.arun(calls)).result()
        finally:  # Ctrl-C during a slow tool reaches the caller now, not when the tool returns
            pool.shutdown(wait=False, cancel_futures=True)

    async def arun(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run calls concurrently on the running loop; sync tools run in worker threads."""

        async def one(call: ToolCall) -> ToolResult:
            start = time.perf_counter()
            try:
                is_async = call.name in self and inspect.iscoroutinefunction(self[call.name].fn)
                value = self._call(call) if is_async else await asyncio.to_thread(self._call, call)
                return _outcome(call, start, await value if inspect.isawaitable(value) else value)
            except Exception as exc:  # noqa: BLE001 - any tool failure is reported to the model
                return _outcome(call, start, error=exc)

        return list(await asyncio.gather(*map(one, calls)))

    def _call(self, call: ToolCall) -> Any:
        """The tool's return value (a coroutine for an async tool)."""
        if call.name not in self:
            raise ToolArgumentsError(f"unknown tool {call.name!r} (available: {', '.join(sorted(self)) or 'none'})")
        t = self[call.name]
        return t.fn(**t.bind(call.arguments))


def _outcome(call: ToolCall, start: float, value: Any = None, error: Exception | None = None) -> ToolResult:
    elapsed = time.perf_counter() - start
    if error is not None:
        text = str(error) if isinstance(error, ToolArgumentsError) else f"{type(error).__name__}: {error}"
        return ToolResult(call, f"Error: {text}", is_error=True, elapsed_s=elapsed)
    try:
        text = value if isinstance(value, str) else msgspec.json.encode(value, enc_hook=_jsonable).decode()
    except Exception:  # noqa: BLE001 - what JSON cannot hold (tuple keys, a cycle): the model reads its repr
        text = repr(value)
    return ToolResult(call, text, value=value, elapsed_s=elapsed)


def _jsonable(value: Any) -> Any:
    """A return value msgspec does not know: a pydantic model as its JSON data, anything else as str()."""
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else str(value)
