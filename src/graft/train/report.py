"""Where a run's metrics go besides ``metrics.jsonl`` and ``loss.png``: TensorBoard, Weights & Biases,
MLflow (``TrainConfig.report_to``), and the start-up / end-of-run summaries ``graft train`` prints.

Each backend is an optional extra, imported only when asked for; a missing one is an error naming the
extra to install. All of them write under ``out_dir`` unless told otherwise by their own environment
variables (``WANDB_MODE`` / ``WANDB_DIR``, ``MLFLOW_TRACKING_URI``), so a run with no network works.
"""

from __future__ import annotations

import importlib
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graft.train.config import TrainConfig

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
REPORT_DIRS = ("tensorboard", "wandb", "mlruns")  # what each backend writes under out_dir by default
# Record keys that are positions, not measurements.
NOT_METRICS = ("step",)


def _require(module: str, backend: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"report_to={backend!r} needs the {EXTRAS[backend]} package: "
                          f"pip install 'graft-peft[{backend}]' ({e})") from None


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric measurements of a metrics record (booleans, None and positions left out)."""
    return {k: float(v) for k, v in record.items()
            if k not in NOT_METRICS and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` into ``out_dir/tensorboard``."""

    name = "tensorboard"

    def __init__(self, out_dir: Path, config: TrainConfig) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.location = str(out_dir / "tensorboard")
        self.writer = SummaryWriter(log_dir=self.location)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.to_dict().items()))

    def log(self, record: Mapping[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A Weights & Biases run; offline (files under ``out_dir/wandb``) unless ``WANDB_MODE`` says otherwise."""

    name = "wandb"

    def __init__(self, out_dir: Path, config: TrainConfig) -> None:
        wandb = _require("wandb", "wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "graft"), dir=str(out_dir),
                              mode=os.environ.get("WANDB_MODE", "offline"), config=config.to_dict(),
                              name=out_dir.name, reinit="finish_previous")
        self.location = str(getattr(self.run, "dir", None) or out_dir / "wandb")

    def log(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in ``out_dir/mlruns`` (a local file store) unless ``MLFLOW_TRACKING_URI`` is set."""

    name = "mlflow"

    def __init__(self, out_dir: Path, config: TrainConfig) -> None:
        mlflow = _require("mlflow", "mlflow")
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # graft's choice: a file store beside the run, which needs no database packages;
            # MLflow 3.x refuses file stores unless told they are wanted (a user's own URI is left as given)
            uri = (out_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "graft"))
        self.run = mlflow.start_run(run_name=out_dir.name)
        mlflow.log_params({k: str(v)[:250] for k, v in config.to_dict().items()})
        self.location = f"{uri} (run {self.run.info.run_id})"

    def log(self, record: Mapping[str, Any]) -> None:
        # MLflow metric names allow letters, digits, _ - . space / only: rewards/chosen is fine.
        self.mlflow.log_metrics(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.mlflow.end_run()


BACKENDS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow}


def check_available(config: TrainConfig) -> None:
    """Fail now, before any loading, when a backend of ``config.report_to`` is not installed."""
    for name in config.reporters():
        _require(name, name)


class Reporters:
    """The backends of ``config.report_to``, opened together and fed every logged record."""

    def __init__(self, out_dir: Path | None, config: TrainConfig) -> None:
        names = config.reporters()
        if names and out_dir is None:
            raise ValueError(f"TrainConfig report_to={config.report_to!r} needs out_dir (where the logs go)")
        self.backends: list[Any] = []
        try:
            for name in names:
                self.backends.append(BACKENDS[name](Path(out_dir), config))
        except BaseException:
            self.close()
            raise

    def log(self, record: Mapping[str, Any]) -> None:
        for backend in self.backends:
            backend.log(record)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

    def locations(self) -> dict[str, str]:
        return {backend.name: backend.location for backend in self.backends}


# --------------------------------------------------------------------------------------------
# Summaries


def startup_summary(model: Any, train_rows: Sequence[Any], eval_rows: Sequence[Any] | None, config: TrainConfig,
                    steps: int, data_format: str | None = None, label_map: Mapping[Any, int] | None = None) -> str:
    """What a run is about to do: parameters, examples, tokens, format, label map, steps."""
    import graft

    counts = graft.report(model)
    tokens = sum(_tokens(row) for row in train_rows)
    lines = [f"graft train: {config.objective} on {len(train_rows):,} examples ({tokens:,} tokens)"
             + (f", eval {len(eval_rows):,}" if eval_rows else "")]
    lines.append(f"  parameters: {counts}")
    if data_format:
        lines.append(f"  data format: {data_format}")
    if label_map:
        lines.append("  labels: " + ", ".join(f"{k!r}->{v}" for k, v in label_map.items()))
    size = f"batch {config.batch_size}" if config.batch_size else f"{config.tokens_per_batch} tokens per batch"
    lines.append(f"  steps: {steps} ({size} x grad_accum {config.grad_accum}, lr {config.lr:g}, {config.schedule})"
                 + (f", eval every {config.eval_every}" if config.eval_every else ""))
    if config.objective == "dpo":
        lines.append(f"  DPO: beta {config.beta:g}, label smoothing {config.label_smoothing:g}, reference = the "
                     f"base with the adapter disabled ({'precomputed' if config.precompute_ref else 'every step'})")
    return "\n".join(lines)


def _tokens(row: Any) -> int:
    if hasattr(row, "chosen"):  # a preference pair
        return len(row.chosen) + len(row.rejected)
    return len(row["input_ids"]) if isinstance(row, Mapping) else len(row)


def outputs_summary(outputs: Mapping[str, Any]) -> str:
    """Where every output of a run went, one per line."""
    width = max((len(k) for k in outputs), default=0)
    return "outputs:\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in outputs.items() if v)
