"""``graft plan``: what fits, what it costs, and which method to use, before loading any weights.

The model's architecture is built on the meta device (shapes only, no memory) from a preset, a
local ``config.json`` or a built-in model name. Each method is *attached* to that meta model, so
its trainable-parameter count is exactly what ``graft.attach`` gives (and therefore peft's). Memory
is then derived from the shapes:

* **weights**: every base parameter in the planning dtype. QLoRA follows ``graft.quant``: every
  ``nn.Linear`` but the output head in NF4 with double quantisation, 4 bits + an 8-bit absmax per
  64 weights + an fp32 absmax per 256 blocks = 4 + 8/64 + 32/16384 ≈ 4.127 bits/weight (Dettmers
  et al. 2023, §3); ``prepare_kbit_training`` then keeps everything else (embeddings, head, norms,
  biases) in fp32, so its residual stream, and its activations, are fp32 whatever the compute
  dtype. Adapter parameters are fp32 when the base is 16-bit (graft's adapters always are).
* **gradients**: one per trainable parameter, in its dtype.
* **optimizer**: AdamW keeps two fp32 moments (8 bytes/param); bitsandbytes' 8-bit AdamW keeps two
  uint8 moments with an fp32 absmax per 256 values (≈ 2.03 bytes/param; tensors under 4,096
  values stay fp32, as bitsandbytes does). Decision: full fine-tuning of a 16-bit model is planned
  as mixed precision (Micikevicius et al. 2018; ZeRO's K = 12): 16-bit weights and gradients plus an
  fp32 master copy (4 bytes/param, counted as optimizer state) and fp32 moments, 16 bytes/param in
  all, the same total as graft's ``autocast`` on fp32 weights (4 + 4 + 8). Pure 16-bit AdamW
  states are not planned: they lose the small updates.
* **activations**: what autograd saves for backward, walked op by op through each block's dataflow
  for the family (Llama-like, GPT-2, BERT; :class:`_Trace` states the rules), with the method's
  adapter layers read off the attached meta model, plus what lives outside the blocks. The walk
  equals, byte for byte, what autograd keeps on real tiny models (``tests/test_plan.py`` records
  every saved tensor with ``saved_tensors_hooks``). graft's trainer computes the LM head on supervised
  positions only, ``logits_chunk`` rows at a time under checkpointing, so instead of
  batch x seq x vocab logits the head holds at most one (chunk, vocab) block: its fp32
  log-softmax and two fp32 gradients of that size in backward (12 bytes x chunk x vocab). With
  gradient checkpointing each block keeps only its input and one block is recomputed at a time.
  Attention is planned as a fused kernel (PyTorch SDPA flash / memory-efficient): q, k, v, the
  output and a log-sum-exp are saved, never the (heads x seq x seq) scores; except on CPU with
  attention dropout (GPT-2, BERT), where SDPA falls back to the math kernel and keeps them (and
  CPU dropout keeps float masks where CUDA keeps 1-byte ones). Rows are full length (packed,
  no padding mask), every position supervised (the worst case for the head).
* **peak**: gradients are not alive during the forward pass, so the total is the larger of two
  moments: the start of backward (weights + optimizer state + stored activations + the loss head's
  transient + the head's gradient if it trains) and the optimizer step (weights + gradients +
  optimizer state + the step's temporaries: on CUDA torch's foreach AdamW holds one fp32 copy of
  the trainable parameters; on CPU the single-tensor path two copies of the largest one).

``fits`` compares that peak plus ``reserve`` (the runtime: CUDA context, allocator slack; default
1 GB on CUDA, 0 on CPU) with the memory budget. Memory strings use SI units (``GB`` = 10^9 bytes)
and binary ones (``GiB`` = 2^30). Calibration against measured peaks (SmolLM2-135M on CPU, full,
LoRA and QLoRA at two lengths): ``benchmarks/plan_calibration.py``.

Example:
    >>> p = graft.plan("llama-2-7b", memory="24GB", seq_len=512, goal="instructions")
    >>> print(p)              # the table and the recommendation
    >>> p.to_json()           # one dict per method
    >>> p.plot("plan.png")    # stacked bars of the memory breakdown
"""

from graft.plan.advice import recommend
from graft.plan.architectures import PRESETS, build_meta, load_config
from graft.plan.estimate import Estimate
from graft.plan.planner import Plan, plan
from graft.plan.settings import DTYPES, GOALS, ROWS, Recommendation
from graft.plan.sizes import format_bytes, parse_memory

# The package is split by concern: sizes, settings, architectures (meta models), trace (what autograd
# saves), estimate (one method's row), advice (the recommendation), render (table, plot), planner.
__all__ = ["DTYPES", "GOALS", "PRESETS", "ROWS", "Estimate", "Plan", "Recommendation", "build_meta", "format_bytes",
           "load_config", "parse_memory", "plan", "recommend"]
