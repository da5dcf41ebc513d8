"""TrainConfig.release_cpu_memory: glibc maps large blocks on their own, so freed memory leaves the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import sys, torch
    from graft.train.monitor import map_large_blocks
    def rss_kb():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])
    if sys.argv[1] == "on":
        assert map_large_blocks()
    # 600 blocks of 256 KiB, interleaved with small survivors, then the big ones freed: with glibc's
    # dynamic threshold the first free raises it and later blocks come from the heap, pinned by the survivors
    big, small = [], []
    for _ in range(2):
        b = torch.empty(64 * 1024 * 1024 // 4); b.fill_(1); del b   # a freed 64 MiB block raises the threshold
    for _ in range(600):
        t = torch.empty(64 * 1024); t.fill_(1); big.append(t)
        small.append(torch.ones(8))
    before = rss_kb()
    big.clear()
    print(before - rss_kb())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc behaviour")
def test_freed_large_blocks_leave_the_process_only_with_release_cpu_memory():
    def returned_kb(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    total_kb = 600 * 256
    assert returned_kb("on") > 0.9 * total_kb  # every freed 256 KiB block went back to the OS
    assert returned_kb("off") < 0.5 * total_kb  # glibc's default kept most of them
