"""graft: parameter-efficient adaptation of pretrained transformers."""

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
from graft.io import load, save
from graft.merge import merge, unload, unmerge
from graft.methods.adapter import Adapter
from graft.methods.bitfit import BitFit
from graft.methods.child import ChildTuning
from graft.methods.ia3 import IA3
from graft.methods.lora import LoRA
from graft.methods.prefix import PrefixTuning
from graft.methods.probe import Probe
from graft.methods.prompt import PromptTuning, PTuning

__version__ = "0.1.0"

__all__ = [
    "IA3",
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
    "Report",
    "Stack",
    "activate",
    "active_adapters",
    "attach",
    "detach",
    "disabled",
    "load",
    "merge",
    "report",
    "route",
    "save",
    "unload",
    "unmerge",
]
