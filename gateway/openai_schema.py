"""OpenAI wire format (the subset agentkv serves) as msgspec Structs.

Unknown request fields are ignored (msgspec's default), so clients that send newer or vendor
fields keep working. Response structs omit None fields the way OpenAI's own responses do.
The request limits are `Meta` constraints on the fields: msgspec enforces them while decoding
(a 400) and the OpenAPI document shows the same declarations, so the two cannot disagree.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from kvstore.wire import RouteStats

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_SESSION_ID_CHARS = 256

# -------------------------------------------------------------------------------------- limits



def _limits(description: str | None = None, **bounds: float) -> msgspec.Meta:
    """Bounds msgspec enforces and the OpenAPI document shows. Litestar skips a bound of 0 (falsy)
    when it copies them into the document, so those also travel as explicit schema extras."""
    names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    zeros = {names[k]: v for k, v in bounds.items() if k in names and v == 0}
    return msgspec.Meta(description=description, extra_json_schema={"extra": zeros} if zeros else None, **bounds)


Temperature = Annotated[float, _limits("Sampling temperature; 0 is greedy.", ge=0, le=2)]
TopP = Annotated[float, _limits(gt=0, le=1)]
TokenCount = Annotated[int, _limits("At most this many tokens are generated (capped by the context).", ge=1)]
OneChoice = Annotated[int, _limits("agentkv returns one choice per request: send n requests instead.", ge=1, le=1)]
# A string or up to 4. Litestar drops a union member's constraints from the document: shown on the field.
Stop = Annotated[str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None,
                 msgspec.Meta(extra_json_schema={"extra": {"max_items": MAX_STOP_STRINGS}})]  # fmt: skip
Seed = Annotated[int, _limits(ge=-(2**63), le=2**63 - 1)]
Penalty = Annotated[float, _limits("Subtracted from a token's logit once it is in the reply (presence) or per occurrence (frequency).",
                                   ge=-2, le=2)]  # fmt: skip
Bias = Annotated[float, _limits("Added to the token's logit: -100 bans it, 100 forces it.", ge=-100, le=100)]
TopK = Annotated[int, _limits("Sample from the k likeliest tokens; 0 or -1: all of them (vLLM's convention).", ge=-1)]
# Opaque text: anything but whitespace and control characters (gateway.sessions checks header and path ids with it too).
SESSION_ID_PATTERN = r"^[^\s\x00-\x1f\x7f-\x9f]+$"
SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SESSION_ID_CHARS, pattern=SESSION_ID_PATTERN,
                                        description="Any text without whitespace or control characters.")]  # fmt: skip
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
SessionTTL = Annotated[float, _limits("Seconds (Redis expiries are whole milliseconds).", ge=0.001)]

# ---------------------------------------------------------------------------------------- requests


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant's refusal part (read as its text)
    image_url: Any = None
    input_audio: Any = None


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; some clients send an object


class ToolCall(msgspec.Struct, kw_only=True):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # an assistant's refusal, sent back in the history: its text when content is null
    function_call: dict[str, Any] | None = None  # legacy: read only to refuse it (gateway.turn.refuse_unsupported)


class FunctionDefinition(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: str = "function"
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: str = "function"
    function: NamedFunction


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _GenerationRequest(msgspec.Struct, kw_only=True):
    """The fields chat and legacy completions share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: OneChoice | None = None
    stop: Stop = None
    seed: Seed | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    top_k: TopK | None = None  # vLLM's extension, honoured by both engines
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None  # token id (as a string, as JSON keys are) -> bias
    # agentkv extensions (send with the openai client's `extra_body`)
    session_id: SessionId | None = None
    session_ttl_s: SessionTTL | None = None


class ChatCompletionRequest(_GenerationRequest, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: TokenCount | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema (gateway/grammar.py)
    functions: list[Any] | None = None  # legacy: read only to refuse them (send tools and tool_choice)
    function_call: Any = None
    modalities: list[str] | None = None  # read only to refuse an output other than text
    audio: Any = None
    web_search_options: Any = None
    top_logprobs: int | None = None  # read only to refuse it (logprobs are not served on chat)


COMPLETION_MAX_TOKENS = 16  # OpenAI's default for legacy completions (and vLLM's), also when null is sent


class CompletionRequest(_GenerationRequest, kw_only=True):
    prompt: str | list[Any]  # a string, token ids, or a one-element list of either
    max_tokens: TokenCount | None = COMPLETION_MAX_TOKENS
    echo: bool | None = None
    logprobs: Annotated[int, _limits(ge=0, le=5)] | None = None
    suffix: str | None = None  # read only to refuse them
    best_of: int | None = None


# --------------------------------------------------------------------------------------- responses


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    agentkv: RouteStats | None = None


class ToolCallFunction(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int | None = None  # only in stream deltas
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunction | None = None


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    refusal: str | None = None


class Choice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class _Response(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str


class ChatCompletion(_Response, kw_only=True):
    choices: list[Choice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response, kw_only=True):
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(_Response, kw_only=True):
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None


class Model(msgspec.Struct, kw_only=True):
    id: str
    created: int
    owned_by: str = "agentkv"
    object: str = "model"
    max_model_len: int | None = None


class ModelList(msgspec.Struct, kw_only=True):
    data: list[Model]
    object: str = "list"


# ------------------------------------------------------------------------------------------ errors


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every error, whatever its status: OpenAI's envelope (gateway.errors builds it)."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------- sessions


class SessionCreate(msgspec.Struct, kw_only=True):
    id: SessionId | None = None  # default: a fresh random id
    ttl_s: SessionTTL | None = None


class SessionOut(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    created_at: float
    last_used_at: float
    expires_at: float
    ttl_s: float
    turns: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    transferred_tokens: int
    transferred_blocks: int
    node: str | None = None  # decode node of the last turn (where the session's blocks are pinned)
    object: str = "session"


class SessionList(msgspec.Struct, kw_only=True):
    data: list[SessionOut]
    object: str = "list"


class SessionDeleted(msgspec.Struct, kw_only=True):
    id: str
    deleted: bool = True
    unpinned_nodes: list[str] = msgspec.field(default_factory=list)
    object: str = "session.deleted"
