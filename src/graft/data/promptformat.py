"""The prompt format an adapter was trained with, saved beside it and used again at inference.

An adapter only knows the prompts it was trained on. ``graft train`` writes ``graft_format.json``
next to ``adapter_config.json`` (peft reads only the files it knows, so the directory still loads
in peft): the data format, the prompt template, whether the tokenizer's chat template rendered the
rows (and which template, verbatim), the system message, and the BOS / EOS tokens tokenisation
added. ``graft generate``, ``graft eval`` and ``graft serve`` render a query exactly as training
rendered the prompt part of a row, unless told otherwise (``--chat-template`` /
``--no-chat-template`` or ``--template`` win, with one warning when they go against the file).

The prompt a query gets is the prompt part of a training row: plain formats render
``[BOS] + template(fields)`` (tokenised without special tokens, BOS added when the tokenizer adds
one, as :func:`graft.data.tokenize` does); chat-rendered ones the chat template up to and including
the assistant header (``add_generation_prompt=True``), as :mod:`graft.data.chat` splits a row.

Example:
    >>> fmt = promptformat.read(adapter_dir)               # None when the adapter has no file
    >>> fmt.prompt_text(tok, "Name a prime number.")       # the Alpaca preamble around it
    >>> fmt.prompt_ids(tok, "Name a prime number.")        # exactly the ids training put there
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.data.formats import _CHAT_DEFAULTS, _DEFAULTS, CLASSIFICATION_FORMATS, FORMATS
from graft.data.templates import ALPACA_PROMPT_NO_INPUT, template_fields

__all__ = ["FILENAME", "PromptFormat", "choose", "from_training", "read", "write"]

#: The file, next to ``adapter_config.json``.
FILENAME = "graft_format.json"
VERSION = 1
# The field a single free-text prompt fills, per format (alpaca: the instruction, no input).
_MAIN_FIELD = {"alpaca": "instruction", "completion": "prompt", "cot": "question", "text": "text",
               "classification": "text", "table": "text", "chat": "content"}


@dataclass(frozen=True)
class PromptFormat:
    """How training rendered a row's prompt.

    Attributes:
        format: The data format (:data:`graft.data.FORMATS`): alpaca, completion, cot, chat, text,
            classification or table.
        chat_template: The rows went through the tokenizer's chat template (``chat`` rows always do).
        template: The prompt template given to training (None: the format's default).
        response_template: The response template given to training (None: the format's default).
        fields: ``{format field: column}`` renames training used.
        system: The system message each rendered conversation started with (None: none was given,
            so the chat template's own default applies).
        chat_template_text: The tokenizer's chat template, verbatim, when ``chat_template``.
        bos: The BOS token plain rows start with (None: the tokenizer adds none).
        eos: The token that ends every trained response (plain rows: appended after the response;
            chat rows: the response is cut after it).
        train_on_prompt: Whether the prompt tokens were trained too.
        max_length: Tokens per training example (the prompt was cut from the left beyond it).
        version: Of this file's layout.
    """

    format: str
    chat_template: bool
    template: str | None = None
    response_template: str | None = None
    fields: Mapping[str, str] | None = None
    system: str | None = None
    chat_template_text: str | None = None
    bos: str | None = None
    eos: str | None = None
    train_on_prompt: bool = False
    max_length: int | None = None
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"PromptFormat.format={self.format!r} is not one of {', '.join(FORMATS)}")
        if not isinstance(self.chat_template, bool):
            raise ValueError(f"PromptFormat.chat_template={self.chat_template!r} must be true or false")  # noqa: TRY004 (read from a file)
        for name in ("template", "response_template", "system", "chat_template_text", "bos", "eos"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"PromptFormat.{name}={value!r} must be a string or null")
        if self.template is not None:
            template_fields(self.template)  # a malformed template fails on reading, not on the first query
        if self.version > VERSION:
            raise ValueError(f"{FILENAME} version {self.version} is newer than this graft reads ({VERSION}); "
                             "upgrade graft")

    @property
    def chat(self) -> bool:
        """Whether a query is rendered through the chat template."""
        return self.chat_template or self.format == "chat"

    @property
    def generative(self) -> bool:
        """Whether the adapter answers in text (classification formats train a class head)."""
        return self.format not in CLASSIFICATION_FORMATS

    def describe(self) -> str:
        """One line, e.g. ``alpaca, no chat template, Alpaca preamble, EOS '<|im_end|>'``."""
        how = "chat template" if self.chat else "no chat template"
        template = repr(self.template) if self.template is not None else "the format's default template"
        parts = [self.format, how, template]
        if self.system is not None:
            parts.append(f"system {self.system!r}")
        if self.eos:
            parts.append(f"EOS {self.eos!r}")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = FILENAME) -> PromptFormat:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        if "format" not in data or "chat_template" not in data:
            raise ValueError(f"{where}: needs 'format' and 'chat_template'")
        return cls(**data)

    # ---- rendering a query ------------------------------------------------------------------

    def query_template(self) -> str:
        """The template a single query fills: the training prompt template, or the format's default."""
        if self.template is not None:
            return self.template
        if self.format in ("chat", "text", *CLASSIFICATION_FORMATS):
            return "{" + _MAIN_FIELD[self.format] + "}"
        default = (_CHAT_DEFAULTS if self.chat else _DEFAULTS)[self.format][0]
        if default is None:  # alpaca: Stanford's no-input prompt (a free-text query has no input)
            return "{instruction}" if self.chat else ALPACA_PROMPT_NO_INPUT
        return default

    def fill(self, text: str) -> str:
        """The training prompt around one free-text query (the user message, when chat)."""
        template = self.query_template()
        names = list(dict.fromkeys(template_fields(template)))
        if len(names) > 1:
            raise ValueError(f"the adapter's prompt template {template!r} has fields {names}; one prompt fills "
                             "only one: give --template with one field, or --no-chat-template for raw text")
        return template.format_map({names[0]: text}) if names else template

    def prompt_text(self, tokenizer: Any, text: str) -> str:
        """The full prompt string for a free-text query, as training rendered a row's prompt."""
        body = self.fill(text)
        if not self.chat:
            return body
        return render_chat(tokenizer, [{"role": "user", "content": body}], self.system)

    def prompt_ids(self, tokenizer: Any, text: str) -> list[int]:
        """The token ids of :meth:`prompt_text`, exactly as tokenisation built a row's prompt."""
        prompt = self.prompt_text(tokenizer, text)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return ids if self.chat else _bos(tokenizer) + ids

    def messages_ids(self, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
        """A chat request's ids, rendered the way this adapter was trained.

        A chat-trained adapter gets the conversation through the chat template (the saved system
        message first when the request has none). A plain-trained one takes exactly one user
        message (training saw one prompt per row, no turns), rendered with the training template.

        Raises:
            ValueError: Turns or a system message for an adapter trained without a chat template.
        """
        if self.chat:
            has_system = any(m["role"] == "system" for m in messages)
            text = render_chat(tokenizer, messages, None if has_system else self.system)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(messages) != 1 or messages[0]["role"] != "user":
            roles = [m["role"] for m in messages]
            raise ValueError(f"this adapter was trained without a chat template ({self.format} prompts, one per "
                             f"row), so a chat request must hold exactly one user message, not {roles}; or send "
                             "raw text to /v1/completions")
        return self.prompt_ids(tokenizer, messages[0]["content"])


def render_chat(tokenizer: Any, messages: list[dict[str, str]], system: str | None) -> str:
    """The chat template up to the assistant header, with ``system`` first when given."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; render without one "
                         "(--no-chat-template)")
    head = [{"role": "system", "content": system}] if system is not None else []
    return tokenizer.apply_chat_template(head + list(messages), tokenize=False, add_generation_prompt=True)


def _bos(tokenizer: Any) -> list[int]:
    from graft.data.tokenize import _bos as bos

    return bos(tokenizer)


def from_training(tokenizer: Any, format: str, *, chat_template: bool, template: str | None = None,
                  response_template: str | None = None, fields: Mapping[str, str] | None = None,
                  system: str | None = None, train_on_prompt: bool = False,
                  max_length: int | None = None) -> PromptFormat:
    """The format of a training run, with the tokenizer's facts (BOS, EOS, chat template) filled in."""
    chat = chat_template or format == "chat"
    bos = _bos(tokenizer)
    return PromptFormat(
        format=format, chat_template=chat, template=template, response_template=response_template,
        fields=dict(fields) if fields else None, system=system,
        chat_template_text=getattr(tokenizer, "chat_template", None) if chat else None,
        bos=tokenizer.convert_ids_to_tokens(bos[0]) if bos and not chat else None,
        eos=tokenizer.eos_token, train_on_prompt=train_on_prompt, max_length=max_length,
    )


def write(directory: str | os.PathLike[str], fmt: PromptFormat) -> Path:
    """Write ``graft_format.json`` into ``directory`` atomically; return its path."""
    from graft.io import atomic_file_write

    path = Path(directory) / FILENAME
    atomic_file_write(path, json.dumps(fmt.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def read(directory: str | os.PathLike[str] | None) -> PromptFormat | None:
    """The saved format of an adapter directory, or None when it has none (or no directory is given)."""
    if directory is None:
        return None
    path = Path(directory) / FILENAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")  # noqa: TRY004 (a user's file)
    return PromptFormat.from_json(data, str(path))


_CACHE: dict[Path, tuple[int, PromptFormat | None]] = {}


def read_cached(directory: str | os.PathLike[str] | None) -> PromptFormat | None:
    """:func:`read`, re-reading the file only when it changed (a server asks on every request)."""
    if directory is None:
        return None
    path = Path(directory) / FILENAME
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    hit = _CACHE.get(path)
    if hit is None or hit[0] != stamp:
        hit = _CACHE[path] = (stamp, read(directory))
    return hit[1]


def choose(saved: PromptFormat | None, tokenizer: Any, *, chat: bool | None = None,
           template: str | None = None) -> tuple[PromptFormat, list[str]]:
    """The format to query with: the saved one, with the user's explicit choices on top.

    Args:
        saved: The adapter's saved format, or None (no adapter, or one saved without a file).
        tokenizer: The tokenizer (without a saved format: the chat template is used when it has one).
        chat: ``--chat-template`` (True) / ``--no-chat-template`` (False); None: the saved choice.
        template: ``--template``; None: the saved one.

    Returns:
        The format, and the ways the user's choices go against the saved format (to warn about).
    """
    if saved is None:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        use_chat = has_template if chat is None else chat
        return PromptFormat(format="completion", chat_template=use_chat, template=template or "{prompt}"), []
    notes = []
    fmt = saved
    if chat is not None and chat != saved.chat:
        notes.append(f"the adapter was trained {'with' if saved.chat else 'without'} the chat template; "
                     f"{'--chat-template' if chat else '--no-chat-template'} overrides that")
        raw = saved.format == "chat"  # chat rows off the chat template: the text as it is
        fmt = dataclasses.replace(fmt, format="completion" if raw else fmt.format, chat_template=chat,
                                  template="{prompt}" if raw else fmt.template)
    if template is not None and template != saved.template:
        notes.append(f"the adapter was trained with the prompt template {saved.query_template()!r}; "
                     f"--template {template!r} overrides that")
        fmt = dataclasses.replace(fmt, template=template)
    return fmt, notes


def check_tokenizer(fmt: PromptFormat, tokenizer: Any) -> list[str]:
    """Ways ``tokenizer`` differs from the one training used (a different base renders other prompts)."""
    notes = []
    if fmt.eos is not None and tokenizer.eos_token != fmt.eos:
        notes.append(f"training ended responses with {fmt.eos!r}; this tokenizer's EOS is {tokenizer.eos_token!r}")
    if fmt.chat and fmt.chat_template_text and getattr(tokenizer, "chat_template", None) != fmt.chat_template_text:
        notes.append("this tokenizer's chat template differs from the one the adapter was trained with")
    return notes
