"""How long Text-to-LoRA takes to write one adapter from a description (issue 19: under 1 s on this CPU).

    python benchmarks/t2l_speed.py --hypernet t2l/ [--threads 1] [--reps 10]

Times ``TextToLoRA.generate_one`` (sentence embedding + the hypernetwork's forward for every module)
on ten different descriptions after one warm-up, in one process, with the sentence encoder already
loaded (as `graft t2l generate` and the server do: both load it once), and separately the embedding
alone. Writing the PEFT files is not timed (a disk write, the same as for any adapter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

DESCRIPTIONS = [
    "Translate English sentences to Spanish.", "Decide whether a movie review is positive or negative.",
    "Write the number in words.", "Answer with the larger of the two animals.",
    "Give the second letter of the word.", "Classify the stereotype in the sentence as race, gender or religion.",
    "Pick the word that does not belong with the others.", "Write a Jeopardy answer for the clue.",
    "Say whether the reply implies yes or no.", "Turn the command into a sequence of actions.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hypernet", required=True, help="a directory written by `graft t2l train`")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    import torch

    from graft.compose.t2l import TextToLoRA

    torch.set_num_threads(args.threads)
    net = TextToLoRA.load(args.hypernet)
    net.generate_one("warm-up")
    total, embed = [], []
    for i in range(args.reps):
        text = DESCRIPTIONS[i % len(DESCRIPTIONS)]
        t0 = time.perf_counter()
        net.embed([text])
        embed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        factors = net.generate_one(text)
        total.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in net.parameters())
    print(f"hypernetwork {params / 1e6:.1f}M parameters, {len(factors)} modules, rank {net.config.r}; "
          f"{args.threads} thread(s); load average {os.getloadavg()[0]:.1f}")
    print(f"generate_one: median {statistics.median(total) * 1000:.0f} ms, min {min(total) * 1000:.0f} ms, "
          f"max {max(total) * 1000:.0f} ms over {args.reps} descriptions; "
          f"of which embedding median {statistics.median(embed) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
