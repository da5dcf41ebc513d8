"""bitsandbytes quantized bases (QLoRA, Dettmers et al. 2023; LLM.int8(), Dettmers et al. 2022).

    quantize(model, "nf4")          every nn.Linear but the output head -> bnb Linear4bit (NF4 + DQ)
    quantize(model, "int8")         ... -> bnb Linear8bitLt (LLM.int8(), outlier threshold 6.0)
    prepare_kbit_training(model)    freeze, upcast the small 16-bit params, checkpointing + input grads

4-bit storage (QLoRA §3): W is cut into blocks of 64 consecutive weights; each block keeps its absmax
``c`` and one 4-bit code per weight (NF4: quantiles of N(0, 1); FP4: a 4-bit float), two per byte.
Double quantisation stores the block scales as 8-bit codes (blocks of 256, minus their mean), so a
weight costs 4 + 8/64 + 32/(64*256) = 4.127 bits instead of 4 + 32/64 = 4.5.

Why graft swaps the modules itself instead of loading through transformers' ``BitsAndBytesConfig``:

* it works on any model already in memory (the tiny test models, a GGUF-converted SmolLM2), not only
  through ``from_pretrained``, and it needs no ``accelerate`` (transformers' bnb quantizer does);
* the block size is graft's (64) rather than whatever the installed bitsandbytes defaults to;
* on a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` rewrites its own weight in place on the
  first no-grad eval call (a CPU-only layout with bf16 block scales and no double quantisation). That
  breaks "base weights are bit-identical after training", grows the storage, and makes the weights
  differ from ``dequantize_4bit`` of the stored state. graft switches that repacking off on the
  layers it builds, so the stored form is always the portable one (also what CUDA uses).

The output head (``lm_head``, classifier heads) and embeddings stay in full precision, as in
transformers. GPT-2 ``Conv1D`` layers are not quantized (they would have to be transposed into a
Linear and back on export); quantizing one is an error that says so.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from graft import targets as tg
from graft.options import OptionError


class _KernelHubNotice(logging.Filter):
    """Drops bitsandbytes' notice that it could not fetch an optional CPU kernel from the Hugging Face
    hub (``bitsandbytes/backends/cpu/ops.py``, logged at import on CPUs with AVX512-BF16): graft never
    uses that kernel, and offline it cannot be fetched. Every other message of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# Installed before bitsandbytes is first imported: getLogger hands its module the same logger object.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KernelHubNotice())
from graft.core import STATE_ATTR, set_submodule

__all__ = [
    "BLOCKSIZE", "MODES", "MergeReport", "RequantError", "WeightBytes", "check_mode", "default_compute_dtype",
    "dequantize", "dequantize_model", "is_quantized", "merge_error", "own_memory", "prepare_kbit_training",
    "quantize",
    "quantized_modules", "report_requantization", "requantize", "weight_bytes",
]

logger = logging.getLogger(__name__)

