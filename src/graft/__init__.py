"""graft: parameter-efficient adaptation of pretrained transformers."""

from graft import decode, runtime
from graft.compose.combine import combine
from graft.compose.lorahub import lorahub
from graft.compose.t2l import T2LConfig, TextToLoRA, text_to_lora
from graft.core import (
    Average,
    Parallel,
    Report,
    Stack,
    activate,
    active_adapters,
    attach,
    detach,
    disabled,
    report,
    route,
)
from graft.data import prompting
from graft.io import load, save
from graft.loftq import loftq
from graft.merge import merge, unload, unmerge
from graft.methods.adalora import AdaLoRA
from graft.methods.adapter import Adapter
from graft.methods.bitfit import BitFit
from graft.methods.child import ChildTuning
from graft.methods.ia3 import IA3
from graft.methods.lora import LoRA
from graft.methods.prefix import PrefixTuning
from graft.methods.probe import Probe
from graft.methods.prompt import PromptTuning, PTuning
from graft.methods.relora import ReLoRA
from graft.plan import plan
from graft.quant import prepare_kbit_training

__version__ = "0.1.0"

__all__ = [
    "IA3",
    "AdaLoRA",
    "Adapter",
    "Average",
    "BitFit",
    "ChildTuning",
    "LoRA",
    "PTuning",
    "Parallel",
    "PrefixTuning",
    "Probe",
    "PromptTuning",
    "ReLoRA",
    "Report",
    "Stack",
    "T2LConfig",
    "TextToLoRA",
    "activate",
    "active_adapters",
    "attach",
    "combine",
    "decode",
    "detach",
    "disabled",
    "load",
    "loftq",
    "lorahub",
    "merge",
    "plan",
    "prepare_kbit_training",
    "prompting",
    "report",
    "route",
    "runtime",
    "save",
    "text_to_lora",
    "unload",
    "unmerge",
]
