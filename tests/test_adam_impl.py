"""``--adam-impl``: which of torch's Adam kernels a run steps with (fused by default), that the
three agree up to rounding, and that runs written before the setting existed resume exactly as
they were trained (tensor by tensor)."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import checkpoint_tensors, invoke, resume_as_old_run, run_settings, same_tensors
from core import api
from core import checkpoint as ckpt_io
from core.plugins import get_host
from core.training import Trainer, make_adam

BASE = {"dataset": "grid25", "seed": 5, "device": "cpu", "log_every": 10, "eval_every": 0,
        "checkpoint_every": 20, "threads": 1, "options": {"dataset": {"n": 1000}}}


def settings(out, steps=40, **extra):
    return run_settings(BASE, out, steps, **extra)


checkpoint, same = checkpoint_tensors, same_tensors


def trainer(tmp_path, **extra):
    host = get_host()
    cfg, run_dir = api.prepare(settings(tmp_path / "r", **extra), host=host)
    return Trainer(cfg, host.registry, run_dir, quiet=True)


@pytest.mark.parametrize("impl, fused, foreach", [("fused", True, None), ("foreach", None, True),
                                                   ("loop", None, False)])
def test_each_choice_builds_that_kind_of_adam(tmp_path, impl, fused, foreach):
    tr = trainer(tmp_path, adam_impl=impl)
    for opt in (tr.opt_g, tr.opt_d):
        group = opt.param_groups[0]
        assert bool(group.get("fused")) == bool(fused) and group.get("foreach") == foreach
    assert tr.cfg["adam_impl"] == impl


def test_fused_is_the_default_and_is_recorded(tmp_path):
    tr = trainer(tmp_path)
    assert tr.cfg["adam_impl"] == "fused" and tr.opt_g.param_groups[0]["fused"] is True


def test_the_three_kernels_take_the_same_steps_up_to_rounding():
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 32, generator=gen), torch.randn(32, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(50)]
    finals = {}
    for impl in ("fused", "foreach", "loop"):
        params = [p.clone().requires_grad_() for p in start]
        opt, note = make_adam(params, impl, 1e-3, (0.5, 0.999))
        assert note is None
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        finals[impl] = [p.detach() for p in params]
    for impl in ("foreach", "loop"):
        for a, b in zip(finals["fused"], finals[impl]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = [(f - s).abs().max() for f, s in zip(finals["fused"], start)]
    assert all(m > 1e-3 for m in moved)  # 50 steps of lr 1e-3 moved every tensor


def test_a_device_without_the_fused_kernel_falls_back_to_foreach(monkeypatch):
    real = torch.optim.Adam

    class NoFused(real):
        def __init__(self, params, **kw):
            if kw.get("fused"):
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors "
                                   "of supported devices: ['cuda', 'cpu']\nmore")
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", NoFused)
    opt, note = make_adam([torch.zeros(3, requires_grad=True)], "fused", 1e-3, (0.5, 0.999))
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0].get("fused")
    assert "using foreach" in note and "supported devices" in note and "\n" not in note
    with pytest.raises(RuntimeError):  # a failure of the other kinds is not hidden
        NoFused.__init__ = lambda self, params, **kw: (_ for _ in ()).throw(RuntimeError("boom"))
        make_adam([torch.zeros(3, requires_grad=True)], "loop", 1e-3, (0.5, 0.999))


def test_a_fused_run_resumes_bit_exact(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    api.train(settings(whole), quiet=True)
    api.train(settings(cut, steps=20), quiet=True)
    api.train(settings(cut), resume=True, quiet=True)
    assert same(checkpoint(whole, 40), checkpoint(cut, 40))


def test_a_run_from_before_the_setting_resumes_with_the_loop_it_trained_with(tmp_path):
    """Such a run's config.json has no adam_impl; it trained with torch's per-tensor CPU step."""
    whole = tmp_path / "whole"
    api.train(settings(whole, adam_impl="loop"), quiet=True)
    old = resume_as_old_run(whole, "adam_impl", 40, tmp_path / "old", threads=1)
    assert same(checkpoint(whole, 40), checkpoint(old, 40))
    assert "adam_impl" not in json.loads((old / "config.json").read_text())  # the record is left as it was
    fused = tmp_path / "fused"  # and the default would not have given those steps
    api.train(settings(fused), quiet=True)
    assert not same(checkpoint(whole, 40), checkpoint(fused, 40))


def test_resume_may_change_the_kernels_for_that_invocation_only(tmp_path):
    run = tmp_path / "r"
    api.train(settings(run, steps=20), quiet=True)
    api.train({"out": str(run), "steps": 40, "adam_impl": "loop"}, resume=True, quiet=True)
    assert json.loads((run / "config.json").read_text())["adam_impl"] == "fused"
    assert ckpt_io.list_checkpoints(run / "checkpoints")[-1][0] == 40
    ref = tmp_path / "ref"  # the fused checkpoint's state loaded into a loop Adam and stepped on
    api.train(settings(ref, steps=20), quiet=True)
    api.train({"out": str(ref), "steps": 40}, resume=True, quiet=True)
    a, b = checkpoint(run, 40), checkpoint(ref, 40)
    for k in a:  # the same training, rounded differently
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_a_bad_choice_is_a_clean_error(tmp_path):
    res = invoke(["train", "--out", str(tmp_path / "r"), "--adam-impl", "sgd", "--steps", "2"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "Invalid value for '--adam-impl': 'sgd' is not one of 'fused', 'foreach', 'loop'" in res.stderr
    assert not (tmp_path / "r").exists()
    with pytest.raises(Exception, match="adam_impl"):
        api.train(settings(tmp_path / "s", adam_impl="apex"), quiet=True)
    assert not (tmp_path / "s").exists()
