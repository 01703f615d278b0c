"""The generator's weight average (``--g-ema``): the update rule, checkpoints and exact
resume, which weights ``sample`` / ``evaluate`` use, and bad values."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import invoke
from core import api
from core import checkpoint as ckpt_io
from core.errors import UsageError
from core.plugins import get_host
from core.training import EMA_PREFIX, Trainer

BASE = {"dataset": "grid25", "seed": 3, "device": "cpu", "log_every": 10, "eval_every": 0,
        "checkpoint_every": 20, "options": {"dataset": {"n": 1000}}}


def settings(out, steps=40, **extra):
    s = {**BASE, "options": {k: dict(v) for k, v in BASE["options"].items()}, "steps": steps, "out": str(out)}
    s.update(extra)
    return s


def latest(run):
    step = ckpt_io.list_checkpoints(run / "checkpoints")[-1][0]
    return load_file(str(run / "checkpoints" / f"step-{step:08d}.safetensors"))


def test_update_rule_with_warm_up(tmp_path):
    host = get_host()
    cfg, run_dir = api.prepare(settings(tmp_path / "r", g_ema=0.9), host=host)
    tr = Trainer(cfg, host.registry, run_dir, quiet=True)
    assert tr.G_ema is not None and tr.sampling_generator is tr.G_ema
    assert all(not p.requires_grad for p in tr.G_ema.parameters())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in list(tr.G.parameters()) + list(tr.G_ema.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
    g0 = [p.clone() for p in tr.G.parameters()]
    e0 = [p.clone() for p in tr.G_ema.parameters()]
    for step, d in ((0, 1 / 10), (5, 6 / 15), (1000, 0.9)):  # min(0.9, (1+t)/(10+t))
        tr.step = step
        before = [p.clone() for p in tr.G_ema.parameters()]
        tr._ema_update()
        for b, g, e in zip(before, g0, tr.G_ema.parameters()):
            torch.testing.assert_close(e, d * b + (1 - d) * g)
    assert not any(torch.equal(a, b) for a, b in zip(e0, tr.G_ema.parameters()))
    for g, p in zip(g0, tr.G.parameters()):  # G itself is untouched
        assert torch.equal(g, p)


def test_off_by_default_and_ema_is_refused_for_such_a_run(tmp_path):
    out = tmp_path / "plain"
    api.train(settings(out, steps=20), quiet=True)
    assert not any(k.startswith(EMA_PREFIX) for k in latest(out))
    assert api.evaluate(out, n=200)["generator"] == "raw"
    with pytest.raises(UsageError, match="--g-ema"):
        api.sample(out, 10, generator="ema")
    res = invoke(["evaluate", str(out), "--generator", "ema"])
    assert res.exit_code == 2 and "--g-ema" in res.output and "Traceback" not in res.output


def test_average_is_checkpointed_and_resumes_exactly(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    api.train(settings(straight, g_ema=0.95), quiet=True)
    api.train(settings(stopped, steps=20, g_ema=0.95), quiet=True)
    api.train({"out": str(stopped), "steps": 40}, resume=True, quiet=True)
    a, b = latest(straight), latest(stopped)
    ema_keys = [k for k in a if k.startswith(EMA_PREFIX)]
    assert ema_keys and sorted(ema_keys) == sorted(k for k in b if k.startswith(EMA_PREFIX))
    for k in ema_keys:
        assert torch.equal(a[k], b[k]), k
        # the average lags the trained weights: it is a different tensor
        assert not torch.equal(a[k], a["G/" + k[len(EMA_PREFIX):]]), k


def test_sample_and_evaluate_use_the_average_unless_told(tmp_path):
    out = tmp_path / "r"
    api.train(settings(out, steps=30, g_ema=0.9), quiet=True)
    auto, ema, raw = (api.sample(out, 64, seed=1, generator=g) for g in ("auto", "ema", "raw"))
    assert (auto == ema).all() and not (auto == raw).all()
    assert api.evaluate(out, n=300)["generator"] == "ema"
    assert api.evaluate(out, n=300, generator="raw")["generator"] == "raw"
    res = invoke(["evaluate", str(out), "--n", "300", "--json", "--generator", "raw"])
    assert res.exit_code == 0 and json.loads(res.output)["generator"] == "raw"
    res = invoke(["sample", str(out), "--n", "5", "--out", str(tmp_path / "s.npy"), "--generator", "nope"])
    assert res.exit_code == 2


@pytest.mark.parametrize("value", ["1", "-0.1", "abc", "1.5"])
def test_bad_values_exit_2_without_a_run(tmp_path, value):
    out = tmp_path / "r"
    res = invoke(["train", "--steps", "2", "--g-ema", value, "--out", str(out), "-q"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not out.exists()


def test_config_file_and_resolved_value(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("g_ema = 0.999\nsteps = 5\n")
    cfg = api.resolve_settings({"config": str(toml)})
    assert cfg["g_ema"] == 0.999
    assert api.resolve_settings({})["g_ema"] == 0.0
