"""Adapting without training: batched generation, proxy-tuning, answer extraction and evaluation.

Example:
    >>> from graft import decode
    >>> outs = decode.generate(model, tok, ["Q: 2+2?\\nA:"], max_new_tokens=32)
    >>> tuner = decode.ProxyTuner(big, decode.adapter_on(small, "cot"), decode.adapter_off(small))
    >>> decode.extract_number("so 3 + 4 = 7. The answer is $1,234.")
    '1234'
    >>> result = decode.evaluate(model, tok, records, decode.EvalConfig(task="math", strategy="cot"))
"""

from graft.decode.answers import (
    extract_exact,
    extract_number,
    majority_vote,
    normalize_number,
    normalize_text,
)
from graft.decode.evaluation import (
    STRATEGIES,
    TASKS,
    EvalConfig,
    EvalResult,
    evaluate,
    format_table,
    wilson_interval,
    write_results,
)
from graft.decode.generation import Generation, Member, adapter_off, adapter_on, generate
from graft.decode.proxy import ProxyTuner, check_vocabularies, proxy_logits
from graft.decode.scoring import score_continuations

__all__ = [
    "STRATEGIES",
    "TASKS",
    "EvalConfig",
    "EvalResult",
    "Generation",
    "Member",
    "ProxyTuner",
    "adapter_off",
    "adapter_on",
    "check_vocabularies",
    "evaluate",
    "extract_exact",
    "extract_number",
    "format_table",
    "generate",
    "majority_vote",
    "normalize_number",
    "normalize_text",
    "proxy_logits",
    "score_continuations",
    "wilson_interval",
    "write_results",
]
