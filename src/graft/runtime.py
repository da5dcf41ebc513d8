"""Where a model runs and in what precision: one choice, made the same way by every verb.

``resolve(device, dtype)`` turns the user's words (``auto``, ``cuda:1``, ``bf16``...) and the
facts of the machine into a :class:`Choice`: the device, the dtype the weights are held in and the
dtype ``torch.autocast`` computes in (if any). It is a pure function of its arguments: the
hardware facts are passed in (:func:`detect` reads them from this machine), so every branch can be
tested on any machine.

``auto`` means:

* device: the first CUDA device when one is visible, else the CPU;
* on a GPU: bf16 where the GPU supports it (compute capability >= 8.0), else fp16; the frozen
  base is held in that dtype and the step runs under autocast, while trainable tensors (adapters,
  and every weight in full fine-tuning) stay fp32, so updates accumulate in fp32;
* on a CPU with AVX512-BF16 or AMX: fp32 weights and bf16 autocast when training (the matmuls run
  in bf16 on the CPU's bf16 units, gradients and adapter updates stay fp32); fp32 for inference
  (autocast would recast every weight for every generated token; ``dtype="bf16"`` gives bf16
  weights);
* fp32 elsewhere (a CPU without bf16 units would only emulate 16-bit arithmetic, slower than fp32).

Example:
    >>> choice = resolve("auto", "auto", training=True)
    >>> choice.describe()
    'device cpu, dtype fp32 weights + bf16 autocast (CPU has AVX512-BF16)'
"""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEVICES", "DTYPES", "Choice", "Hardware", "announce", "detect", "resolve"]

#: The words ``--dtype`` accepts, and the torch dtype of each.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: The words ``--device`` accepts (plus ``cuda:N``).
DEVICES = ("auto", "cpu", "cuda")
_CUDA_N = re.compile(r"cuda:(\d+)")
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}


@dataclass(frozen=True)
class Hardware:
    """What this machine offers, as far as precision goes.

    Attributes:
        cuda_capabilities: The (major, minor) compute capability of each visible CUDA device.
        cpu_bf16: The CPU has bf16 units (AVX512-BF16 or AMX-BF16).
        cpu_fp16: The CPU has fp16 units (AMX-FP16).
        cpu_feature: The name of the CPU feature behind ``cpu_bf16`` (for the start-up line).
    """

    cuda_capabilities: tuple[tuple[int, int], ...] = ()
    cpu_bf16: bool = False
    cpu_fp16: bool = False
    cpu_feature: str = ""


@dataclass(frozen=True)
class Choice:
    """The resolved device and precision.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        param_dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype the (frozen) weights are held in.
        autocast_dtype: The dtype ``torch.autocast`` computes in, or ``None`` for no autocast.
        reason: Why, in a few words (for the start-up line).
    """

    device: str
    param_dtype: str
    autocast_dtype: str | None
    reason: str

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the weights."""
        return DTYPES[self.param_dtype]

    @property
    def compute_dtype(self) -> str:
        """The dtype matmuls run in: the autocast dtype, else the weights'."""
        return self.autocast_dtype or self.param_dtype

    def describe(self) -> str:
        """``device cpu, dtype fp32 weights + bf16 autocast (CPU has AVX512-BF16)``."""
        if self.autocast_dtype is None:
            dtype = self.param_dtype
        elif self.autocast_dtype == self.param_dtype:
            dtype = f"{self.param_dtype} weights + {self.autocast_dtype} autocast, trainable weights fp32"
        else:
            dtype = f"{self.param_dtype} weights + {self.autocast_dtype} autocast"
        return f"device {self.device}, dtype {dtype} ({self.reason})"


def detect() -> Hardware:
    """The facts of this machine: CUDA devices and their capabilities, and the CPU's bf16/fp16 units."""
    caps: tuple[tuple[int, int], ...] = ()
    if torch.cuda.is_available():
        caps = tuple(tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count()))
    flags = _cpu_flags()
    avx512_bf16 = _torch_cpu("_is_avx512_bf16_supported", "avx512_bf16" in flags)
    amx = _torch_cpu("_is_amx_tile_supported", "amx_bf16" in flags)
    amx_fp16 = _torch_cpu("_is_amx_fp16_supported", "amx_fp16" in flags)
    feature = "AMX" if amx else "AVX512-BF16" if avx512_bf16 else ""
    return Hardware(cuda_capabilities=caps, cpu_bf16=amx or avx512_bf16, cpu_fp16=amx_fp16, cpu_feature=feature)


def _torch_cpu(name: str, fallback: bool) -> bool:
    """torch's own check (private helpers, the ones the training loop asks); the cpuinfo flag without it."""
    check = getattr(torch.cpu, name, None)
    return bool(check()) if check is not None else fallback


