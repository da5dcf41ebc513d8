"""Options as the user wrote them: errors that name an option the way it was given, and the key names
people paste from other fine-tuning tools.

An :class:`OptionError` carries the options it is about, not a finished sentence: its template names
them as ``{key}`` fields, which Python renders as keywords (``resume=True``) and the command line as
flags (``--resume``), so neither audience is told to pass something its interface cannot take.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_FIELD = re.compile(r"\{(\w+)\}")
NAME = object()  # a field that names the option alone (``eval_data``), not a value of it

Renderer = Callable[[str, Any], str]


class OptionError(ValueError):
    """A bad option value or combination, rendered for whoever gave it.

    Args:
        template: The message, with a ``{key}`` field for every option it names.
        where: Prefix of the Python rendering (e.g. ``"TrainConfig"``); the command line leaves it out.
        **values: Each option's value as given (``NAME``: the option itself). A key may name a method
            setting as ``method_arg_<setting>``; ``key__tag`` names ``key`` again with another value.
    """

    def __init__(self, template: str, /, *, where: str = "", **values: Any) -> None:
        self.template, self.where, self.values = template, where, values
        super().__init__(self.render(python_option))

    def render(self, name: Renderer) -> str:
        # Only the option fields are replaced: other braces (a file name, "{role, content}") stay as written.
        text = _FIELD.sub(lambda m: name(m[1].partition("__")[0], self.values[m[1]]) if m[1] in self.values
                          else m[0], self.template)
        return f"{self.where} {text}" if self.where and name is python_option else text


def python_option(key: str, value: Any) -> str:
    """``key=value`` as a Python caller writes it."""
    key = key.removeprefix("method_arg_")
    return key if value is NAME else f"{key}={value!r}"


def cli_renderer(flags: Mapping[str, str], switches: Iterable[str] = (), yaml_keys: Iterable[str] = (),
                 yaml: bool = True) -> Renderer:
    """How the command line names an option: ``--flag value``; as a YAML key where it came from the
    config file (or has no flag).

    Args:
        flags: option key -> its flag (``"out_dir": "--out"``).
        switches: keys whose flags are on/off switches (``--packing`` / ``--no-packing``).
        yaml_keys: keys this run took from its YAML config (and not from a flag).
        yaml: Whether the command reads a YAML config; if not, an option without a flag is named as
            the Python API names it.
    """
    switches, yaml_keys = set(switches), set(yaml_keys)

    def render(key: str, value: Any) -> str:
        if key.startswith("method_arg_"):
            setting = key.removeprefix("method_arg_")
            return f"--method-arg {setting}" if value is NAME else f"--method-arg {setting}={_plain(value)}"
        flag = flags.get(key)
        if flag is None and not yaml:
            return python_option(key, value)
        if flag is None or (key in yaml_keys and value is not NAME):
            return key if value is NAME else f"{key}: {_yaml(value)}"
        if value is NAME:
            return flag
        if value is None:
            return f"no {flag}"
        if key in switches or isinstance(value, bool):
            return flag if value else f"--no-{flag.removeprefix('--')}"
        return f"{flag} {_plain(value)}"

    return render


def _yaml(value: Any) -> str:
    """A value as a YAML config spells it (a string that YAML would read as something else is quoted)."""
    import yaml

    if isinstance(value, str):
        return value if yaml.safe_load(value) == value else f'"{value}"'
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else _plain(value)


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


# --------------------------------------------------------------------------------------------
# Key names from Hugging Face's TrainingArguments, PEFT's LoraConfig and LLaMA-Factory


def _epochs(value: Any) -> Any:
    """``num_train_epochs: 3.0`` (a float there) is graft's ``epochs: 3``; 2.5 stays, to be refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _targets(value: Any) -> Any:
    return "all-linear" if value == "all" else value  # LLaMA-Factory's lora_target: all


def _optimizer(value: Any) -> Any:
    return {"adamw_torch": "adamw", "adamw_hf": "adamw", "adamw_torch_fused": "adamw",
            "adamw_bnb_8bit": "adamw8bit", "adamw_8bit": "adamw8bit", "paged_adamw_8bit": "adamw8bit"}.get(value, value)


def _schedule(value: Any) -> Any:
    return {"constant_with_warmup": "constant"}.get(value, value)


