"""Data-parallel training across processes: ``torchrun --nproc-per-node N -m graft train CONFIG``.

Everything here is PyTorch's own engine (``torch.distributed``); graft adds only what its loop needs.
The backend comes from the hardware: NCCL when CUDA is available (rank ``k`` on ``cuda:LOCAL_RANK``),
gloo on CPU. Two strategies (:class:`DistConfig`):

* ``"ddp"``: every rank holds the whole model. After the micro-batches of an optimizer step, the
  gradients of the trainable parameters (the adapter) are summed across ranks, one all-reduce per
  dtype. That is what ``DistributedDataParallel`` does under ``no_sync`` with a final synchronising
  micro-batch, without the wrapper: graft's selective-logits loss calls the model's backbone and
  output head directly, which a wrapper's forward would not see, and a frozen base has nothing to
  synchronise (so the overlap of communication with backward that DDP buys is worth little here).
* ``"fsdp"``: FSDP2 ``fully_shard`` shards the frozen weights of every decoder layer (the model's
  ``_no_split_modules``) and of the rest of the backbone (embeddings, final norm) across ranks: each
  rank keeps ``1/N`` of them and all-gathers a layer just before it runs. The trainable parameters
  are left out of sharding (``ignored_params``): they stay whole on every rank and are synchronised
  as with ``"ddp"``, so checkpoints, optimizers and methods see ordinary tensors. An output head
  outside the backbone (or tied to the embeddings) stays whole on every rank.

Exactness. A step's loss is the sum of its per-token losses divided by the number of supervised
tokens of the whole step **on all ranks** (all-reduced before backward), and the gradients are
summed, so ``N`` ranks with ``batch_size=b`` train as one process with ``batch_size=N*b`` does, up to
the order of floating-point sums. Clipping then sees the global gradient, identical on every rank.

Data. The order of an epoch is the single-process order of the *global* configuration
(:meth:`Distributed.order_config`: ``batch_size`` or ``tokens_per_batch`` times ``N``); each global
micro-batch is cut into ``N`` consecutive slices and rank ``k`` takes slice ``k``, so the ranks'
union is the global batch, no example is seen twice in an epoch, and the order follows the seed
alone. A collate that packs examples into rows packs each rank's slice. A checkpoint stores the
position in the global order, so a run may resume on a different number of ranks when the global
batch (per-rank value times ranks) and ``grad_accum`` stay the same.

Random numbers. Every rank is seeded alike, and each step's forward and backward (dropout) draw from
a generator seeded by (seed, step, rank) and then put back, so the ranks' dropout masks differ while
the global generators stay equal on every rank (methods that draw masks between backward and the
optimizer step, like Child-Tuning F, then draw the same masks everywhere).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from graft.train.config import TrainConfig
from graft.train.loss import IGNORE_INDEX
from graft.train.monitor import peak_memory_mb

STRATEGIES = ("ddp", "fsdp")
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for collectives; a dead rank is noticed after this long
T = TypeVar("T")
# Errors another rank re-raises as the same type (so the CLI shows a user error as one, not a traceback).
_PLAIN_ERRORS = {e.__name__: e for e in (ValueError, TypeError, FileNotFoundError, KeyError, ImportError)}


@dataclass(frozen=True)
class DistConfig:
    """How to train when the process is one of several (ignored in a single process).

    Args:
        strategy: "ddp" (the model whole on every rank; trainable gradients all-reduced) or "fsdp"
            (FSDP2: the frozen base sharded across ranks; the adapter whole on every rank).
        timeout_s: Seconds a collective waits for the other ranks before failing (> 0). A rank that
            dies or hangs stops the job after at most this long (torchrun usually stops it sooner).
            It applies when graft creates the process group; a group the caller set up keeps its own.
    """

    strategy: str = "ddp"
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"DistConfig strategy={self.strategy!r} is not one of {STRATEGIES}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"DistConfig timeout_s={t!r} must be a finite number of seconds > 0")


# --------------------------------------------------------------------------------------------
# The process group


def launched() -> bool:
    """Whether this process is one of several: an initialised group of size > 1, or torchrun's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """True on rank 0, and in a single process: the one process that writes files and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def backend() -> str:
    """The collective backend this hardware calls for: NCCL on CUDA, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the job torchrun started (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``... in the environment).

    Does nothing in a single process or when the caller already set up a group. Under CUDA, the
    rank's device becomes ``cuda:LOCAL_RANK`` first.

    Returns:
        Whether this call created the process group.
    """
    if not launched() or dist.is_initialized():
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch the "
                           "processes with torchrun (see docs/distributed.md)")
    kwargs: dict[str, Any] = {}
    if backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend(), timeout=timedelta(seconds=timeout_s), **kwargs)
    return True


