"""What a request may say: OpenAI's bodies, checked at the edge with vLLM's limits and messages.

Every parameter is checked before anything reaches the engine, so a bad value is the client's
400 naming its field, never a failure inside a decoding step shared with other clients: floats
must be finite, integers strict (``true`` is not the token id 1), seeds 64-bit, strings valid
Unicode (a lone surrogate cannot be tokenized or sent back as UTF-8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from graft.serve.errors import ApiError
from graft.serve.sampling import SEED_RANGE, Sampling

__all__ = ["ChatBody", "CompletionBody", "Limits", "LoadBody", "UnloadBody", "chat_messages", "prompt_ids", "sampling_for"]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Args:
        max_body_bytes: Largest request body (413 beyond).
        max_prompt_tokens: Longest prompt.
        max_tokens: Largest ``max_tokens``.
        max_n: Most choices (``n``) per request.
        max_request_tokens: Most tokens one request may hold in the cache, prompt plus
            ``max_tokens`` (``None``: the model's context).
        max_stop: Most stop strings, each at most ``max_stop_chars`` characters.
    """

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048
    max_n: int = 8
    max_request_tokens: int | None = None
    max_stop: int = 16
    max_stop_chars: int = 256

    def __post_init__(self) -> None:
        for field in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "max_n", "max_stop", "max_stop_chars"):
            if getattr(self, field) < 1:
                raise ValueError(f"Limits.{field} must be >= 1, got {getattr(self, field)}")
        if self.max_request_tokens is not None and self.max_request_tokens < 2:
            raise ValueError(f"Limits.max_request_tokens must be >= 2 (or None), got {self.max_request_tokens}")


Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]


MAX_DEPTH = 16  # JSON nesting a request may use (the deepest valid one, a chat content part, is 4)


def _bad_text(value: Any) -> str | None:
    """Why ``value`` cannot be served (a lone surrogate in a string, or nesting past ``MAX_DEPTH``), or ``None``.

    Iterative: a recursive walk would let a deeply nested body raise RecursionError (a 500).
    """
    todo = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                return f"contains a lone surrogate ({item[err.start]!r} at position {err.start}) that is not valid Unicode"
        elif isinstance(item, (list, dict)):
            if depth >= MAX_DEPTH:
                return f"is nested more than {MAX_DEPTH} levels deep"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            todo.extend((child, depth + 1) for child in children)
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                why = _bad_text(value)
                if why:
                    raise PydanticCustomError("invalid_text", why, {"param": str(key)})
        return data


class _Common(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: Seed | None = None
    logprobs: Any = None
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens tokens whatever the model says
    # Accepted at their neutral values only (vLLM's ranges); anything else would change the answer unasked.
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)


class CompletionBody(_Common):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, value: Any) -> Any:
        def ids(v: Any) -> bool:  # bool is an int subclass: [true, false] is not a list of token ids
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if isinstance(value, str) or (isinstance(value, list) and (
                all(isinstance(p, str) for p in value) or ids(value) or all(ids(p) for p in value))):
            return value
        raise PydanticCustomError("prompt_form", "must be a string, a list of strings, a list of token ids "
                                  "(integers) or a list of such lists", {"param": "prompt"})


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class LoadBody(_Body):
    lora_name: str
    lora_path: str


class UnloadBody(_Body):
    lora_name: str


def unsupported(body: _Common) -> None:
    """Refuse what would change the answer but is not implemented (a silent ignore would be a wrong answer)."""
    neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0, "repetition_penalty": 1.0}
    for field, value in neutral.items():
        if getattr(body, field) != value:
            raise ApiError(400, f"{field} is not supported (only {value})", param=field)
    if body.top_k not in (None, 0, -1):
        raise ApiError(400, "top_k is not supported (only 0 or -1: all tokens)", param="top_k")
    if body.logprobs not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported", param="logprobs")


def prompt_ids(tokenizer: Any, prompt: Any) -> list[list[int]]:
    """OpenAI's four prompt forms: a string, strings, token ids, lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    out = []
    vocab = len(tokenizer)
    for p in prompt:
        if isinstance(p, str):
            try:
                out.append(tokenizer(p, add_special_tokens=False)["input_ids"])
            except Exception as err:
                raise ApiError(400, f"the tokenizer cannot encode this prompt: {err}", param="prompt") from err
        else:
            if any(not 0 <= t < vocab for t in p):
                raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
            out.append(list(p))
    return out


def chat_messages(body: ChatBody) -> list[dict[str, str]]:
    messages = []
    for m in body.messages:
        if isinstance(m.content, list):
            if any(p.type != "text" for p in m.content):
                raise ApiError(400, "only text content parts are supported", param="messages")
            text = "".join(p.text or "" for p in m.content)
        else:
            text = m.content or ""
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return messages


def sampling_for(body: _Common, prompts: list[list[int]], limits: Limits, max_context: int, chat: bool,
                 fits: Any = None) -> Sampling:
    """The request's :class:`Sampling`, after every limit: prompt length, ``max_tokens``, ``n``, the
    per-request token budget and (``fits(span) -> bool``) the KV-cache budget."""
    unsupported(body)
    if body.n > limits.max_n or body.n * len(prompts) > limits.max_n * 4:
        raise ApiError(400, f"n must be <= {limits.max_n}", param="n")
    if body.max_tokens is not None and body.max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {body.max_tokens}; this server allows at most {limits.max_tokens}",
                       param="max_tokens")
    budget = min(limits.max_request_tokens or max_context, max_context)
    param = "messages" if chat else "prompt"
    longest_prompt = max(len(ids) for ids in prompts)
    for ids in prompts:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
    most = min(limits.max_prompt_tokens, budget - 1)
    if longest_prompt > most:
        raise ApiError(400, f"the prompt has {longest_prompt} tokens; this server allows at most {most}", param=param,
                       code="context_length_exceeded")
    if body.max_tokens is None:  # as much as the budget leaves (chat), or OpenAI's 16 (completions)
        max_tokens = min(limits.max_tokens, budget - longest_prompt) if chat else min(16, budget - longest_prompt)
    else:
        max_tokens = body.max_tokens
        if longest_prompt + max_tokens > budget:
            what = "the context" if budget == max_context else "the per-request token budget"
            raise ApiError(400, f"prompt ({longest_prompt}) + max_tokens ({max_tokens}) exceeds {what} ({budget})",
                           param="max_tokens", code="context_length_exceeded")
    if fits is not None and not fits(longest_prompt + max_tokens):
        raise ApiError(400, f"prompt ({longest_prompt}) + max_tokens ({max_tokens}) tokens do not fit the server's "
                            "key/value cache budget; ask for fewer tokens", param="max_tokens", code="kv_budget_exceeded")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stop):
        raise ApiError(400, f"at most {limits.max_stop} stop strings of at most {limits.max_stop_chars} characters",
                       param="stop")
    if any(not s for s in stop):
        raise ApiError(400, "stop strings must not be empty", param="stop")
    try:
        return Sampling.from_request(max_tokens, body.temperature, body.top_p, stop, body.seed, body.ignore_eos)
    except ValueError as err:
        raise ApiError(400, str(err)) from err