MODES = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # weights per 4-bit block (QLoRA); the nested block scales use blocks of 256
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold on activations (paper §3.2; transformers' default)
_BNB_TYPES = ("Linear4bit", "Linear8bitLt")


def check_mode(mode: str) -> None:
    """Validate a ``quantize`` value and that bitsandbytes can serve it.

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`.
        ImportError: bitsandbytes is not importable (the message names the mode asked for).
    """
    if mode not in MODES:
        raise OptionError(f"{{quantize}} is not supported; allowed values: {', '.join(MODES)} (or {{quantize__none}} "
                          "for full precision)", quantize=mode, quantize__none=None)
    _bnb(mode)


def _bnb(mode: str) -> Any:
    """Import bitsandbytes lazily: it is only needed once a quantized base is asked for."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(
            f"quantize={mode!r} needs bitsandbytes, which cannot be imported ({e}); install it with "
            "`pip install bitsandbytes`, or load the model without quantize (full precision)"
        ) from e
    return bitsandbytes


def default_compute_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 where the hardware computes it natively (QLoRA's choice), else fp32 (fp16 on old GPUs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = [getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.bfloat16 if any(check is not None and check() for check in native) else torch.float32


@dataclass(frozen=True)
class _Settings:
    """One quantization request, validated (the arguments of :func:`quantize`)."""

    mode: str
    compute_dtype: torch.dtype
    double_quant: bool
    int8_threshold: float

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"quantize={self.mode!r} is not supported; allowed values: {', '.join(MODES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant={self.double_quant!r} must be True or False")
        if isinstance(self.int8_threshold, bool) or not (isinstance(self.int8_threshold, (int, float))
                                                         and self.int8_threshold >= 0):
            raise ValueError(f"int8_threshold={self.int8_threshold!r} must be a number >= 0")


# --------------------------------------------------------------------------------------------
# Quantizing a model


def quantize(
    model: nn.Module,
    mode: str = "nf4",
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    modules: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    int8_threshold: float = INT8_THRESHOLD,
) -> nn.Module:
    """Replace linear layers by bitsandbytes quantized ones, in place, on the device they are on.

    Args:
        model: A plain model (quantize before attaching adapters).
        mode: "nf4" or "fp4" (4-bit blocks of 64, ``Linear4bit``) or "int8" (LLM.int8(), ``Linear8bitLt``).
        compute_dtype: 4-bit only: the dtype a layer dequantizes to and multiplies in (input and
            output keep their own dtype). QLoRA uses bf16.
        double_quant: 4-bit only: quantize the block scales too (QLoRA's double quantisation).
        modules: Which layers, as a graft target spec (suffix list or regex); default every
            ``nn.Linear`` except the output head.
        exclude: Layers to keep in full precision, same forms.
        int8_threshold: int8 only: activation columns above this magnitude are multiplied in 16-bit.

    Returns:
        The same model.

    Raises:
        ValueError: An unknown ``mode`` (the allowed values are listed) or setting, or nothing to quantize.
        ImportError: bitsandbytes is not importable.
        TypeError: A selected layer that bitsandbytes cannot quantize (its type is named).
    """
    settings = _Settings(mode, compute_dtype, double_quant, int8_threshold)
    bnb = _bnb(mode)
    for name in _selected(model, mode, modules, exclude):
        set_submodule(model, name, _quantized_linear(bnb, model.get_submodule(name), settings))
    return model


def _selected(model: nn.Module, mode: str, modules: Any, exclude: Any) -> list[str]:
    """Names of the layers to quantize; a selected layer of the wrong kind is an error naming it."""
    if getattr(model, STATE_ATTR, None) is not None:
        raise TypeError(f"cannot quantize {type(model).__name__} to {mode}: it carries graft adapters; quantize the "
                        "base model first, then attach adapters")
    heads = tg.output_head_names(model)
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        chosen = tg.matches(name, modules) if modules is not None else (tg.is_linear(module) and name not in heads)
        if not chosen or tg.matches(name, exclude):
            continue
        if is_quantized(module):
            raise TypeError(f"cannot quantize '{name}' to {mode}: it is already a bitsandbytes {type(module).__name__}")
        if type(module) is not nn.Linear:
            raise TypeError(f"cannot quantize '{name}' ({type(module).__name__}) to {mode}: bitsandbytes "
                            f"{mode} replaces torch.nn.Linear layers only (not embeddings, norms or GPT-2 "
                            "Conv1D); leave it out of `modules` or put it in `exclude`")
        names.append(name)
    if not names:
        why = "no module matches `modules`" if modules is not None else "no nn.Linear layer besides the output head"
        raise ValueError(f"quantize={mode!r}: nothing to quantize in {type(model).__name__}: {why}")
    return names


def _quantized_linear(bnb: Any, linear: nn.Linear, s: _Settings) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized on ``linear``'s device."""
    weight, device = linear.weight.detach(), linear.weight.device
    if device.type == "meta":
        raise ValueError("cannot quantize weights on the meta device; load the real weights first")
    bias = linear.bias is not None
    if s.mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=float(s.int8_threshold), device="meta")
        layer.weight = _int8_param(bnb, weight, device)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=s.compute_dtype,
                                  compress_statistics=s.double_quant, quant_type=s.mode, device="meta")
        # Quantized from the weights in the compute dtype (as from a bf16 checkpoint), so the backward
        # pass dequantizes straight into that dtype instead of into fp32 and then casting.
        source = weight.to(s.compute_dtype).contiguous()
        layer.weight = bnb.nn.Params4bit(source, requires_grad=False, blocksize=BLOCKSIZE,
                                         compress_statistics=s.double_quant, quant_type=s.mode,
                                         module=layer).to(device)  # .to() quantizes
        layer.support_avx512bf16_for_cpu = False  # keep the portable layout (see the module docstring)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer.train(linear.training)


