"""Evaluate a model without training it: prompting strategies x tasks, with honest statistics.

Tasks:

* ``math``: GSM8K-style rows (``question`` and ``answer``, the answer either ``"steps\\n#### 42"``
  or with a separate ``rationale``); the model generates, the number is extracted
  (:func:`graft.decode.answers.extract_number`) and compared by value.
* ``classification``: ``text`` and ``label`` rows; each label's verbaliser is scored by its
  log-likelihood after the prompt (:func:`graft.decode.scoring.score_continuations`); no text is
  generated. Integer labels need verbalisers (``labels={0: "negative", 1: "positive"}``).
* ``exact``: ``alpaca``, ``completion`` or ``cot`` rows; the short answer is extracted
  (:func:`graft.decode.answers.extract_exact`) and compared after SQuAD normalisation.

Strategies (prompt formats from Kojima et al. 2022 and lm-eval-harness, METHODS.md §13):

=================  ======================================================================
``zero-shot``      the query alone; greedy
``few-shot``       ``shots`` exemplars with their answers (``" The answer is 72."``)
``cot``            ``shots`` exemplars with their rationales (few-shot chain-of-thought)
``zero-shot-cot``  the query + "Let's think step by step."; then the reasoning + "Therefore,
                   the answer (arabic numerals) is" (math) and a short second generation, or
                   label scoring (classification)
``self-consistency`` ``samples`` sampled few-shot-CoT chains, majority vote (Wang et al. 2023)
``proxy``          zero-shot prompts decoded (or scored) by a
                   :class:`~graft.decode.proxy.ProxyTuner`
=================  ======================================================================

Accuracy comes with a Wilson 95% interval: at n = 200 an accuracy of 10% means 6.6%-14.9%, so
differences of a few points between strategies are usually noise.

Example:
    >>> records = graft.data.read("gsm8k.jsonl")
    >>> result = evaluate(model, tok, records[:200], EvalConfig(task="math", strategy="cot"),
    ...                   pool=records[200:])
    >>> result.summary["accuracy"], result.summary["ci_low"], result.summary["ci_high"]
"""

from __future__ import annotations

import json
import math
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from graft.data import prompting
from graft.data.formats import detect_format, label_key, render
from graft.data.readers import DataError, Record
from graft.data.templates import Template
from graft.decode import answers
from graft.decode.generation import Generation, LogitSource, as_source, generate
from graft.decode.proxy import ProxyTuner
from graft.decode.scoring import score_continuations

__all__ = [
    "STRATEGIES",
    "TASKS",
    "EvalConfig",
    "EvalResult",
    "evaluate",
    "format_table",
    "wilson_interval",
    "write_results",
]

TASKS = ("math", "classification", "exact")
STRATEGIES = ("zero-shot", "few-shot", "cot", "zero-shot-cot", "self-consistency", "proxy")
#: Kojima et al.'s trigger no. 1 and their answer-extraction phrases.
COT_TRIGGER = "Let's think step by step."
_EXTRACTION = {"math": "\nTherefore, the answer (arabic numerals) is", "exact": "\nTherefore, the answer is",
               "classification": "\nTherefore, the answer is"}