def _quantize(value: Any) -> Any:
    return {4: "nf4", 8: "int8"}.get(value, value)  # LLaMA-Factory quantization_bit (bitsandbytes)


# alias -> (graft key, value converter or None). Keys graft shares with these tools (max_steps,
# warmup_ratio, warmup_steps, seed, weight_decay, max_grad_norm, gradient_checkpointing, packing,
# train_on_prompt) need no entry.
ALIASES: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "learning_rate": ("lr", None),
    "num_train_epochs": ("epochs", _epochs),
    "per_device_train_batch_size": ("batch_size", None),
    "gradient_accumulation_steps": ("grad_accum", None),
    "lora_r": ("r", None),
    "lora_rank": ("r", None),
    "lora_alpha": ("alpha", None),
    "lora_dropout": ("dropout", None),
    "use_rslora": ("rslora", None),
    "lora_target": ("targets", _targets),
    "target_modules": ("targets", _targets),
    "output_dir": ("out_dir", None),
    "overwrite_output_dir": ("overwrite", None),
    "cutoff_len": ("max_length", None),
    "max_seq_length": ("max_length", None),
    "model_name_or_path": ("model", None),
    "dataset": ("data", None),
    "train_file": ("data", None),
    "eval_dataset": ("eval_data", None),
    "validation_file": ("eval_data", None),
    "val_size": ("eval_split", None),
    "max_samples": ("limit", None),
    "lr_scheduler_type": ("schedule", _schedule),
    "optim": ("optimizer", _optimizer),
    "eval_steps": ("eval_every", None),
    "save_steps": ("save_every", None),
    "save_total_limit": ("keep_checkpoints", None),
    "logging_steps": ("log_every", None),
    "finetuning_type": ("method", None),
    # Axolotl's names
    "base_model": ("model", None),
    "adapter": ("method", None),
    "lora_target_modules": ("targets", _targets),
    "sequence_len": ("max_length", None),
    "micro_batch_size": ("batch_size", None),
    "quantization_bit": ("quantize", _quantize),
}
# Precision switches name a value of graft's autocast: bf16: true -> autocast: bf16 (false: the default).
PRECISION_SWITCHES = ("bf16", "fp16")


def apply_aliases(options: Mapping[str, Any], where: str = "options") -> tuple[dict[str, Any], list[str]]:
    """Translate other tools' key names to graft's.

    Returns:
        The options with graft's keys, and one ``"alias -> key"`` note per translation applied.

    Raises:
        OptionError: An alias and the graft key it means (or two aliases of one key) give different values.
    """
    out: dict[str, Any] = {k: v for k, v in options.items() if k not in ALIASES and k not in PRECISION_SWITCHES}
    source = {k: k for k in out}  # graft key -> the key it was given as
    notes: list[str] = []

    def put(alias: str, key: str, value: Any, shown: str) -> None:
        if key in out and out[key] != value:  # named as written: these are the user's own key names
            raise ValueError(f"{where} gives {key} twice, as '{source[key]}' and as '{alias}' (read as {shown}), "
                             "with different values; keep one")
        out[key], source[key] = value, alias
        notes.append(f"{alias} -> {shown}")

    for alias, value in options.items():
        if alias in ALIASES:
            key, convert = ALIASES[alias]
            value = convert(value) if convert is not None else value
            put(alias, key, value, f"{key}: {value}")
        elif alias in PRECISION_SWITCHES:
            if value is True:
                put(alias, "autocast", alias, f"autocast: {alias}")
            elif value is not False:
                raise OptionError(f"{where}: {alias}: {value!r} must be true or false (graft's key: {{autocast}})",
                                  autocast=NAME)
            else:
                notes.append(f"{alias}: false -> the default precision")
    return out, notes


def suggest(key: str, known: Iterable[str]) -> str | None:
    """The graft key closest to an unknown ``key``, also through the aliases (``learning_rat`` -> ``lr``)."""
    known = sorted(known)
    close = difflib.get_close_matches(key, [*known, *ALIASES], n=1)
    if not close:
        return None
    return ALIASES[close[0]][0] if close[0] in ALIASES else close[0]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a container's cpuset limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity call
        return os.cpu_count() or 1