def shutdown() -> None:
    """Destroy the process group, if there is one (the end of ``graft train``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup(model: nn.Module, options: DistConfig | None, seed: int) -> Distributed | None:
    """Prepare ``model`` for training on all ranks; None in a single process (the loop runs as is).

    Joins the process group if needed, moves the model to this rank's GPU under NCCL, checks that
    every rank loaded the same frozen weights, gives every rank rank 0's trainable values, and with
    ``strategy="fsdp"`` shards the frozen base.
    """
    if not launched():
        return None
    options = options or DistConfig()
    init_process_group(options.timeout_s)
    d = Distributed(options, seed)
    if d.device.type == "cuda":
        model.to(d.device)
    d.check_same_frozen_weights(model)
    d.broadcast([p.data for p in model.parameters() if p.requires_grad])
    if options.strategy == "fsdp" and not _sharded(model):  # a second train() on the same model: already sharded
        shard_frozen(model, d.device)
    return d


# --------------------------------------------------------------------------------------------
# One rank's view of a data-parallel run


def global_order(config: TrainConfig, world_size: int) -> TrainConfig:
    """``config`` with its per-rank ``batch_size`` (or ``tokens_per_batch``) times ``world_size``."""
    if config.batch_size is not None:
        return replace(config, batch_size=config.batch_size * world_size)
    return replace(config, tokens_per_batch=config.tokens_per_batch * world_size)


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s consecutive slice of a global micro-batch (sizes differ by at most one)."""
    q, r = divmod(len(indices), world_size)
    start = rank * q + min(rank, r)
    return list(indices[start:start + q + (rank < r)])