def own_memory(model: nn.Module) -> None:
    """Copy the weights left in full precision out of the checkpoint's memory map (after quantizing).

    transformers maps the safetensors file and its tensors keep the whole mapping alive. After
    quantizing, the embeddings and norms still point into it, so the pages of the fp32 linear weights
    that quantizing read stay resident (about 400-500 MB for SmolLM2) although nothing uses them.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.clone()


def _int8_param(bnb: Any, weight: torch.Tensor, device: torch.device) -> nn.Parameter:
    # Int8Params quantizes when moved off the CPU copy it was built from, also to the CPU itself.
    return bnb.nn.Int8Params(weight.to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False).to(device)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear (checked without importing bitsandbytes)."""
    return type(module).__name__ in _BNB_TYPES


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every bitsandbytes linear in ``model`` (inside adapter layers too)."""
    for name, module in model.named_modules():
        if is_quantized(module):
            yield name, module


# --------------------------------------------------------------------------------------------
# Reading and rewriting quantized weights


def dequantize(module: nn.Module) -> torch.Tensor:
    """The weight a quantized linear multiplies with, as a new fp32 (d_out, d_in) tensor.

    4-bit: ``absmax_b * code[idx]`` per block (after undoing double quantisation of the absmax);
    int8: ``CB * SCB / 127`` per row.
    """
    bnb = _bnb("nf4" if type(module).__name__ == "Linear4bit" else "int8")
    _portable_layout(bnb, module)
    w = module.weight
    if type(module).__name__ == "Linear4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB  # moved to state by the 1st call
    return bnb.functional.int8_vectorwise_dequant(w.data, scb).float()


def _portable_layout(bnb: Any, module: nn.Module) -> None:
    """Undo bitsandbytes' CPU-only repacking of a Linear4bit (a layer graft did not build may have it)."""
    state = getattr(module.weight, "quant_state", None)
    if type(module).__name__ == "Linear4bit":
        module.support_avx512bf16_for_cpu = False
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        inverse = bnb.functional._convert_weight_packed_for_cpu_inverse  # private, but the only inverse
        module.weight.data, module.weight.quant_state = inverse(module.weight.data, state)
        module.quant_state = module.weight.quant_state


class RequantError(NamedTuple):
    """How far a requantized weight is from the exact fp32 weight it was asked to store."""

    max_abs: float
    mean_abs: float
    numel: int
    mean_abs_weight: float  # mean |W| of the exact weight, to read the error against

    @staticmethod
    def combine(errors: list[RequantError]) -> RequantError:
        n = sum(e.numel for e in errors)
        return RequantError(max(e.max_abs for e in errors), sum(e.mean_abs * e.numel for e in errors) / n, n,
                            sum(e.mean_abs_weight * e.numel for e in errors) / n)


def requantize(module: nn.Module, weight: torch.Tensor) -> RequantError:
    """Store ``weight`` (d_out, d_in) in a quantized layer with its own settings; return the rounding error.

    Used by merge and unmerge: dequantize, add the adapter's delta in fp32, requantize. The error
    is also kept on the layer (``graft_requant_error``) for :func:`merge_error` and the merge warning.
    """
    bnb = _bnb("nf4" if type(module).__name__ == "Linear4bit" else "int8")
    _portable_layout(bnb, module)
    old, exact = module.weight, weight.detach().float()
    with torch.no_grad():
        if type(module).__name__ == "Linear4bit":
            module.weight = bnb.nn.Params4bit(
                exact.to(old.quant_state.dtype).contiguous(), requires_grad=False, blocksize=old.blocksize,
                compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                quant_storage=old.quant_storage, module=module).to(old.device)
        else:
            module.weight = _int8_param(bnb, exact, old.device)
            module.state.reset_grads()  # the next call takes CB/SCB from the new weight
        diff = (dequantize(module) - exact).abs()
    error = RequantError(float(diff.max()), float(diff.mean()), diff.numel(), float(exact.abs().mean()))
    module.graft_requant_error = error
    module.graft_requant_reported = False
    return error