def _cpu_flags() -> set[str]:
    """The ``flags`` of /proc/cpuinfo (Linux x86); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def check_words(device: str, dtype: str) -> tuple[str, str]:
    """Normalise and check ``device`` / ``dtype`` words (no hardware needed); return them."""
    if not isinstance(device, str) or (device not in DEVICES and not _CUDA_N.fullmatch(device)):
        raise ValueError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N")
    dtype = _DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return device, dtype


def resolve(device: str = "auto", dtype: str = "auto", *, training: bool = False, full: bool = False,
            hardware: Hardware | None = None) -> Choice:
    """Choose the device and precision.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (``float32``-style names are accepted).
        training: The model is trained (a CPU then keeps fp32 weights under 16-bit autocast).
        full: Every weight is trained (full fine-tuning): weights stay fp32 on every device, and
            16-bit precision is autocast only.
        hardware: The machine's facts; default :func:`detect`.

    Returns:
        The choice, with the reason it was made.

    Raises:
        ValueError: An unknown word, a CUDA device that is not there, or a 16-bit dtype the
            hardware lacks for training (it would be emulated, slower than fp32).
    """
    device, dtype = check_words(device, dtype)
    hw = detect() if hardware is None else hardware
    where = _device(device, hw)
    if where == "cpu":
        return _cpu(dtype, training, full, hw)
    index = int(where.partition(":")[2] or 0)
    major, minor = hw.cuda_capabilities[index]
    bf16_ok = major >= 8
    if dtype == "auto":
        dtype = "bf16" if bf16_ok else "fp16"
        reason = f"GPU compute capability {major}.{minor}" + (" supports bf16" if bf16_ok else " lacks bf16")
    else:
        if dtype == "bf16" and not bf16_ok:
            raise ValueError(f"dtype='bf16': this GPU (compute capability {major}.{minor}) does not support bf16; "
                             "use fp16 or fp32")
        reason = "asked for"
    if dtype == "fp32":
        return Choice(where, "fp32", None, reason)
    if not training:
        return Choice(where, dtype, None, reason)
    # The frozen base in 16 bits; autocast runs the fp32 trainable tensors' matmuls in 16 bits too.
    return Choice(where, "fp32" if full else dtype, dtype, reason + ("; full fine-tuning keeps fp32 weights" if full else ""))


def _device(device: str, hw: Hardware) -> str:
    count = len(hw.cuda_capabilities)
    if device == "auto":
        return "cuda" if count else "cpu"
    if device == "cpu":
        return "cpu"
    if not count:
        raise ValueError(f"device={device!r}: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "use cpu or auto")
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise ValueError(f"device={device!r}: there {'is' if count == 1 else 'are'} only {count} CUDA device(s) "
                         f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    return device


def _cpu(dtype: str, training: bool, full: bool, hw: Hardware) -> Choice:
    units = {"bf16": hw.cpu_bf16, "fp16": hw.cpu_fp16}
    if dtype == "auto":
        if not hw.cpu_bf16:
            return Choice("cpu", "fp32", None, "CPU without bf16 units (AVX512-BF16 / AMX)")
        if not training:
            # Autocast recasts every frozen fp32 weight on every forward (its cast cache keeps only
            # tensors that require grad): per generated token, a full copy of the model. bf16 weights
            # would avoid that but answer differently from the fp32 weights the adapter was trained
            # against; --dtype bf16 asks for them.
            return Choice("cpu", "fp32", None, "inference on a CPU; --dtype bf16 for bf16 weights")
        dtype, reason = "bf16", f"CPU has {hw.cpu_feature or 'bf16 units'}"
    elif dtype == "fp32":
        return Choice("cpu", "fp32", None, "asked for")
    else:
        reason = "asked for"
        if training and not units[dtype]:
            need = "AVX512-BF16 or AMX" if dtype == "bf16" else "AMX-FP16"
            raise ValueError(f"dtype={dtype!r} for training on this CPU: it lacks {need}, so {dtype} would be "
                             "emulated and slower than fp32; use fp32 or auto")
        if not units[dtype]:
            reason = f"asked for; this CPU emulates {dtype}"
    if training:
        # fp32 weights, 16-bit matmuls: the gradients and the adapter (or full) updates stay fp32.
        return Choice("cpu", "fp32", dtype, reason)
    return Choice("cpu", dtype, None, reason)


def announce(choice: Choice, verb: str = "graft") -> None:
    """The start-up line on stderr: ``graft: device cpu, dtype fp32 weights + bf16 autocast (...)``."""
    print(f"{verb}: {choice.describe()}", file=sys.stderr, flush=True)


def autocast(choice: Choice) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for the choice (a null context without autocast)."""
    if choice.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(choice.torch_device.type, dtype=DTYPES[choice.autocast_dtype])


def place(model: torch.nn.Module, choice: Choice) -> torch.nn.Module:
    """Move ``model`` to the choice's device (its dtype is set when it is loaded); return it."""
    if next(model.parameters()).device != choice.torch_device:
        model.to(choice.torch_device)
    return model


def keep_trainable_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Hold every trainable floating-point tensor in fp32, whatever dtype the frozen base is in.

    Updates to a 16-bit tensor are rounded away once they fall below its precision (about 3
    significant digits for bf16); fp32 trainable tensors under autocast are the usual cure
    (Micikevicius et al. 2018, "Mixed Precision Training"). graft's adapters are created in fp32
    already; this covers what the base contributes (a new classification head, BitFit's biases).
    """
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    return model