class Distributed:
    """The rank's part in a data-parallel run: what it reads, and the collectives the loop calls."""

    def __init__(self, options: DistConfig, seed: int) -> None:
        self.options = options
        self.strategy = options.strategy
        self.seed = seed
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0
        cuda = dist.get_backend() == "nccl"
        if cuda and "LOCAL_RANK" in os.environ:  # also when the caller set up the group without choosing a GPU
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self._padding: set[int] = set()

    # Data ------------------------------------------------------------------------------------

    def order_config(self, config: TrainConfig) -> TrainConfig:
        """The configuration whose single-process data order is this run's global order."""
        return global_order(config, self.world_size)

    def local_batches(self, group: list[list[int]], build: Callable[[list[int]], dict[str, torch.Tensor]]
                      ) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of one step, from the step's global micro-batches.

        With FSDP every rank must run as many forwards as the others (each one all-gathers), so a rank
        whose slice is empty (the last, short batch of an epoch) runs one example with every label
        masked: it adds nothing to the loss or the gradients. With DDP it simply has no micro-batch.
        """
        self._padding.clear()
        out = []
        for indices in group:
            mine = shard_indices(indices, self.rank, self.world_size)
            if mine:
                out.append(build(mine))
            elif self.strategy == "fsdp":
                pad = build(list(indices[:1]))
                pad["labels"] = torch.full_like(pad["labels"], IGNORE_INDEX)
                self._padding.add(id(pad))
                out.append(pad)
        return out

    # Collectives the step calls -----------------------------------------------------------------

    def sum_count(self, count: int) -> int:
        """The sum of an integer over all ranks (the step's supervised tokens)."""
        t = torch.tensor([count], dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    @contextlib.contextmanager
    def forward_rng(self, step: int) -> Iterator[None]:
        """Draw this rank's random numbers for ``step`` (dropout) from their own generator, then put back."""
        key = hashlib.sha256(f"{self.seed}/{step}/{self.rank}".encode()).digest()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int.from_bytes(key[:8], "little") >> 1)
            yield

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over all ranks (a parameter no rank has a gradient for keeps None)."""
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        grads = []
        for p, any_rank in zip(params, has.tolist(), strict=True):
            if any_rank:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        self._coalesced(grads, dist.all_reduce)

    def reduce_stats(self, loss_sum: float, tokens: int, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """The step's summed loss and its tokens over all ranks (padding micro-batches not counted)."""
        tokens -= sum(_tokens(b) for b in batches if id(b) in self._padding)
        t = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0]), round(float(t[1]))

    def peak_memory_mb(self) -> dict[str, float | None]:
        """The highest peak memory of any rank."""
        local = peak_memory_mb()
        t = torch.tensor([local["peak_rss_mb"], local["vm_hwm_mb"] or -1.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return {"peak_rss_mb": round(float(t[0]), 1), "vm_hwm_mb": None if t[1] < 0 else round(float(t[1]), 1)}

    # Whole-run collectives ----------------------------------------------------------------------

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give every rank its result; its error is raised on every rank."""
        box: list[Any] = [None]
        error = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # noqa: BLE001 (passed on to the other ranks, then re-raised)
                error = e
                box[0] = ("error", type(e).__name__, str(e.args[0]) if e.args else str(e))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0][0] == "error":
            raise _PLAIN_ERRORS.get(box[0][1], RuntimeError)(f"{box[0][2]} (reported by rank 0)")
        return box[0][1]

    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Give every rank rank 0's values of ``tensors`` (in place)."""
        self._coalesced(tensors, lambda flat: dist.broadcast(flat, src=0))

    def check_same_frozen_weights(self, model: nn.Module) -> None:
        """Refuse to train when the ranks loaded different frozen weights (each would train another model)."""
        self._check_equal(model, lambda p: not p.requires_grad,
                          "the ranks hold different frozen weights (first: {name}); load the same model "
                          "on every rank (seed before building a random one)")

    def check_in_sync(self, model: nn.Module) -> None:
        """Refuse to finish when the trainable weights drifted apart across ranks (a bug, never expected)."""
        self._check_equal(model, lambda p: p.requires_grad,
                          "the ranks' trainable weights diverged during training (first: {name})")

    def _check_equal(self, model: nn.Module, which: Callable[[nn.Parameter], bool], message: str) -> None:
        named = [(n, p) for n, p in model.named_parameters() if which(p) and not _sharded(p)]
        if not named:
            return
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum().to(self.device) for _, p in named])
        sums = torch.nan_to_num(sums, nan=0.0)
        high, low = sums.clone(), sums.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        differ = (high != low).nonzero()
        if len(differ):
            raise RuntimeError(message.format(name=named[int(differ[0])][0]))

    def _coalesced(self, tensors: list[torch.Tensor], op: Callable[[torch.Tensor], Any]) -> None:
        """Run ``op`` on one flat buffer per dtype holding ``tensors``, then copy the results back."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(self.device)
            op(flat)
            offset = 0
            with torch.no_grad():
                for t in group:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def _sharded(x: nn.Module | torch.Tensor) -> bool:
    """Whether a model has FSDP-sharded modules, or a tensor is a shard (each rank holds other values)."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, torch.Tensor):
        return isinstance(x, DTensor)
    return any(isinstance(p, DTensor) for p in x.parameters())


# --------------------------------------------------------------------------------------------
# FSDP2


def shard_frozen(model: nn.Module, device: torch.device) -> None:
    """FSDP2-shard the frozen weights of ``model``'s backbone (each decoder layer, then the rest).

    Trainable parameters, and frozen ones shared with a module outside the backbone (an output head
    tied to the embeddings), are ignored by FSDP: they stay whole on every rank.

    Raises:
        ValueError: Nothing frozen to shard (full fine-tuning), weights FSDP cannot shard
            (bitsandbytes-quantized layers), or a model whose decoder layers cannot be found.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    named = list(model.named_parameters())
    if all(p.requires_grad for _, p in named):
        raise ValueError("strategy='fsdp' shards the frozen base, and every parameter of this model trains "
                         "(full fine-tuning); use strategy='ddp'")
    odd = [(n, p) for n, p in named if not p.requires_grad and type(p) is not nn.Parameter]
    if odd:
        name, p = odd[0]
        raise ValueError(f"strategy='fsdp' cannot shard {name} (a {type(p).__name__}: a quantized base, e.g. "
                         "QLoRA); use strategy='ddp', which keeps the quantized base whole on every rank")
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module):
        prefix, backbone = "", model
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in backbone.modules() if type(m).__name__ in kinds and m is not backbone]
    if not layers:
        raise ValueError(f"strategy='fsdp' shards decoder layers, and {type(model).__name__} names none "
                         f"(_no_split_modules={sorted(kinds)}); use strategy='ddp'")
    inside = f"{prefix}." if prefix else ""
    outside = {p for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(inside)}
    ignored = {p for _, p in named if p.requires_grad} | (set(backbone.parameters()) & outside)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(backbone, mesh=mesh, ignored_params=ignored)
