"""The invariant matrix of DESIGN.md as one reusable check, run for every method on every tiny model.

1. identity at init   2. a training step changes only the method's tensors   3. merged == unmerged ==
unloaded, merge idempotent (or a clear error for kinds that cannot merge)   4. exact save/load round
trip   5. disabled == base   6. count == closed-form formula

Methods whose nature rules an invariant out say so through the flags (and the matrix test lists
why); everything else is checked exactly or with the stated tolerance.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass

import pytest
import torch
from conftest import FACTORIES, batch_for, logits, perturb_adapters

import graft
from graft.core import adapter_parameters, state_of


@dataclass(frozen=True)
class Expect:
    """Which invariants apply to a method (with the reason in the matrix when one does not)."""

    tol: float = 1e-5               # float-rounding comparisons (merged vs unmerged, reload)
    identity_at_init: bool = True   # False: random init by design (prompt tuning, prefix tuning)
    mergeable: bool = True          # False: graft.merge must raise a clear error instead
    disabled_is_base: bool = True   # False: the method rewrites base tensors by design (PiSSA, OLoRA)
    exact_reload: bool = True       # saved tensors reload bit-identically


def loss_of(model, inputs):
    return model(**inputs).logits.float().pow(2).mean()


def check_invariants(arch: str, method: graft.core.Method, expect: Expect = Expect()) -> None:
    tol = expect.tol
    base_model = FACTORIES[arch]()
    inputs = batch_for(arch)
    base_out = logits(base_model, inputs)
    model = copy.deepcopy(base_model)
    expected_count = method.count(model)
    graft.attach(model, method)

    # 6. trainable count == closed-form formula
    assert graft.report(model).trainable == expected_count

    # 1. identity at init
    if expect.identity_at_init:
        torch.testing.assert_close(logits(model, inputs), base_out, atol=tol, rtol=0)

    # 2. after a real training step only the method's tensors changed
    perturb_adapters(model)
    trained_ids = {id(p) for p in adapter_parameters(model, "default").values()} | {
        id(p) for p in state_of(model).methods["default"].trainable_base_parameters(model, "default").values()}
    trained = {k for k, p in model.named_parameters(remove_duplicate=False) if id(p) in trained_ids}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_of(model, inputs).backward()
    opt.step()
    model.eval()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the training step changed nothing"
    assert changed <= trained, f"non-adapter tensors changed: {sorted(changed - trained)[:5]}"
    assert all(torch.equal(before[k], after[k]) for k in set(before) - trained)

    unmerged = logits(model, inputs)
    assert not torch.allclose(unmerged, base_out, atol=1e-3), "adapter has no effect: the test proves nothing"

    # 5. disabled == base
    if expect.disabled_is_base:
        with graft.disabled(model):
            torch.testing.assert_close(logits(model, inputs), base_out, atol=1e-6, rtol=0)

    # 4. save -> load into a fresh copy of the original base reproduces the outputs
    with tempfile.TemporaryDirectory() as d:
        graft.save(model, d)
        fresh = copy.deepcopy(base_model)
        graft.load(fresh, d)
        torch.testing.assert_close(logits(fresh, inputs), unmerged, atol=tol, rtol=0)
        if expect.exact_reload:
            saved, loaded = graft.io.adapter_tensors(model, "default"), graft.io.adapter_tensors(fresh, "default")
            assert saved.keys() == loaded.keys()
            for k, v in saved.items():
                assert torch.equal(loaded[k], v), k

    # 3. merged == unmerged == unloaded; merge is idempotent; unmerge restores
    if not expect.mergeable:
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            graft.merge(model)
        torch.testing.assert_close(logits(model, inputs), unmerged, atol=0, rtol=0)  # a refused merge changes nothing
        return
    graft.merge(model)
    merged = logits(model, inputs)
    torch.testing.assert_close(merged, unmerged, atol=tol, rtol=0)
    graft.merge(model)
    torch.testing.assert_close(logits(model, inputs), merged, atol=0, rtol=0)
    graft.unmerge(model)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=tol, rtol=0)
    plain = graft.unload(copy.deepcopy(model), merge=True)
    assert not any(isinstance(m, graft.core.AdapterLayer) for m in plain.modules())
    assert not hasattr(plain, graft.core.STATE_ATTR)
    torch.testing.assert_close(logits(plain, inputs), unmerged, atol=tol, rtol=0)
    if expect.disabled_is_base:
        restored = graft.unload(copy.deepcopy(model), merge=False)
        sd = restored.state_dict()
        for k, v in base_model.state_dict().items():
            torch.testing.assert_close(sd[k], v, atol=1e-6, rtol=0)
