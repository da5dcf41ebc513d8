"""graft plan: memory sizes as users write them."""

from __future__ import annotations

import math
import re

_UNITS = {"": None, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # ≈ 4.127 bits per weight with double quantisation
NF4_BITS_SINGLE = 4 + 32 / 64  # 4.5 bits without double quantisation
ADAM_8BIT_MIN_SIZE = 4096  # bitsandbytes keeps fp32 states for smaller tensors (min_8bit_size)
ADAM_8BIT_BLOCK = 256  # one fp32 absmax per 256 values and state


def parse_memory(value: str | float) -> int:
    """Bytes in a memory size: ``"24GB"``, ``"16GiB"``, ``"512MB"``, ``"1.5 TB"``; a number is bytes.

    ``KB/MB/GB/TB`` (and ``K/M/G/T``) are powers of 10, ``KiB/MiB/GiB/TiB`` powers of 2.

    Raises:
        ValueError: Text that is not a positive number followed by a known unit.
        TypeError: A boolean.
    """
    if isinstance(value, bool):
        raise TypeError(f"memory={value!r} is not a size; write e.g. '24GB', '16GiB' or '512MB'")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"memory={value!r} must be a positive number of bytes")
        return int(value)
    text = str(value).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)", text)
    unit = match.group(2).lower() if match else ""
    if not match or _UNITS.get(unit) is None:
        if not match:
            why = "it is not a number followed by a unit"
        else:
            why = "it has no unit" if not unit else f"unknown unit {match.group(2)!r}"
        units = ", ".join(u.upper() if "i" not in u else u[0].upper() + "iB" for u in _UNITS if u)
        raise ValueError(f"cannot read memory {value!r}: {why}; write e.g. '24GB', '16GiB' or '512MB' "
                         f"(units: {units})")
    size = float(match.group(1)) * _UNITS[unit]
    if size < 1:
        raise ValueError(f"memory {value!r} must be at least one byte")
    return int(size)


def format_bytes(n: float | None) -> str:
    """``13.5 GB``, ``67.1 MB``, ``812 kB`` (SI units, like the memory budget)."""
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{1 if n / size >= 10 else 2}f} {unit}"
    return f"{int(n)} B"