# Default query templates: (plain, chat).
_QUERY = {"math": ("Q: {question}\nA:", "{question}"), "classification": ("Text: {text}\nLabel:", "{text}")}
_EXACT_FORMATS = ("alpaca", "completion", "cot")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how.

    Attributes:
        task: ``"math"``, ``"classification"`` or ``"exact"``.
        strategy: One of :data:`STRATEGIES`.
        shots: Exemplars in the prompt for ``few-shot``, ``cot`` and ``self-consistency``.
        samples: Sampled chains for ``self-consistency``.
        selection: How exemplars are chosen: ``"first"``, ``"random"`` (seeded) or ``"similar"``.
        chat: Render prompts with the tokenizer's chat template; ``None``: when it has one.
        template: The query template (default: ``"Q: {question}\\nA:"`` for math,
            ``"Text: {text}\\nLabel:"`` for classification, the data format's prompt for exact;
            in chat mode the bare question / text).
        instruction: Text before the exemplars (chat: the system message). Classification's
            default lists the labels.
        labels: Classification verbalisers, ``{label as in the data: word}``; default: the labels
            themselves when they are strings.
        fields: ``{format field: column}`` renames, e.g. ``{"text": "sentence"}``.
        separator: Between exemplars (non-chat).
        max_new_tokens: Tokens generated per answer (zero-shot-CoT's second stage: at most 32).
        temperature: Sampling temperature; 0 = greedy. ``self-consistency`` uses
            ``sc_temperature`` instead.
        sc_temperature: Temperature of the self-consistency chains.
        top_p: Nucleus mass when sampling.
        batch_size: Sequences generated or scored at once.
        seed: Seed of the exemplar draw (``random``) and of sampling.
        max_prompt_tokens: Token budget of a prompt (exemplars are dropped to fit, the query is never
            cut); ``None``: the model's context length minus the tokens the answer needs.
    """

    task: str
    strategy: str = "zero-shot"
    shots: int = 4
    samples: int = 5
    selection: str = "first"
    chat: bool | None = None
    template: str | None = None
    instruction: str | None = None
    labels: Mapping[Any, str] | None = None
    fields: Mapping[str, str] | None = None
    separator: str = "\n\n"
    max_new_tokens: int = 256
    temperature: float = 0.0
    sc_temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"EvalConfig.task={self.task!r}; expected one of: {', '.join(TASKS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"EvalConfig.strategy={self.strategy!r}; expected one of: {', '.join(STRATEGIES)}")
        if self.task == "classification" and self.strategy in ("cot", "self-consistency"):
            raise ValueError(
                f"strategy {self.strategy!r} needs rationales to show and answers to vote on; classification is "
                "scored by label likelihood: use zero-shot, few-shot, zero-shot-cot or proxy"
            )
        if self.selection not in prompting.SELECTIONS:
            raise ValueError(
                f"EvalConfig.selection={self.selection!r}; expected one of: {', '.join(prompting.SELECTIONS)}"
            )
        for name in ("shots", "samples", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "shots" else 1):
                raise ValueError(f"EvalConfig.{name}={value!r} must be an integer >= {0 if name == 'shots' else 1}")
        if self.strategy == "self-consistency" and self.sc_temperature <= 0:
            raise ValueError(f"self-consistency samples its chains: sc_temperature must be > 0, got {self.sc_temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"EvalConfig.top_p={self.top_p} must be in (0, 1]")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"EvalConfig.max_prompt_tokens={self.max_prompt_tokens} must be >= 1")

    @property
    def uses_shots(self) -> bool:
        """Whether the strategy puts exemplars in the prompt."""
        return self.strategy in ("few-shot", "cot", "self-consistency") and self.shots > 0


@dataclass(frozen=True)
class EvalResult:
    """Per-example rows (for the JSONL) and the summary (for the table)."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]


@dataclass(frozen=True)
class _Item:
    """One row, rendered for prompting."""

    where: str
    query: str  # the query, rendered with the template
    answer: str  # the exemplar answer text, e.g. " The answer is 72."
    rationale: str | None  # the exemplar CoT answer text, or None without a rationale
    gold: str  # normalised gold answer (classification: the verbaliser)


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); 95% by default.

    Better than ``p +- z sqrt(p(1-p)/n)`` near 0 and 1 and for small ``n``: never leaves [0, 1]
    and never has zero width.

    Returns:
        ``(low, high)``; ``(0.0, 1.0)`` when ``n == 0``.
    """
    if n == 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must be between 0 and n={n}")
    p = correct / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def evaluate(
    source: nn.Module | LogitSource,
    tokenizer: Any,
    records: Sequence[Record],
    config: EvalConfig,
    *,
    pool: Sequence[Record] | None = None,
    embed: prompting.Embedder | None = None,
    meta: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Evaluate ``source`` on ``records`` with one strategy.

    Args:
        source: A causal LM (with its adapters as they are), a
            :class:`~graft.decode.generation.Member`, or a :class:`~graft.decode.proxy.ProxyTuner`
            (required by, and only for, ``strategy="proxy"``).
        tokenizer: The tokenizer (shared by every model of a proxy-tuner).
        records: The rows to evaluate (:func:`graft.data.read`).
        config: Task, strategy and sizes.
        pool: Rows to draw exemplars from; default ``records`` (a row is never its own exemplar).
        embed: Sentence embedder for ``selection="similar"`` (default all-MiniLM-L6-v2).
        meta: Extra keys for the summary (model name, adapter, ...).

    Returns:
        Rows with the prompt, output, extracted answer, gold and correctness; a summary with
        accuracy, its 95% Wilson interval, tokens processed and wall time.

    Raises:
        DataError: Rows that do not fit the task (the message names the row and field), a query
            longer than the prompt budget, or exemplars without rationales for ``cot``.
        ValueError: A proxy-tuner with another strategy, or ``proxy`` without one.
    """
    is_proxy = isinstance(source, ProxyTuner)
    if (config.strategy == "proxy") != is_proxy:
        raise ValueError(
            "strategy 'proxy' needs a ProxyTuner source (graft eval --strategy proxy --expert DIR)"
            if config.strategy == "proxy"
            else f"a ProxyTuner source only goes with strategy 'proxy', not {config.strategy!r}"
        )
    if not records:
        raise DataError("no rows to evaluate")
    source = as_source(source)
    chat = _use_chat(config.chat, tokenizer)
    task = _Task.build(config, tokenizer, chat, [*records, *(pool or [])])
    items = [task.item(r) for r in records]
    shots = _shots(config, task, items, pool, embed)
    budget = config.max_prompt_tokens or max(1, _context_length(source, tokenizer) - task.answer_budget)
    prefix = f" {COT_TRIGGER}" if config.strategy == "zero-shot-cot" else ""
    prompts = [
        prompting.build_prompt(
            item.query, item_shots, tokenizer=tokenizer, instruction=task.instruction,
            separator=config.separator, response_prefix=prefix, chat=chat, max_tokens=budget,
        )
        for item, item_shots in zip(items, shots)
    ]
    start = time.perf_counter()
    rows, tokens = task.run(source, prompts, items)
    seconds = time.perf_counter() - start
    correct = sum(bool(r["correct"]) for r in rows)
    low, high = wilson_interval(correct, len(rows))
    summary = {
        **(meta or {}),
        "task": config.task, "strategy": config.strategy, "n": len(rows), "correct": correct,
        "accuracy": correct / len(rows), "ci_low": low, "ci_high": high,
        "prompt_tokens": tokens[0], "generated_tokens": tokens[1], "tokens": tokens[0] + tokens[1],
        "seconds": seconds, "tokens_per_second": (tokens[0] + tokens[1]) / max(seconds, 1e-9),
        "shots": config.shots if config.uses_shots else 0,
        "mean_shots_used": sum(p.shots for p in prompts) / len(prompts),
        "samples": config.samples if config.strategy == "self-consistency" else 1,
        "selection": config.selection if config.uses_shots else None, "chat": chat,
        "max_new_tokens": config.max_new_tokens if config.task != "classification" else None,
        "batch_size": config.batch_size, "prompt_budget": budget,
    }
    return EvalResult(rows, summary)


