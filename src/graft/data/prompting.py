"""In-context learning prompts: zero-, one- and few-shot, with a token budget and exemplar selection.

A prompt is built from *shots* (exemplars: a query text and its answer text) and the query::

    instruction + sep + shot_1.prompt + shot_1.answer + sep + ... + sep + query + response_prefix

which is lm-eval-harness's layout (``fewshot_delimiter="\\n\\n"``; the answer text carries its own
``target_delimiter``, e.g. ``" The answer is 72."``) and Kojima et al.'s (``"Q: ...\\nA: The answer
is 72.\\n\\nQ: ...\\nA:"``; METHODS.md §13). With ``chat=True`` the tokenizer's chat template renders
the same pieces as a conversation: the instruction as the system message, each shot as a user turn
and an assistant turn, the query as the last user turn, then the assistant header and the
``response_prefix`` (e.g. a zero-shot-CoT trigger the model continues from).

Shots are given most relevant first. When the prompt is over ``max_tokens``, shots are dropped from
the end of that list (the least relevant) until it fits; the query is never cut. A query that does
not fit on its own is an error.

Exemplar selection (:func:`select_exemplars`): ``first`` (the pool's order), ``random`` (seeded per
query, so a query gets the same shots in every run and whatever the batch order) and ``similar``
(nearest neighbours by cosine similarity of sentence embeddings, all-MiniLM-L6-v2 by default; Liu
et al. 2022, "What Makes Good In-Context Examples for GPT-3?"). A pool entry whose text equals the
query's is never its own exemplar.

Example:
    >>> shots = [Shot("Q: 2+2?\\nA:", " The answer is 4.")]
    >>> build_prompt("Q: 3+3?\\nA:", shots, tokenizer=tok, max_tokens=512).text
    'Q: 2+2?\\nA: The answer is 4.\\n\\nQ: 3+3?\\nA:'
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graft.data.readers import DataError

__all__ = [
    "SELECTIONS",
    "Prompt",
    "PromptTooLong",
    "Shot",
    "build_prompt",
    "count_tokens",
    "select_exemplars",
    "sentence_embedder",
]

#: Exemplar selection methods accepted by :func:`select_exemplars`.
SELECTIONS = ("first", "random", "similar")

Embedder = Callable[[Sequence[str]], torch.Tensor]


class PromptTooLong(DataError):
    """The query alone (plus instruction and response prefix) is longer than the token budget."""


@dataclass(frozen=True)
class Shot:
    """One exemplar.

    Attributes:
        prompt: Its query text, rendered like the real query (``"Q: ...\\nA:"``).
        answer: Its answer text, including the delimiter that separates it from the prompt
            (``" The answer is 72."``). In chat mode it is the assistant message (leading
            whitespace is removed).
    """

    prompt: str
    answer: str


@dataclass(frozen=True)
class Prompt:
    """A built prompt.

    Attributes:
        text: The prompt text, ready to tokenise (chat prompts already hold their special tokens).
        shots: How many of the given shots it kept (the first ``shots`` of them).
        dropped: How many shots the token budget removed.
        tokens: Its length in tokens as :func:`count_tokens` measures it (0 without a tokenizer).
        chat: Whether it was rendered with the chat template (then encode it with
            ``add_special_tokens=False``).
    """

    text: str
    shots: int
    dropped: int
    tokens: int
    chat: bool


def count_tokens(tokenizer: Any, text: str, chat: bool) -> int:
    """Tokens of ``text`` as generation encodes it: special tokens added only to non-chat text."""
    return len(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def build_prompt(
    query: str,
    shots: Sequence[Shot] = (),
    *,
    tokenizer: Any = None,
    instruction: str = "",
    separator: str = "\n\n",
    response_prefix: str = "",
    chat: bool = False,
    max_tokens: int | None = None,
) -> Prompt:
    """Build a zero-, one- or few-shot prompt that fits a token budget.

    Args:
        query: The query, rendered with the prompt template (``"Q: {question}\\nA:"``; in chat mode
            the user message).
        shots: Exemplars, most relevant first.
        tokenizer: Needed for ``chat`` and ``max_tokens``.
        instruction: Text before the shots (chat: the system message); ``""`` for none.
        separator: Between the instruction and each shot and the query (non-chat).
        response_prefix: Appended after the query (chat: after the assistant header), e.g.
            ``" Let's think step by step."``.
        chat: Render with the tokenizer's chat template.
        max_tokens: Token budget for the whole prompt; ``None`` for no limit.

    Returns:
        The prompt with as many shots (from the front) as fit.

    Raises:
        PromptTooLong: The prompt with no shots is over ``max_tokens`` (the query is never cut).
        DataError: ``chat`` without a tokenizer that has a chat template.
        ValueError: ``max_tokens`` without a tokenizer, or not positive.
    """
    if max_tokens is not None and (tokenizer is None or max_tokens < 1):
        raise ValueError(f"max_tokens={max_tokens} needs a tokenizer and a positive value")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"chat=True needs a tokenizer with a chat template; {type(tokenizer).__name__} has none "
            "(use chat=False / --no-chat-template)"
        )
    render = _render_chat if chat else _render_plain
    kept = len(shots)
    while True:
        text = render(query, shots[:kept], tokenizer, instruction, separator, response_prefix)
        tokens = count_tokens(tokenizer, text, chat) if tokenizer is not None else 0
        if max_tokens is None or tokens <= max_tokens:
            return Prompt(text, kept, len(shots) - kept, tokens, chat)
        if kept == 0:
            raise PromptTooLong(
                f"the query alone needs {tokens} tokens, over the budget of {max_tokens}; raise "
                f"the budget (max_tokens / --max-prompt-tokens) or shorten it: {query[:80]!r}"
            )
        # Shortest-first search would save tokenizer calls, but k is small and this is exact.
        kept -= 1


def _render_plain(
    query: str, shots: Sequence[Shot], tokenizer: Any, instruction: str, separator: str, prefix: str
) -> str:
    parts = [instruction] if instruction else []
    parts += [shot.prompt + shot.answer for shot in shots]
    parts.append(query + prefix)
    return separator.join(parts)


def _render_chat(
    query: str, shots: Sequence[Shot], tokenizer: Any, instruction: str, separator: str, prefix: str
) -> str:
    messages = [{"role": "system", "content": instruction}] if instruction else []
    for shot in shots:
        messages += [{"role": "user", "content": shot.prompt}, {"role": "assistant", "content": shot.answer.lstrip()}]
    messages.append({"role": "user", "content": query})
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return head + prefix.lstrip()


def select_exemplars(
    queries: Sequence[str],
    pool: Sequence[str],
    k: int,
    method: str = "first",
    *,
    seed: int = 0,
    embed: Embedder | None = None,
) -> list[list[int]]:
    """Choose ``k`` exemplars from a pool for each query.

    Args:
        queries: The query texts (what is compared with the pool; e.g. the question field).
        pool: The candidate exemplars' texts, in the same form.
        k: Exemplars per query (fewer when the pool has fewer eligible entries).
        method: ``"first"``, ``"random"`` or ``"similar"``.
        seed: Seed of ``random``; each query's draw depends only on the seed and its text.
        embed: ``similar``: maps texts to a ``(n, d)`` tensor; rows are L2-normalised here.
            Defaults to :func:`sentence_embedder` (all-MiniLM-L6-v2).

    Returns:
        For each query, pool indices, most relevant first (``similar``: most similar first; ties
        keep pool order).

    Raises:
        ValueError: An unknown method or a negative ``k``.
    """
    if method not in SELECTIONS:
        raise ValueError(f"unknown exemplar selection {method!r}; allowed: {', '.join(SELECTIONS)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0 or not pool:
        return [[] for _ in queries]
    by_text: dict[str, list[int]] = {}
    for index, text in enumerate(pool):
        by_text.setdefault(text, []).append(index)
    excluded = [set(by_text.get(query, ())) for query in queries]
    if method == "first":
        return [[i for i in range(len(pool)) if i not in skip][:k] for skip in excluded]
    if method == "random":
        chosen = []
        for query, skip in zip(queries, excluded):
            eligible = [i for i in range(len(pool)) if i not in skip]
            digest = hashlib.sha256(f"{seed}\0{query}".encode()).digest()
            rng = random.Random(int.from_bytes(digest[:8], "big"))
            chosen.append(rng.sample(eligible, min(k, len(eligible))))
        return chosen
    return _most_similar(queries, pool, k, excluded, embed or sentence_embedder())


def _most_similar(
    queries: Sequence[str], pool: Sequence[str], k: int, excluded: list[set[int]], embed: Embedder
) -> list[list[int]]:
    """Top-k pool indices per query by cosine similarity, most similar first."""
    q = torch.nn.functional.normalize(embed(list(queries)).float(), dim=-1)  # (queries, d)
    p = torch.nn.functional.normalize(embed(list(pool)).float(), dim=-1)  # (pool, d)
    similarity = q @ p.T  # (queries, pool)
    chosen = []
    for row, skip in zip(similarity, excluded):
        order = torch.argsort(-row, stable=True).tolist()
        chosen.append([i for i in order if i not in skip][:k])
    return chosen


def sentence_embedder(name: str = "minilm", batch_size: int = 64, max_length: int = 256) -> Embedder:
    """A sentence embedder: mean-pooled, L2-normalised token states of an encoder.

    This is how sentence-transformers computes all-MiniLM-L6-v2's embeddings (mean pooling over
    the attention mask, then normalisation). The model loads on the first call, once.

    Args:
        name: A model for :func:`graft.models.load` (``"minilm"`` is bundled).
        batch_size: Texts per forward.
        max_length: Tokens kept per text (all-MiniLM-L6-v2 was trained on up to 256).

    Returns:
        ``embed(texts) -> (len(texts), d)`` float tensor.
    """
    loaded: list[Any] = []

    def embed(texts: Sequence[str]) -> torch.Tensor:
        if not loaded:
            from graft import models

            loaded.extend(models.load(name, task="feature-extraction"))
        model, tokenizer = loaded
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    list(texts[start : start + batch_size]), padding=True, truncation=True,
                    max_length=max_length, return_tensors="pt",
                )
                states = model(**batch).last_hidden_state  # (batch, seq, d)
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)  # (batch, seq, 1)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, 0)

    return embed
