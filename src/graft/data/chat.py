"""Split a conversation rendered by a tokenizer's chat template into prompt and response text.

The template is treated as a black box. Rendering growing prefixes of the conversation shows where
each assistant turn begins and ends: for the assistant message ``i``,

* ``render(messages[:i], add_generation_prompt=True)`` ends with the assistant header, and
* ``render(messages[:i + 1])`` adds the message and its end-of-turn text.

The text in between is the response. It is cut after the tokenizer's EOS token when that occurs in
it, so what follows EOS (e.g. ChatML's newline after ``<|im_end|>``) is not trained: generation stops
at EOS and never produces it. Templates whose earlier output changes as the conversation grows (for
example ones that drop past reasoning) cannot be split this way and are refused with an error.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from graft.data.formats import DataOptionError
from graft.data.readers import DataError

__all__ = ["chat_segments"]


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], where: str
) -> list[tuple[str, bool]]:
    """Render a conversation with the tokenizer's chat template, split into (text, is_response) pieces.

    Args:
        tokenizer: A tokenizer with a chat template.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        where: The row's origin, for error messages.

    Returns:
        Pieces whose concatenation is the rendered conversation; ``is_response`` marks each
        assistant message's content through its EOS.

    Raises:
        DataError: The tokenizer has no chat template, or the template is not prefix-consistent.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataOptionError(
            f"{type(tokenizer).__name__} has no chat template; use alpaca, completion or cot rows without "
            "{chat_template}, or a tokenizer of a chat model", chat_template=True,
        )
    segments: list[tuple[str, bool]] = []
    done = ""  # the rendered text covered by segments so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not head.startswith(done) or not full.startswith(head):
            raise DataError(
                f"{where}: the chat template of {type(tokenizer).__name__} renders earlier turns "
                f"differently as the conversation grows (at messages[{i}]), so the assistant turns "
                "cannot be located for loss masking"
            )
        response = _through_eos(full[len(head) :], tokenizer.eos_token)
        segments += [(head[len(done) :], False), (response, True)]
        done = head + response
    rest = _render(tokenizer, messages, generation_prompt=False)
    if not rest.startswith(done):
        raise DataError(
            f"{where}: the chat template's full rendering does not extend its per-turn renderings"
        )
    if len(rest) > len(done):
        segments.append((rest[len(done) :], False))
    return [(text, is_response) for text, is_response in segments if text]


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], generation_prompt: bool
) -> str:
    """The chat template's text for ``messages`` (``""`` for none)."""
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def _through_eos(text: str, eos: str | None) -> str:
    """``text`` up to and including its last EOS token, or all of it when EOS does not occur."""
    cut = text.rfind(eos) if eos else -1
    return text if cut < 0 else text[: cut + len(eos)]