def _use_chat(chat: bool | None, tokenizer: Any) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise DataError(
            f"chat=True but {type(tokenizer).__name__} has no chat template; evaluate with chat=False "
            "(--no-chat-template)"
        )
    return has_template if chat is None else chat


def _context_length(source: LogitSource, tokenizer: Any) -> int:
    """The shortest context of the models behind ``source`` (and of the tokenizer, if it sets one)."""
    members = getattr(source, "members", (source,))
    lengths = []
    for member in members:
        cfg = getattr(getattr(member, "model", None), "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            if isinstance(getattr(cfg, key, None), int):
                lengths.append(getattr(cfg, key))
                break
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000:
        lengths.append(limit)
    return min(lengths) if lengths else 2048


def _shots(
    config: EvalConfig, task: _Task, items: list[_Item], pool_records: Sequence[Record] | None,
    embed: prompting.Embedder | None,
) -> list[list[prompting.Shot]]:
    """Each item's exemplars, most relevant first."""
    if not config.uses_shots:
        return [[] for _ in items]
    pool = items if pool_records is None else [task.item(r) for r in pool_records]
    cot = config.strategy in ("cot", "self-consistency")
    if cot:
        missing = next((p for p in pool if p.rationale is None), None)
        if missing is not None:
            raise DataError(
                f"{missing.where}: strategy {config.strategy!r} shows rationales, and this exemplar has none "
                "(cot rows need a 'rationale' field or a GSM8K answer 'steps\\n#### 42')"
            )
    chosen = prompting.select_exemplars(
        [i.query for i in items], [p.query for p in pool], config.shots, config.selection,
        seed=config.seed, embed=embed,
    )
    return [
        [prompting.Shot(pool[j].query, pool[j].rationale if cot else pool[j].answer) for j in picks]
        for picks in chosen
    ]


@dataclass
class _Task:
    """How rows of one task become items, and how prompts become judged rows."""

    config: EvalConfig
    tokenizer: Any
    chat: bool
    instruction: str
    answer_budget: int
    item: Callable[[Record], _Item]
    words: list[str] = field(default_factory=list)  # classification verbalisers

    @classmethod
    def build(cls, config: EvalConfig, tokenizer: Any, chat: bool, records: Sequence[Record]) -> _Task:
        if config.task == "classification":
            verbalisers = _verbalisers(config, records)
            words = list(dict.fromkeys(verbalisers.values()))
            instruction = config.instruction
            if instruction is None:
                instruction = f"Classify the text. Answer with one of: {', '.join(words)}."
            budget = max(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words)
            return cls(config, tokenizer, chat, instruction, budget,
                       lambda r: _classification_item(r, config, chat, verbalisers), words)
        budget = config.max_new_tokens + (32 if config.strategy == "zero-shot-cot" else 0)
        if config.task == "math":
            return cls(config, tokenizer, chat, config.instruction or "", budget, lambda r: _math_item(r, config, chat))
        fmt = detect_format(records[0], config.fields)
        if fmt not in _EXACT_FORMATS:
            raise DataError(
                f"{records[0].where}: task 'exact' reads alpaca, completion or cot rows; these look like {fmt!r}"
            )
        return cls(config, tokenizer, chat, config.instruction or "", budget,
                   lambda r: _exact_item(r, config, chat, fmt))

    def run(
        self, source: LogitSource, prompts: list[prompting.Prompt], items: list[_Item]
    ) -> tuple[list[dict[str, Any]], tuple[int, int]]:
        """Judged rows and (prompt tokens, generated tokens)."""
        if self.config.task == "classification":
            return self._classify(source, prompts, items)
        return self._generate(source, prompts, items)

    # ---- generative tasks ------------------------------------------------------------------

    def _generate(self, source: LogitSource, prompts: list[prompting.Prompt], items: list[_Item]):
        cfg = self.config
        sc = cfg.strategy == "self-consistency"
        outs = self._gen(
            source, [p.text for p in prompts], cfg.max_new_tokens,
            temperature=cfg.sc_temperature if sc else cfg.temperature,
            samples=cfg.samples if sc else 1, stop=self._stop(),
        )
        tokens = [sum(o.prompt_tokens for o in outs), sum(sum(o.generated_tokens) for o in outs)]
        second: list[Generation | None] = [None] * len(outs)
        if cfg.strategy == "zero-shot-cot":
            stage2 = [p.text + o.text + " " + _EXTRACTION[cfg.task] for p, o in zip(prompts, outs)]
            second = self._gen(source, stage2, 32, temperature=0.0, samples=1, stop=[])
            tokens[0] += sum(o.prompt_tokens for o in second)
            tokens[1] += sum(sum(o.generated_tokens) for o in second)
        rows = []
        for index, (item, prompt, out, out2) in enumerate(zip(items, prompts, outs, second)):
            if out2 is not None:
                extracted = self._extract(out2.text, first=True)
            else:
                votes = [self._extract(text) for text in out.texts]
                extracted = answers.majority_vote(votes) if sc else votes[0]
            row = {
                "index": index, "where": item.where, "prompt": prompt.text,
                "output": out.texts if sc else out.text, "extracted": extracted, "gold": item.gold,
                "correct": self._correct(extracted, item.gold), "shots": prompt.shots,
                "prompt_tokens": out.prompt_tokens, "generated_tokens": sum(out.generated_tokens),
            }
            if sc:
                row["votes"] = votes
            if out2 is not None:
                row["answer_output"] = out2.text
            rows.append(row)
        return rows, tuple(tokens)

    def _gen(self, source, texts, max_new_tokens, *, temperature, samples, stop) -> list[Generation]:
        cfg = self.config
        return generate(
            source, self.tokenizer, texts, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=cfg.top_p, num_samples=samples, stop=stop, batch_size=cfg.batch_size, seed=cfg.seed,
            add_special_tokens=not self.chat, eos_token_ids=_eos_ids(source, self.tokenizer),
        )

    def _stop(self) -> list[str]:
        """Plain prompts: stop where the model starts the next exemplar ("\\n\\nQ:")."""
        if self.chat:
            return []
        template = self.config.template or _QUERY.get(self.config.task, ("",))[0]
        literal = next(iter(string.Formatter().parse(template)), ("",))[0].rstrip() if template else ""
        if literal:
            return [self.config.separator + literal]
        return [self.config.separator] if self.config.uses_shots else []

    def _extract(self, text: str, first: bool = False) -> str | None:
        if self.config.task == "math":
            return answers.extract_number(text, "first" if first else "auto")
        return answers.extract_exact(text) or None

    def _correct(self, extracted: str | None, gold: str) -> bool:
        if extracted is None:
            return False
        if self.config.task == "math":
            return extracted == gold
        return answers.normalize_text(extracted) == answers.normalize_text(gold)

    # ---- classification ----------------------------------------------------------------------

    def _classify(self, source: LogitSource, prompts: list[prompting.Prompt], items: list[_Item]):
        cfg = self.config
        texts = [p.text for p in prompts]
        candidates = [w if self.chat else " " + w for w in self.words]
        reasoning: list[Generation | None] = [None] * len(items)
        tokens = [0, 0]
        if cfg.strategy == "zero-shot-cot":
            reasoning = self._gen(source, texts, cfg.max_new_tokens, temperature=0.0, samples=1, stop=self._stop())
            tokens = [sum(o.prompt_tokens for o in reasoning), sum(o.generated_tokens[0] for o in reasoning)]
            texts = [t + o.text + " " + _EXTRACTION["classification"] for t, o in zip(texts, reasoning)]
            candidates = [" " + w for w in self.words]
        scores, scored = score_continuations(
            source, self.tokenizer, texts, candidates, batch_size=cfg.batch_size, add_special_tokens=not self.chat
        )
        tokens[0] += scored
        rows = []
        for index, (item, prompt, row_scores, why) in enumerate(zip(items, prompts, scores, reasoning)):
            predicted = self.words[int(row_scores.argmax())]
            row = {
                "index": index, "where": item.where, "prompt": prompt.text, "output": predicted,
                "extracted": predicted, "gold": item.gold, "correct": predicted == item.gold,
                "scores": {w: float(s) for w, s in zip(self.words, row_scores)}, "shots": prompt.shots,
            }
            if why is not None:
                row["reasoning"] = why.text
            rows.append(row)
        return rows, tuple(tokens)


def _eos_ids(source: LogitSource, tokenizer: Any) -> list[int]:
    """EOS ids of the tokenizer and of the models' generation configs (chat models end turns too)."""
    ids = {tokenizer.eos_token_id}
    for member in getattr(source, "members", (source,)):
        config = getattr(getattr(member, "model", None), "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


def _cot_texts(record: Record, config: EvalConfig, chat: bool) -> tuple[str, str, str | None, str]:
    """A cot row's query, answer-only exemplar text, CoT exemplar text (None without a rationale), final answer."""
    query_t = config.template or _QUERY["math"][1 if chat else 0]

    def fill(prompt: str, response: str) -> tuple[str, str]:
        rendered = render(record, "cot", Template(prompt=prompt, response=response), fields=config.fields)
        return rendered.prompt, rendered.response

    query, final = fill(query_t, "{answer}")
    _, rationale = fill("", "{rationale}")
    _, answer = fill("", " The answer is {answer}.")
    _, cot = fill("", " {rationale}\nThe answer is {answer}.")
    return query, answer, (cot if rationale.strip() else None), final.strip()


def _math_item(record: Record, config: EvalConfig, chat: bool) -> _Item:
    query, answer, cot, final = _cot_texts(record, config, chat)
    gold = answers.normalize_number(final)
    if gold is None:
        raise DataError(f"{record.where}: the gold answer {final!r} is not a number (task 'math')")
    return _Item(record.where, query, answer, cot, gold)


def _exact_item(record: Record, config: EvalConfig, chat: bool, fmt: str) -> _Item:
    if fmt == "cot":
        query, answer, cot, final = _cot_texts(record, config, chat)
        return _Item(record.where, query, answer, cot, final)
    rendered = render(record, fmt, Template(prompt=config.template), chat=chat, fields=config.fields)
    if chat:
        query, response = rendered.messages[0]["content"], rendered.messages[1]["content"]
    else:
        query, response = rendered.prompt, rendered.response
    return _Item(record.where, query, response, None, response.strip())


def _verbalisers(config: EvalConfig, records: Sequence[Record]) -> dict[int | str, str]:
    """``{normalised label: word}`` from the config, or the string labels of the data."""
    label_column = (config.fields or {}).get("label", "label")
    if config.labels is not None:
        words = {label_key(k, "labels"): str(v) for k, v in config.labels.items()}
        if len(set(words.values())) != len(words):
            raise DataError(f"labels map two labels to one word: {dict(config.labels)}")
        return words
    seen = {}
    for record in records:
        if record.data.get(label_column) is None:
            continue
        key = label_key(record.data[label_column], record.where)
        if isinstance(key, int):
            raise DataError(
                f"{record.where}: labels are integers ({key!r}); name each class with labels= "
                "(--labels 0=negative,1=positive) so the model can score a word"
            )
        seen[key] = key
    return {k: str(k) for k in sorted(seen)}


def _classification_item(record: Record, config: EvalConfig, chat: bool, words: Mapping[Any, str]) -> _Item:
    query_t = config.template or _QUERY["classification"][1 if chat else 0]
    rendered = render(record, "classification", Template(prompt=query_t), fields=config.fields)
    key = label_key(rendered.label, record.where)
    if key not in words:
        raise DataError(
            f"{record.where}: label {rendered.label!r} has no verbaliser; labels: {', '.join(map(repr, words))}"
        )
    return _Item(record.where, rendered.prompt, " " + words[key], None, words[key])


def write_results(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``predictions.jsonl``, ``summary.json`` and ``summary.md`` into ``out_dir``.

    Returns:
        ``{"predictions": path, "summary": path, "table": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"predictions": out / "predictions.jsonl", "summary": out / "summary.json", "table": out / "summary.md"}
    _write(paths["predictions"], "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows))
    _write(paths["summary"], json.dumps(result.summary, indent=2) + "\n")
    _write(paths["table"], format_table([result.summary]) + "\n")
    return paths


def _write(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def format_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of evaluation summaries, one row each."""
    header = "| model | strategy | task | n | accuracy (95% CI) | tokens | time (s) | tokens/s |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        name = s.get("model", "?") + (f" + {s['adapter']}" if s.get("adapter") else "")
        strategy = s["strategy"] + _strategy_detail(s)
        accuracy = f"{100 * s['accuracy']:.1f}% ({100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f})"
        lines.append(
            f"| {name} | {strategy} | {s['task']} | {s['n']} | {accuracy} | {s['tokens']:,} | "
            f"{s['seconds']:.1f} | {s['tokens_per_second']:.0f} |"
        )
    return "\n".join(lines)


def _strategy_detail(s: Mapping[str, Any]) -> str:
    parts = []
    if s.get("shots"):
        parts.append(f"k={s['shots']}" + (f" {s['selection']}" if s.get("selection") not in (None, "first") else ""))
    if s.get("samples", 1) > 1:
        parts.append(f"{s['samples']} samples")
    if s.get("expert"):
        parts.append(f"expert {s['expert']}")
    return f" ({', '.join(parts)})" if parts else ""

