"""What ``TrainConfig(release_cpu_memory=True)`` costs and saves: peak RSS and time of the same LoRA run.

    .venv/bin/python benchmarks/release_memory.py              # 2 rounds, each run its own process
    .venv/bin/python benchmarks/release_memory.py --rounds 3

SmolLM2-135M, LoRA r=16 alpha=32 all-linear, 6 steps of 4 rows x 512 random tokens (every position
supervised), fp32, 2 threads; the runs alternate off/on so drift in the machine's speed hits both.
Reported per run: wall time of ``train`` and the process's peak RSS (VmHWM, loading included).
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(release: bool) -> dict:
    import torch

    import graft
    from graft import models
    from graft.train import TrainConfig, train
    from graft.train.monitor import map_large_blocks, peak_memory_mb

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if release:
        map_large_blocks()  # before loading, as graft train --release-cpu-memory does
    model, _ = models.load("smollm2-135m")
    graft.attach(model, graft.LoRA(r=16, alpha=32, targets="all-linear"))
    rows = []
    for _ in range(24):
        ids = torch.randint(0, model.config.vocab_size, (512,))
        rows.append({"input_ids": ids, "labels": ids})

    def collate(batch: list[dict]) -> dict:
        return {k: torch.stack([r[k] for r in batch]) for k in ("input_ids", "labels")}

    t0 = time.perf_counter()
    train(model, rows, collate, TrainConfig(max_steps=6, batch_size=4, progress=False, release_cpu_memory=release))
    return {"release": release, "seconds": time.perf_counter() - t0, "peak_mb": peak_memory_mb()["vm_hwm_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child == "on")))
        return
    runs = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
            r = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
            runs[mode].append(r)
            print(f"release_cpu_memory={mode:<3}  {r['seconds']:6.1f} s  peak RSS {r['peak_mb']:7.0f} MB", flush=True)
    mean = {m: {k: sum(r[k] for r in rs) / len(rs) for k in ("seconds", "peak_mb")} for m, rs in runs.items()}
    print(f"\non/off: time {mean['on']['seconds'] / mean['off']['seconds']:.2f}x, "
          f"peak RSS {mean['on']['peak_mb'] / mean['off']['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