@dataclass(frozen=True)
class MergeReport:
    """Requantization error of the latest merge (or unmerge) into each quantized layer, and in total."""

    total: RequantError
    layers: dict[str, RequantError]

    def __str__(self) -> str:
        t = self.total
        return (f"merging into (or unmerging from) a quantized base requantized {len(self.layers)} layer(s) (dequantize, add the "
                f"adapter in fp32, quantize again): the stored weights differ from the exact fp32 W0 + dW by "
                f"max |err| {t.max_abs:.3g}, mean |err| {t.mean_abs:.3g} (mean |W| {t.mean_abs_weight:.3g}). "
                "For an exact merge export a dense model instead (`graft merge --dtype fp32|bf16`); "
                "graft.quant.merge_error(model) gives the per-layer figures")


def merge_error(model: nn.Module) -> MergeReport | None:
    """The requantization error left by merging into quantized layers, or None if none was merged."""
    layers = {name.removesuffix(".base_layer"): m.graft_requant_error
              for name, m in quantized_modules(model) if getattr(m, "graft_requant_error", None) is not None}
    return MergeReport(RequantError.combine(list(layers.values())), layers) if layers else None


def report_requantization(model: nn.Module) -> MergeReport | None:
    """Warn once about the layers requantized since the last report (called by ``graft.merge``)."""
    fresh = [(n, m) for n, m in quantized_modules(model) if getattr(m, "graft_requant_reported", True) is False]
    if not fresh:
        return None
    for name, m in fresh:
        m.graft_requant_reported = True
        err = m.graft_requant_error
        logger.info("requantized %s: max |err| %.3g, mean |err| %.3g", name, err.max_abs, err.mean_abs)
    report = merge_error(model)
    warnings.warn(str(report), stacklevel=3)
    return report


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every bitsandbytes linear by a plain ``nn.Linear`` holding its dequantized weight, in place.

    The result computes what the quantized model computed (up to the compute dtype) and saves as an
    ordinary dense transformers model: the way to export an adapter trained on a quantized base.
    """
    for name, module in list(quantized_modules(model)):
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.weight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(dequantize(module))
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        dense.requires_grad_(False)
        set_submodule(model, name, dense.train(module.training))
    return model


# --------------------------------------------------------------------------------------------
# Memory and training preparation


class WeightBytes(NamedTuple):
    """Bytes of the quantized linear weights as stored, and of the same weights in fp32."""

    quantized: int
    fp32: int

    @property
    def ratio(self) -> float:
        return self.quantized / self.fp32


def weight_bytes(model: nn.Module) -> WeightBytes:
    """Measure the storage of every quantized linear weight from its tensors.

    Counted: the packed codes, the block scales (8-bit codes with double quantisation, else fp32),
    the nested scales and offset, and the code books; a tensor shared by several layers (the 8-bit
    dynamic code book) is counted once. Biases are not weights and are left out.
    """
    seen: dict[tuple[int, int], int] = {}
    fp32 = 0
    for _, module in quantized_modules(model):
        fp32 += module.in_features * module.out_features * 4
        for t in _storage_tensors(module):
            seen[(t.data_ptr(), t.nbytes)] = t.nbytes
    return WeightBytes(sum(seen.values()), fp32)


def _storage_tensors(module: nn.Module) -> list[torch.Tensor]:
    w = module.weight
    if type(module).__name__ == "Linear8bitLt":
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return [w.data, scb]
    qs = w.quant_state
    tensors = [w.data, qs.absmax, qs.code]
    if qs.nested:
        tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def prepare_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Get a quantized base ready for adapter training (peft's ``prepare_model_for_kbit_training`` steps).

    In order: freeze every parameter; cast every fp16/bf16 parameter that is not quantized (norms,
    biases, embeddings, the output head) to fp32, since 16-bit norms and a 16-bit loss head lose the
    small updates an adapter makes; with ``gradient_checkpointing``, turn on non-reentrant activation
    checkpointing and make the input embeddings' output require grad, so the gradient reaches
    adapters inside checkpointed blocks whose input comes from a frozen embedding. Call it before
    ``graft.attach`` (it freezes everything).

    Returns:
        The same model.

    Raises:
        ValueError: The model already carries graft adapters, or cannot checkpoint.
    """
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("prepare_kbit_training freezes every parameter: call it before graft.attach, not after")
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):  # quantized weights are uint8/int8 and stay as they are
            p.data = p.data.float()
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError(f"{type(model).__name__} is not a transformers model that supports gradient "
                             "checkpointing; pass gradient_checkpointing=False")
        if not getattr(model, "_require_grads_hooks", None):  # transformers registers it for text models
            with contextlib.suppress(NotImplementedError):
                model.enable_input_require_grads()
    return model
