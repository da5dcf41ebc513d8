"""graft: parameter-efficient adaptation of pretrained transformers."""

from graft.core import Average, Parallel, Report, Stack, activate, active_adapters, attach, detach, disabled, report, route
from graft.io import load, save
from graft.merge import merge, unload, unmerge
from graft.methods.lora import LoRA

__version__ = "0.1.0"

__all__ = [
    "Average",
    "Parallel",
    "Stack",
    "LoRA",
    "Report",
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
