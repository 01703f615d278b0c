"""Running the CLI in-process for tests."""

from __future__ import annotations

from click.testing import CliRunner

from core.cli import cli


def invoke(args):
    """``dyngan ARGS`` through click's CliRunner; an uncaught exception (a traceback a user would see) fails."""
    res = CliRunner().invoke(cli, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"uncaught {type(res.exception).__name__}: {res.exception}\n{res.output}")
    return res


def assert_clean_error(res, code=2, *needles):
    """``res`` (an ``invoke`` result) failed with ``code`` and one ``Error: ...`` line holding every needle."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    return err


def resign_checkpoint(jpath, tensors=None, blob=None, **meta_changes):
    """Replace the tensor file of the checkpoint whose JSON is ``jpath`` (with ``tensors``, or the raw
    ``blob``) and make the JSON's size and sha256 match it, plus ``meta_changes``: a checkpoint that
    verifies but whose contents were edited."""
    import hashlib
    import json

    from safetensors.torch import save

    from core import checkpoint as ckpt_io

    meta = json.loads(jpath.read_text())
    if tensors is not None:
        blob = save(tensors, metadata={"format": ckpt_io.FORMAT, "step": str(meta["step"])})
    if blob is not None:
        jpath.with_suffix(".safetensors").write_bytes(blob)
        meta.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    meta.update(meta_changes)
    jpath.write_text(json.dumps(meta))


def tiny_run(out, steps, n=500, **settings):
    """Train a tiny grid25 run into ``out`` (CPU, one thread, no pictures, one checkpoint at the
    end unless ``settings`` say otherwise); returns ``out``."""
    import pytest

    from core import api

    cfg = {"dataset": "grid25", "steps": steps, "seed": 0, "device": "cpu", "threads": 1, "log_every": steps,
           "eval_every": 0, "checkpoint_every": steps, "options": {"dataset": {"n": n}}, "out": str(out)}
    cfg.update(settings)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNGAN_NO_PICTURES", "1")
        api.train(cfg, quiet=True)
    return out


def run_settings(base, out, steps, **extra):
    """``base`` (train settings) with its own copy of the component options, ``steps`` and ``out``,
    then ``extra``."""
    s = {**base, "options": {k: dict(v) for k, v in base.get("options", {}).items()}, "steps": steps,
         "out": str(out)}
    s.update(extra)
    return s


def checkpoint_tensors(run, step):
    """The tensors of ``run``'s checkpoint at ``step``."""
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{step:08d}.safetensors"))


def same_tensors(a, b):
    """Whether two checkpoints' tensors are the same names and bit-identical values."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resume_as_old_run(run, key, step, into, **settings):
    """Copy ``run`` (finished at ``step``) to ``into`` without its checkpoint at ``step`` and
    without ``key`` in its config.json (a run from before that setting existed), then resume it to
    ``step`` with ``settings``; returns ``into``."""
    import json
    import shutil

    from core import api

    shutil.copytree(run, into)
    for p in (into / "checkpoints").glob(f"step-{step:08d}.*"):
        p.unlink()
    cfg = json.loads((into / "config.json").read_text())
    del cfg[key]
    (into / "config.json").write_text(json.dumps(cfg))
    api.train({"out": str(into), **settings}, resume=True, quiet=True)
    return into
