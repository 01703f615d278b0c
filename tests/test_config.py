"""Settings resolution: defaults < preset < loss recommendations < config file < flags.

Everything here goes through ``core.api.resolve_settings`` / ``core.config`` (no
training, no files but the TOML ones) and through the CLI's ``--dry-run``.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from core.api import resolve_settings
from core.cli import cli
from core.config import DEFAULTS, FALLBACK_OPTIMIZER, MAX_SEED, parse_option_flags
from core.errors import OptionError, UnknownComponentError, UsageError


def _write_toml(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _dry_run(args):
    res = CliRunner().invoke(cli, ["train", "--dry-run", *args])
    return res


# ------------------------------------------------------------------ defaults


def test_defaults_fill_every_setting():
    cfg = resolve_settings({})
    assert cfg["dataset"] == "grid25"
    assert cfg["loss"] == "ns"
    assert cfg["model"] == "mlp"  # the dataset's default model
    assert cfg["steps"] == DEFAULTS["steps"]
    assert cfg["batch_size"] == DEFAULTS["batch_size"]
    assert cfg["detector"] is None and cfg["partitioner"] is None and cfg["conditioner"] is None
    # ns recommends no optimiser: the fallback applies
    assert cfg["lr_g"] == FALLBACK_OPTIMIZER["lr_g"]
    assert cfg["lr_d"] == FALLBACK_OPTIMIZER["lr_d"]
    assert list(cfg["betas"]) == list(FALLBACK_OPTIMIZER["betas"])
    # every option of every chosen component is resolved to a value
    assert cfg["options"]["dataset"]["n"] == 100_000
    assert cfg["options"]["model"]["z_dim"] == 50
    assert set(cfg["options"]) == {"dataset", "model", "loss", "metric"}
    json.dumps(cfg)  # plain JSON


# ------------------------------------------------------------------ TOML file vs flags


def test_config_file_over_defaults_and_flags_over_file(tmp_path):
    f = _write_toml(tmp_path / "c.toml", """
steps = 123
batch_size = 64
lr_g = 0.005
seed = 9

[options.dataset]
n = 500
sigma = 0.2
""")
    cfg = resolve_settings({"config": f})
    assert (cfg["steps"], cfg["batch_size"], cfg["lr_g"], cfg["seed"]) == (123, 64, 0.005, 9)
    assert cfg["options"]["dataset"]["n"] == 500
    assert cfg["options"]["dataset"]["sigma"] == 0.2
    assert cfg["lr_d"] == FALLBACK_OPTIMIZER["lr_d"]  # not in the file: default

    cfg = resolve_settings({"config": f, "steps": 7, "options": {"dataset": {"n": "42"}}})
    assert cfg["steps"] == 7  # flag beats file
    assert cfg["batch_size"] == 64  # file beats default
    assert cfg["options"]["dataset"]["n"] == 42  # flag option beats file option, typed
    assert cfg["options"]["dataset"]["sigma"] == 0.2  # the file's other option survives the merge


def test_cli_flags_override_config_file(tmp_path):
    f = _write_toml(tmp_path / "c.toml", 'loss = "hinge"\nsteps = 123\n[options.dataset]\nn = 500\n')
    res = _dry_run(["--config", f, "--steps", "7", "-o", "dataset.n=321"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert cfg["loss"] == "hinge"
    assert cfg["steps"] == 7
    assert cfg["options"]["dataset"]["n"] == 321


def test_config_file_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        resolve_settings({"config": str(tmp_path / "missing.toml")})
    bad = _write_toml(tmp_path / "bad.toml", "steps = = 3\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        resolve_settings({"config": bad})
    typo = _write_toml(tmp_path / "typo.toml", "stepz = 3\n")
    with pytest.raises(UsageError, match="did you mean 'steps'"):
        resolve_settings({"config": typo})
    res = _dry_run(["--config", typo])
    assert res.exit_code == 2
    assert "did you mean 'steps'" in res.stderr
    assert "Traceback" not in res.output
    # an endless or huge "file" is refused after 1 MiB instead of read until memory runs out
    if os.path.exists("/dev/zero"):
        with pytest.raises(UsageError, match="larger than 1 MiB"):
            resolve_settings({"config": "/dev/zero"})
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 110_000 + "steps = 3\n")
    with pytest.raises(UsageError, match="larger than 1 MiB"):
        resolve_settings({"config": str(big)})
    assert resolve_settings({"config": _write_toml(tmp_path / "ok.toml", "# x\n" * 1000 + "steps = 3\n")})["steps"] == 3
    # nesting deep enough to exhaust the TOML parser's recursion
    deep = _write_toml(tmp_path / "deep.toml", "a = " + "[" * 2000 + "]" * 2000 + "\n")
    res = _dry_run(["--config", deep])
    assert res.exit_code == 2 and "nests arrays or tables too deeply" in res.stderr and "Traceback" not in res.output


# ------------------------------------------------------------------ -o KIND.KEY=VALUE


def test_parse_option_flags_good_forms():
    got = parse_option_flags(["detector.delta=0.1", "detector.lam = 0.5", "dataset.n=10",
                              "dataset.path=a=b"])
    assert got == {"detector": {"delta": "0.1", "lam": "0.5"}, "dataset": {"n": "10", "path": "a=b"}}
    assert parse_option_flags([]) == {}
    # a later flag for the same key wins
    assert parse_option_flags(["dataset.n=1", "dataset.n=2"]) == {"dataset": {"n": "2"}}


@pytest.mark.parametrize("item", ["detector", "detector.delta", "=0.1", ".delta=0.1", "detector.=0.1",
                                  "detectordelta=0.1"])
def test_parse_option_flags_bad_forms(item):
    with pytest.raises(UsageError, match="KIND.KEY=VALUE"):
        parse_option_flags([item])


def test_parse_option_flags_unknown_kind():
    with pytest.raises(UsageError, match="unknown kind 'detectr'"):
        parse_option_flags(["detectr.delta=0.1"])


@pytest.mark.parametrize("args, needle", [
    (["-o", "dataset"], "KIND.KEY=VALUE"),
    (["-o", "bogus.n=3"], "unknown kind"),
    (["-o", "dataset.n=abc"], "'n'"),
    (["-o", "dataset.n=0"], "'n'"),
    (["-o", "dataset.nn=5"], "did you mean 'n'"),
])
def test_cli_bad_options_exit_2(args, needle):
    res = _dry_run(args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert "Traceback" not in res.output
    assert res.stdout == ""  # no config printed


def test_option_values_are_typed_and_checked():
    cfg = resolve_settings({"options": {"dataset": {"n": "500", "sigma": "0.3"}, "model": {"hidden": "16"}}})
    assert cfg["options"]["dataset"]["n"] == 500 and isinstance(cfg["options"]["dataset"]["n"], int)
    assert cfg["options"]["dataset"]["sigma"] == 0.3
    assert cfg["options"]["model"]["hidden"] == 16
    with pytest.raises(OptionError):
        resolve_settings({"options": {"dataset": {"n": "many"}}})
    with pytest.raises(OptionError):
        resolve_settings({"options": {"dataset": {"sigma": "-1"}}})
    with pytest.raises(OptionError, match="did you mean 'sigma'"):
        resolve_settings({"options": {"dataset": {"sigmaa": "0.1"}}})


# ------------------------------------------------------------------ unknown names and settings


def test_unknown_setting_suggests():
    with pytest.raises(UsageError, match="unknown setting 'step'; did you mean 'steps'"):
        resolve_settings({"step": 10})
    with pytest.raises(UsageError, match="unknown setting 'batchsize'; did you mean 'batch_size'"):
        resolve_settings({"batchsize": 10})


def test_unknown_components_suggest():
    with pytest.raises(UnknownComponentError, match="did you mean 'grid25'"):
        resolve_settings({"dataset": "grid52"})
    with pytest.raises(UnknownComponentError, match="did you mean 'hinge'"):
        resolve_settings({"loss": "hinj"})
    with pytest.raises(UnknownComponentError, match="unknown detector"):
        resolve_settings({"detector": "nope-nothing-like-it"})
    with pytest.raises(UnknownComponentError, match="unknown preset"):
        resolve_settings({"preset": "dyngann"})


# ------------------------------------------------------------------ types and ranges


_BAD_SCALARS = [
    ({"steps": 0}, "'steps' must be >= 1"),
    ({"steps": -5}, "'steps' must be >= 1"),
    ({"steps": "many"}, "'steps' must be an integer"),
    ({"steps": 1.5}, "'steps' must be an integer"),
    ({"steps": True}, "'steps' must be an integer"),
    ({"batch_size": 0}, "'batch_size' must be >= 1"),
    ({"batch_size": 2**63}, "'batch_size' must be between 1 and 9223372036854775807"),
    ({"steps": 10**30}, "'steps' must be between 1 and 9223372036854775807"),
    ({"seed": -1}, "'seed' must be >= 0"),
    ({"seed": 2**63}, "'seed' must be between 0 and 9223372036854775807"),
    ({"threads": 100_000}, "'threads' must be between 1 and 1024"),
    ({"lr_g": 1e308}, "'lr_g' must be a positive number at most 10"),
    ({"keep_checkpoints": 0}, "'keep_checkpoints' must be >= 1"),
    ({"log_every": 0}, "'log_every' must be >= 1"),
    ({"eval_every": -1}, "'eval_every' must be >= 0"),
    ({"lr_g": 0}, "'lr_g' must be a positive number"),
    ({"lr_d": -1e-3}, "'lr_d' must be a positive number"),
    ({"lr_g": "nan"}, "'lr_g' must be a positive number"),
    ({"lr_g": "fast"}, "'lr_g' must be a number"),
    ({"betas": "1.5,0.9"}, "'betas' must be two numbers in [0, 1)"),
    ({"betas": "0.5"}, "'betas' must be two numbers in [0, 1)"),
    ({"betas": "0.5,0.9,0.99"}, "'betas' must be two numbers in [0, 1)"),
    ({"betas": "0.5,x"}, "'betas' must be two numbers like"),
    ({"betas": [0.5, 1.0]}, "'betas' must be two numbers in [0, 1)"),
    ({"device": "tpu"}, "'device' must be auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:x"}, "'device' must be auto, cpu, cuda or cuda:N"),
    ({"amp": "fp16"}, "'amp' must be one of none, bf16"),
    ({"on_divergence": "ignore"}, "'on_divergence' must be one of stop, rollback"),
    ({"compile": "yes"}, "'compile' must be true or false"),
]


@pytest.mark.parametrize("settings, needle", _BAD_SCALARS,
                         ids=[",".join(f"{k}={v!r}" for k, v in s.items()) for s, _ in _BAD_SCALARS])
def test_bad_types_and_ranges(settings, needle):
    with pytest.raises(UsageError) as ei:
        resolve_settings(settings)
    assert needle in str(ei.value)


def test_good_scalar_forms_are_normalised():
    cfg = resolve_settings({"steps": "12", "batch_size": 32.0, "betas": " 0.0, 0.99", "lr_g": "2e-4",
                            "device": "cuda:1", "eval_every": 0})
    assert cfg["steps"] == 12 and isinstance(cfg["steps"], int)
    assert cfg["batch_size"] == 32 and isinstance(cfg["batch_size"], int)
    assert cfg["betas"] == [0.0, 0.99]
    assert cfg["lr_g"] == 2e-4
    assert cfg["device"] == "cuda:1"  # validated, not opened: resolving needs no GPU
    assert cfg["eval_every"] == 0
    # the upper bounds themselves are allowed
    top = resolve_settings({"seed": 2**63 - 1, "threads": 1024, "lr_g": 10.0})
    assert (top["seed"], top["threads"], top["lr_g"]) == (2**63 - 1, 1024, 10.0)


def test_the_cli_seed_bound_is_the_configs():
    """sample/evaluate/report write the seed bound out (no config import at start-up): it must be MAX_SEED."""
    for name in ("sample", "evaluate", "report"):
        (seed,) = [p for p in cli.commands[name].params if p.name == "seed"]
        assert (seed.type.min, seed.type.max) == (0, MAX_SEED), name


@pytest.mark.parametrize("args", [["--steps", "0"], ["--betas", "1.5,0.9"], ["--device", "tpu"],
                                  ["--lr-g", "-1"], ["--dataset", "grid52"], ["--loss", "hinj"],
                                  ["--threads", "100000"], ["--seed", "99999999999999999999999"],
                                  ["--lr-d", "1e308"]])
def test_cli_bad_settings_exit_2_one_line(args):
    res = _dry_run(args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stdout == ""


# ------------------------------------------------------------------ component combinations


def test_options_for_absent_component():
    with pytest.raises(UsageError, match="options given for detector, but no detector is chosen"):
        resolve_settings({"options": {"detector": {"delta": 0.1}}})
    with pytest.raises(UsageError, match="no conditioner is chosen"):
        resolve_settings({"conditioner": "none", "options": {"conditioner": {"capacity": 3}}})
    with pytest.raises(UsageError, match="unknown kind"):
        resolve_settings({"options": {"widget": {"x": 1}}})
    res = _dry_run(["-o", "detector.delta=0.1"])
    assert res.exit_code == 2
    assert "no detector is chosen" in res.stderr


def test_partitioner_needs_conditioner():
    with pytest.raises(UsageError, match="needs a conditioner"):
        resolve_settings({"detector": "dyngan", "partitioner": "dyngan"})
    cfg = resolve_settings({"detector": "dyngan", "partitioner": "dyngan", "conditioner": "onehot"})
    assert (cfg["partitioner"], cfg["conditioner"]) == ("dyngan", "onehot")
    # a detector alone is allowed (it reports the collapse fraction only)
    cfg = resolve_settings({"detector": "dyngan"})
    assert cfg["detector"] == "dyngan" and cfg["partitioner"] is None
    res = _dry_run(["--partitioner", "dyngan"])
    assert res.exit_code == 2
    assert "needs a conditioner" in res.stderr


def test_none_spellings_clear_optional_slots():
    for spelling in ("none", "None", "null", ""):
        cfg = resolve_settings({"detector": spelling, "partitioner": spelling, "conditioner": spelling})
        assert cfg["detector"] is None and cfg["partitioner"] is None and cfg["conditioner"] is None


def test_preset_components_can_be_switched_off():
    """``--preset dyngan --detector none ...``: the preset's options for the dropped
    components must not turn into "options given for detector, but no detector is chosen"."""
    cfg = resolve_settings({"preset": "dyngan", "detector": "none", "partitioner": "none",
                            "conditioner": "none"})
    assert cfg["detector"] is None and cfg["partitioner"] is None and cfg["conditioner"] is None
    assert set(cfg["options"]) == {"dataset", "model", "loss", "metric"}
    res = _dry_run(["--preset", "dyngan", "--detector", "none", "--partitioner", "none",
                    "--conditioner", "none"])
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------ presets and loss recommendations


def _wgan_gp_recommendation():
    from core.plugins import get_host

    cls = get_host().registry.get("loss", "wgan-gp")
    rec = cls(**cls.resolve_options({})).optimizer_defaults()
    return rec


def test_wgan_gp_declares_its_recommendation():
    rec = _wgan_gp_recommendation()
    assert rec["lr_g"] == 1e-4 and rec["lr_d"] == 1e-4
    assert tuple(rec["betas"]) == (0.5, 0.9)


def test_loss_recommendation_applies_when_user_sets_nothing():
    cfg = resolve_settings({"loss": "wgan-gp"})
    assert cfg["lr_g"] == 1e-4 and cfg["lr_d"] == 1e-4
    assert cfg["betas"] == [0.5, 0.9]
    # a loss without a recommendation gets the fallback
    cfg = resolve_settings({"loss": "hinge"})
    assert (cfg["lr_g"], cfg["lr_d"], cfg["betas"]) == (1e-3, 1e-3, [0.5, 0.999])


def test_user_optimizer_settings_beat_the_loss_recommendation(tmp_path):
    cfg = resolve_settings({"loss": "wgan-gp", "lr_g": 3e-4, "lr_d": 2e-4, "betas": "0.0,0.99"})
    assert (cfg["lr_g"], cfg["lr_d"], cfg["betas"]) == (3e-4, 2e-4, [0.0, 0.99])
    # per key: what the user gives wins, the rest still comes from the loss
    cfg = resolve_settings({"loss": "wgan-gp", "lr_g": 3e-4})
    assert cfg["lr_g"] == 3e-4
    assert cfg["lr_d"] == 1e-4 and cfg["betas"] == [0.5, 0.9]
    cfg = resolve_settings({"loss": "wgan-gp", "betas": [0.0, 0.9]})
    assert cfg["betas"] == [0.0, 0.9] and cfg["lr_g"] == 1e-4
    # a config file counts as the user too
    f = _write_toml(tmp_path / "c.toml", 'loss = "wgan-gp"\nlr_d = 0.002\nbetas = [0.1, 0.2]\n')
    cfg = resolve_settings({"config": f})
    assert cfg["lr_d"] == 0.002 and cfg["betas"] == [0.1, 0.2] and cfg["lr_g"] == 1e-4


def test_preset_fills_components_and_flags_override_it():
    cfg = resolve_settings({"preset": "dyngan"})
    assert cfg["preset"] == "dyngan"
    assert (cfg["detector"], cfg["partitioner"], cfg["conditioner"]) == ("dyngan", "dyngan", "onehot")
    assert cfg["options"]["detector"]["every"] == 500
    assert cfg["g_ema"] == 0.99
    cfg = resolve_settings({"preset": "dyngan", "steps": 10, "g_ema": 0, "options": {"detector": {"delta": "0.05"}}})
    assert cfg["steps"] == 10 and cfg["g_ema"] == 0.0
    assert cfg["options"]["detector"]["delta"] == 0.05
    assert cfg["options"]["detector"]["every"] == 500  # the preset's other options survive


def test_loss_recommendation_beats_preset():
    """Documented order (core/config.py docstring): defaults < preset < loss recommendations.

    The dyngan preset sets Adam(1e-3, betas 0.5,0.999) for its ns loss; choosing
    --loss wgan-gp with it should give WGAN-GP's recommended optimiser.
    """
    cfg = resolve_settings({"preset": "dyngan", "loss": "wgan-gp"})
    assert cfg["loss"] == "wgan-gp"
    assert cfg["lr_g"] == 1e-4 and cfg["lr_d"] == 1e-4
    assert cfg["betas"] == [0.5, 0.9]
    # and the user still beats both
    cfg = resolve_settings({"preset": "dyngan", "loss": "wgan-gp", "lr_g": 5e-4})
    assert cfg["lr_g"] == 5e-4


def test_image_preset_has_the_image_code_settings_and_yields_to_swapped_components():
    cfg = resolve_settings({"preset": "dyngan-image", "dataset": "stacked-digits"})
    assert (cfg["loss"], cfg["detector"], cfg["partitioner"], cfg["conditioner"], cfg["model"]) == \
        ("ns", "dyngan", "dyngan", "embedding", "dcgan")
    assert (cfg["lr_g"], cfg["lr_d"], cfg["betas"], cfg["batch_size"], cfg["g_ema"]) == \
        (1e-4, 1e-4, [0.0, 0.99], 64, 0.999)
    o = cfg["options"]
    assert o["loss"]["r1_gamma"] == 0.02  # the image code's 0.01 E|grad|^2 (no 1/2) in our gamma/2 convention
    assert {k: o["detector"][k] for k in ("every", "delta", "lam", "subset", "reset_relabelled", "average")} == \
        {"every": 1000, "delta": 0.1, "lam": 0.2, "subset": 25000, "reset_relabelled": True, "average": "logit"}
    assert (o["partitioner"]["every"], o["partitioner"]["tau"], o["partitioner"]["weighted"],
            o["partitioner"]["split_on"]) == (20000, 0.05, False, "fresh")
    assert (o["conditioner"]["capacity"], o["conditioner"]["dim"], o["conditioner"]["fake_conditions"]) == \
        (20, 256, "real")
    # a swapped component without some of the preset's options: those are dropped, not an error
    # (kmeans has every, not tau, weighted or split_on) ...
    cfg = resolve_settings({"preset": "dyngan-image", "partitioner": "kmeans"})
    assert cfg["partitioner"] == "kmeans" and cfg["options"]["partitioner"]["every"] == 20000
    assert not {"tau", "weighted", "split_on"} & set(cfg["options"]["partitioner"])
    # ... a swapped component that has an option keeps it (every built-in loss takes r1_gamma) ...
    for loss in ("hinge", "wgan-gp"):
        assert resolve_settings({"preset": "dyngan-image", "loss": loss})["options"]["loss"]["r1_gamma"] == 0.02
    # ... and the user's own unknown option is still refused
    with pytest.raises(UsageError, match="tau"):
        resolve_settings({"preset": "dyngan-image", "partitioner": "kmeans",
                          "options": {"partitioner": {"tau": 0.1}}})
    res = _dry_run(["--preset", "dyngan-image", "--partitioner", "kmeans", "-o", "partitioner.tau=0.1"])
    assert res.exit_code == 2 and "Traceback" not in res.output


# ------------------------------------------------------------------ --dry-run


def test_dry_run_prints_config_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "would-be-run"
    res = _dry_run(["--steps", "5", "--loss", "wgan-gp", "--out", str(out), "-o", "dataset.n=100"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert cfg["steps"] == 5 and cfg["loss"] == "wgan-gp"
    assert cfg["options"]["dataset"]["n"] == 100
    assert cfg["betas"] == [0.5, 0.9]
    assert "losses" in cfg["plugins"] and cfg["plugins"]["losses"]["version"]
    assert not out.exists()
    assert not (tmp_path / "runs").exists()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ metric options


def test_metric_options_go_to_every_chosen_metric_that_has_them():
    cfg = resolve_settings({"metrics": "mixture,prdc",
                            "options": {"metric": {"chunk_size": "64", "prdc.k": "3", "hq_sigmas": "2"}}})
    mixture, prdc = cfg["options"]["metric"]["mixture"], cfg["options"]["metric"]["prdc"]
    assert mixture == {"hq_sigmas": 2.0, "chunk_size": 64}
    assert prdc["k"] == 3 and prdc["chunk_size"] == 64 and prdc["max_samples"] == 5000
    # a scoped value wins over the unscoped one, whatever the order given
    cfg = resolve_settings({"metrics": "mixture,prdc",
                            "options": {"metric": {"prdc.chunk_size": "8", "chunk_size": "64"}}})
    assert cfg["options"]["metric"]["prdc"]["chunk_size"] == 8
    assert cfg["options"]["metric"]["mixture"]["chunk_size"] == 64



def test_a_fifo_nobody_writes_to_is_refused_and_a_pipe_is_read(tmp_path):
    """A named FIFO with no writer used to block the open forever; a pipe a process writes to
    (what ``--config <(...)`` gives) is read like a file."""
    import signal

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)

    def hung(*_):
        raise TimeoutError("--config on a FIFO with no writer blocked")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)  # a regression fails the test instead of hanging the suite
    try:
        res = _dry_run(["--config", str(fifo)])  # returns at once: nothing waits for a writer
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert res.exit_code == 2 and "is a FIFO that no process writes to" in res.stderr, res.output
    r, w = os.pipe()
    try:
        os.write(w, b"steps = 123\nbatch_size = 64\n")
        os.close(w)
        cfg = resolve_settings({"config": f"/dev/fd/{r}"})
    finally:
        os.close(r)
    assert (cfg["steps"], cfg["batch_size"]) == (123, 64)
    # a pipe whose writer is still to write: read until it closes
    r, w = os.pipe()
    try:
        import threading

        def late():
            import time

            time.sleep(0.3)
            os.write(w, b"steps = 45\n")
            os.close(w)
        t = threading.Thread(target=late)
        t.start()
        cfg = resolve_settings({"config": f"/dev/fd/{r}"})
        t.join()
    finally:
        os.close(r)
    assert cfg["steps"] == 45
    # an empty pipe (--config <(true)) is an empty config, like an empty file
    r, w = os.pipe()
    os.close(w)
    try:
        assert resolve_settings({"config": f"/dev/fd/{r}"})["steps"] == DEFAULTS["steps"]
    finally:
        os.close(r)

def test_metric_options_from_a_config_file_subtable(tmp_path):
    path = _write_toml(tmp_path / "run.toml", 'metrics = "mixture,prdc"\n[options.metric]\nhq_sigmas = 2.5\n'
                                              '[options.metric.prdc]\nk = 7\n')
    res = _dry_run(["--config", path])
    assert res.exit_code == 0, res.output
    opts = json.loads(res.stdout)["options"]["metric"]
    assert opts["mixture"]["hq_sigmas"] == 2.5 and opts["prdc"]["k"] == 7


@pytest.mark.parametrize("args, needle", [
    (["-o", "metric.bogus=1"], "no chosen metric has it (metrics: mixture; mixture: chunk_size, hq_sigmas)"),
    (["-o", "metric.prdc.k=3"], "metric 'prdc' is not chosen"),
    (["-o", "metric.hq_sigmas=-1"], "hq_sigmas"),
    (["--metrics", "none", "-o", "metric.k=3"], "no chosen metric has it (metrics: none)"),
])
def test_bad_metric_options_exit_2(args, needle):
    res = _dry_run(args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert "Traceback" not in res.output


def test_metric_options_reach_the_metric():
    from core.api import get_host
    from core.training import instantiate

    cfg = resolve_settings({"options": {"metric": {"hq_sigmas": "100"}}})
    comps = instantiate(cfg, get_host().registry)
    assert [m.opts.hq_sigmas for m in comps.metrics] == [100.0]
    # a config saved before metric options existed: the metrics' defaults
    del cfg["options"]["metric"]
    assert [m.opts.hq_sigmas for m in instantiate(cfg, get_host().registry).metrics] == [3.0]


# ------------------------------------------------------------------ metrics and TOML types


@pytest.mark.parametrize("line", ["metrics = [5]", "metrics = 5", "metrics = [[1]]", 'metrics = [""]',
                                  "metrics = {a = 1}"])
def test_metrics_of_the_wrong_type_in_a_config_file_exit_2(tmp_path, line):
    res = _dry_run(["--config", _write_toml(tmp_path / "m.toml", line + "\n")])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert "setting 'metrics' must be metric names" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value", [",", "", " , ,"])
def test_an_empty_metrics_name_list_is_refused(value):
    res = _dry_run(["--metrics", value])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert "names no metric" in res.stderr and "none for no metrics" in res.stderr


def test_metrics_none_still_means_no_metrics(tmp_path):
    res = _dry_run(["--metrics", "none"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"] == []
    assert resolve_settings({"metrics": []})["metrics"] == []  # a saved run without metrics
    cfg = resolve_settings({"config": _write_toml(tmp_path / "m.toml", 'metrics = ["mixture"]\n')})
    assert cfg["metrics"] == ["mixture"]


@pytest.mark.parametrize("line, needle", [
    ("lr_g = true", "'lr_g' must be a number (no quotes), got true"),
    ("lr_d = false", "'lr_d' must be a number"),
    ('lr_g = "1e-3"', "'lr_g' must be a number (no quotes)"),
    ('eval_every = "5"', "'eval_every' must be an integer (no quotes, no decimal point), got '5'"),
    ('g_ema = "0.5"', "'g_ema' must be a number (no quotes)"),
    ("g_ema = true", "'g_ema' must be a number"),
    ("batch_size = 1e3", "'batch_size' must be an integer (no quotes, no decimal point), got 1000.0"),
    ("steps = 100.0", "'steps' must be an integer"),
    ("seed = true", "'seed' must be an integer"),
    ("betas = [true, 0.9]", "'betas' must be two numbers"),
    # keys that are not settings: flags, misspellings
    ('out = "runs/x"', "'out' is a command-line flag only (--out DIR), not a setting a config file holds"),
    ("resume = true", "'resume' is a command-line flag only (--resume)"),
    ("quiet = true", "'quiet' is a command-line flag only"),
    ("step = 5", "c.toml': unknown setting 'step'; did you mean 'steps'?"),
    ('metrics = "none,mixture"', "none means no metrics and cannot be combined with metric names"),
    ("[option.detector]\ndelta = 0.1", "unknown setting 'option'; did you mean 'options'?"),
])
def test_config_file_mistakes_say_what_is_wrong(tmp_path, line, needle):
    res = _dry_run(["--config", _write_toml(tmp_path / "c.toml", line + "\n")])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert needle in res.stderr, res.stderr


def test_config_file_numbers_of_the_right_type_are_accepted(tmp_path):
    path = _write_toml(tmp_path / "c.toml", "batch_size = 64\nlr_g = 1\nlr_d = 2e-4\ng_ema = 0.5\n"
                                             'betas = [0, 0.9]\neval_every = 0\n')
    cfg = resolve_settings({"config": path})
    assert (cfg["batch_size"], cfg["lr_g"], cfg["lr_d"], cfg["g_ema"], cfg["betas"]) == (64, 1.0, 2e-4, 0.5,
                                                                                          [0.0, 0.9])


def test_bools_are_refused_for_numeric_settings_everywhere():
    for key in ("lr_g", "lr_d", "g_ema"):
        with pytest.raises(UsageError, match=f"'{key}' must be a number"):
            resolve_settings({key: True})
    with pytest.raises(UsageError, match="'betas' must be two numbers"):
        resolve_settings({"betas": [False, 0.9]})


def test_json_style_integral_floats_still_load_but_not_past_2_53():
    """A run's config.json may hold 1000.0 for a count (JSON has one number type): still loadable."""
    cfg = resolve_settings({"batch_size": 64.0, "steps": 1e3})
    assert (cfg["batch_size"], cfg["steps"]) == (64, 1000)
    assert isinstance(cfg["steps"], int)
    for v in (1e30, 2.0**53 + 2, "1e30"):
        with pytest.raises(UsageError, match="'steps' must be an integer"):
            resolve_settings({"steps": v})


def test_cli_numeric_flags_still_work():
    res = _dry_run(["--lr-g", "1", "--g-ema", "0.5", "--batch-size", "64", "--eval-every", "5",
                    "--betas", "0.5,0.9"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert (cfg["lr_g"], cfg["g_ema"], cfg["batch_size"], cfg["eval_every"], cfg["betas"]) == (
        1.0, 0.5, 64, 5, [0.5, 0.9])


_INT = "must be an integer (no quotes, no decimal point)"


@pytest.mark.parametrize("table, line, needle", [
    ("detector", 'every = "500"', f"option 'detector.every' {_INT}, got '500'"),
    ("detector", "every = 1.0", f"option 'detector.every' {_INT}, got 1.0"),
    ("detector", "every = 1e3", f"option 'detector.every' {_INT}, got 1000.0"),
    ("detector", "every = true", f"option 'detector.every' {_INT}, got true"),
    ("detector", 'delta = "0.3"', "option 'detector.delta' must be a number (no quotes), got '0.3'"),
    ("detector", "delta = false", "option 'detector.delta' must be a number (no quotes), got false"),
    ("partitioner", 'refine = "false"', "option 'partitioner.refine' must be true or false (no quotes), got 'false'"),
    ("partitioner", "refine = 0", "option 'partitioner.refine' must be true or false (no quotes), got 0"),
    ("detector", "average = 1", "option 'detector.average' must be a string (in quotes), got 1"),
    ("metric", 'hq_sigmas = "2"', "option 'metric.hq_sigmas' must be a number (no quotes), got '2'"),
    ("metric.mixture", "hq_sigmas = true", "option 'metric.mixture.hq_sigmas' must be a number (no quotes), got true"),
    ("metric", 'chunk_size = "500"', f"option 'metric.chunk_size' {_INT} or \"none\", got '500'"),
])
def test_config_file_option_values_must_have_the_options_type(tmp_path, table, line, needle):
    """TOML types its values: an option's value in a config file must already be of the option's type,
    as the top-level settings must (a quoted number, a float count or a quoted boolean is a mistake)."""
    path = _write_toml(tmp_path / "c.toml", f"[options.{table}]\n{line}\n")
    res = _dry_run(["--preset", "dyngan", "--config", path])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.stderr.strip() == f"Error: config file {path!r}: {needle}"
    with pytest.raises(OptionError):  # the library reads a file the same way
        resolve_settings({"preset": "dyngan", "config": path})


@pytest.mark.parametrize("table, line, where, want", [
    ("detector", "every = 400", ("detector", "every"), 400),
    ("detector", "delta = 1", ("detector", "delta"), 1.0),  # an integer is a number
    ("detector", "delta = 0.3", ("detector", "delta"), 0.3),
    ("partitioner", "refine = false", ("partitioner", "refine"), False),
    ("detector", 'average = "logit"', ("detector", "average"), "logit"),
    ("metric", 'chunk_size = "none"', ("metric", "mixture", "chunk_size"), None),  # TOML has no null
    ("metric", "chunk_size = 500", ("metric", "mixture", "chunk_size"), 500),
    ("metric.mixture", "hq_sigmas = 2", ("metric", "mixture", "hq_sigmas"), 2.0),
])
def test_config_file_option_values_of_the_right_type_are_accepted(tmp_path, table, line, where, want):
    path = _write_toml(tmp_path / "c.toml", f"[options.{table}]\n{line}\n")
    res = _dry_run(["--preset", "dyngan", "--config", path])
    assert res.exit_code == 0, res.output
    value = json.loads(res.stdout)["options"]
    for key in where:
        value = value[key]
    assert value == want and type(value) is type(want)


def test_option_flags_the_api_and_saved_configs_still_parse_loosely(tmp_path):
    """-o gives strings, and the library's dicts and a run's config.json are JSON-like (1000.0 for a
    count): they keep being parsed; only a config file's TOML types are held to the option's type."""
    res = _dry_run(["--preset", "dyngan", "-o", "detector.every=500", "-o", "detector.delta=0.3",
                    "-o", "partitioner.refine=false"])
    assert res.exit_code == 0, res.output
    opts = json.loads(res.stdout)["options"]
    assert (opts["detector"]["every"], opts["detector"]["delta"], opts["partitioner"]["refine"]) == (500, 0.3, False)
    path = _write_toml(tmp_path / "c.toml", "[options.detector]\nevery = 400\n")
    res = _dry_run(["--preset", "dyngan", "--config", path, "-o", "detector.every=600"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["options"]["detector"]["every"] == 600
    cfg = resolve_settings({"preset": "dyngan", "options": {"detector": {"every": "500", "delta": "0.3"},
                                                            "partitioner": {"refine": "false", "every": 3000.0}}})
    assert (cfg["options"]["detector"]["every"], cfg["options"]["detector"]["delta"],
            cfg["options"]["partitioner"]["refine"], cfg["options"]["partitioner"]["every"]) == (500, 0.3, False, 3000)


@pytest.mark.parametrize("preset", ["dyngan-image", "dyngan"])
def test_a_saved_run_takes_defaults_not_a_newer_presets_values_for_options_it_did_not_have(tmp_path, monkeypatch,
                                                                                         preset):
    """A run made before its preset set detector.average=logit and partitioner.split_on=fresh (dyngan-image
    before 2026-12-06, dyngan before 2026-12-07) has neither in its config.json: resumed, it must keep the
    behaviour it trained with (the options' defaults), not switch to the preset's new mechanics (it did,
    and then could not be resumed past the first partition check)."""
    from core import api

    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    out = tmp_path / "r"
    api.train({"preset": preset, "dataset": "grid25", "steps": 10, "checkpoint_every": 10, "eval_every": 0,
               "device": "cpu", "threads": 1, "out": str(out),
               "options": {"detector": {"every": 5, "subset": None}, "partitioner": {"every": 10}}}, quiet=True)
    path = out / "config.json"
    saved = json.loads(path.read_text())
    assert (saved["options"]["detector"]["average"], saved["options"]["partitioner"]["split_on"]) == ("logit", "fresh")
    del saved["options"]["detector"]["average"], saved["options"]["partitioner"]["split_on"]  # as an older version wrote it
    path.write_text(json.dumps(saved))
    res = CliRunner().invoke(cli, ["train", "--resume", "--out", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert (cfg["options"]["detector"]["average"], cfg["options"]["partitioner"]["split_on"]) == ("probability", "average")
    assert cfg["preset"] == preset
    if preset == "dyngan-image":
        assert cfg["options"]["loss"]["r1_gamma"] == 0.02  # the rest as saved
    else:
        assert (cfg["options"]["detector"]["delta"], cfg["options"]["partitioner"]["tau"]) == (0.2, 0.01)
    # giving the preset again is not a change
    assert CliRunner().invoke(cli, ["train", "--resume", "--out", str(out), "--preset", preset,
                                    "--dry-run"]).exit_code == 0
    # nor does a resume that changes its length or its metrics bring the preset back (it did: every
    # resolution but the first put the saved preset under the saved settings)
    for extra in (["--steps", "40"], ["--metrics", "mixture"], ["--preset", preset, "-o", "detector.every=5"]):
        res = CliRunner().invoke(cli, ["train", "--resume", "--out", str(out), *extra, "--dry-run"])
        assert res.exit_code == 0, res.output
        cfg = json.loads(res.stdout)
        assert (cfg["options"]["detector"]["average"], cfg["options"]["partitioner"]["split_on"]) == \
            ("probability", "average"), extra
        assert cfg["preset"] == preset
    # and it trains on with them
    result = api.train({"out": str(out), "steps": 20, "device": "cpu", "threads": 1}, resume=True, quiet=True)
    assert result.step == 20


# ------------------------------------------------- odd values from the Python API (a QA pass)


@pytest.mark.parametrize("settings, message", [
    ({"lr_g": 10**400}, "setting 'lr_g' must be a number"),  # float() overflows: an OverflowError leaked
    ({"g_ema": 10**400}, "setting 'g_ema' must be a number in [0, 1)"),
    ({"betas": [10**400, 0.9]}, "setting 'betas' must be two numbers"),
    ({"options": {"dataset": {"sigma": 10**400}}}, "option 'sigma' must be a number"),
    ({"options": {"dataset": {1: 2}}}, "unknown option 1"),  # difflib got an int: TypeError
    ({"amp": __import__("numpy").array(["none", "bf16"])}, "setting 'amp' must be one of none, bf16"),
    ({"out": 5}, "--out (the run directory) must be a path (str or pathlib.Path), got int"),
    ({"out": b"runs/x"}, "got bytes"),
    ({"out": "runs/a\0b"}, "contains a NUL character"),
    ({"out": "runs/\ud800"}, "cannot be written as a file name here"),
    ({"config": 5}, "--config must be a path (str or pathlib.Path), got int"),
    ({"config": "a\0.toml"}, "contains a NUL character"),
])
def test_odd_api_values_are_usage_errors(tmp_path, monkeypatch, settings, message):
    from core import api

    monkeypatch.chdir(tmp_path)
    for call in (api.dry_run, api.train):
        with pytest.raises((UsageError, OptionError)) as e:
            call({"device": "cpu", "steps": 5, **settings})
        assert message in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no run directory left


def test_numpy_numbers_are_taken_as_option_values():
    np = pytest.importorskip("numpy")
    cfg = resolve_settings({"device": "cpu", "options": {"dataset": {"points_per_mode": np.int64(50),
                                                                      "sigma": np.int32(1)}}})
    assert cfg["options"]["dataset"]["points_per_mode"] == 50 and type(cfg["options"]["dataset"]["points_per_mode"]) is int
    assert cfg["options"]["dataset"]["sigma"] == 1.0 and type(cfg["options"]["dataset"]["sigma"]) is float
    with pytest.raises(OptionError, match="must be an integer"):  # a bool is no number, NumPy's neither
        resolve_settings({"device": "cpu", "options": {"dataset": {"points_per_mode": np.bool_(True)}}})


def test_resume_with_metric_options_that_are_not_a_table_is_a_usage_error(tmp_path, monkeypatch):
    from core import api

    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    out = tmp_path / "r"
    api.train({"dataset": "grid25", "steps": 5, "device": "cpu", "threads": 1, "eval_every": 0, "out": str(out),
               "options": {"dataset": {"n": 500}}}, quiet=True)
    for bad in ([1], "x"):
        with pytest.raises(UsageError, match="`options.metric` must be a table of option values"):
            api.train({"out": str(out), "steps": 10, "options": {"metric": bad}}, resume=True)


def test_an_error_quoting_a_huge_value_is_cut_to_a_readable_line(tmp_path):
    cfg = tmp_path / "long.toml"
    cfg.write_text('loss = "' + "a" * 500_000 + '"\n')
    res = CliRunner().invoke(cli, ["train", "--config", str(cfg), "--dry-run"])
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert line.startswith("Error: ") and len(line.splitlines()) == 1 and len(line) < 4200
    assert "characters left out" in line


# --------------------------------------------------------------------------- a plugin's own defaults


def _attribution_host():
    import types

    from core import hookimpl
    from core.components import Preset
    from core.testing import plugin_host
    from dyngan_plugins.mixtures import Grid25

    class OddData(Grid25):
        name = "qa-odd-data"
        default_model = "no-such-model"

    presets = [type(f"P{i}", (Preset,), {"name": name, "settings": settings}) for i, (name, settings) in enumerate([
        ("qa-stepz", {"stepz": 100}),
        ("qa-nope", {"detector": "nope"}),
        ("qa-typo", {"loss": "hinge", "options": {"loss": {"margin_typo": 1.0}}}),
        ("qa-needs-cond", {"partitioner": "dyngan", "detector": "dyngan"}),  # the conditioner: the user's
    ])]
    plugin = types.SimpleNamespace(
        register_datasets=hookimpl(lambda register: register(OddData)),
        register_presets=hookimpl(lambda register: [register(p) for p in presets]),
    )
    return plugin_host(("qa", plugin))


@pytest.mark.parametrize("preset, says", [
    ("qa-stepz", "unknown setting 'stepz'"),
    ("qa-nope", "unknown detector 'nope'"),
    ("qa-typo", "unknown option 'margin_typo'"),
])
def test_a_presets_own_mistake_names_the_preset(preset, says):
    # the user typed none of these names: the error said only "unknown setting 'stepz'"
    with _attribution_host():
        with pytest.raises(UsageError) as e:
            resolve_settings({"preset": preset})
        assert str(e.value).startswith(f"preset '{preset}' (plugin 'qa') has settings dyngan refuses: ")
        assert says in str(e.value)
        # and on the command line: exit 2, one line
        res = CliRunner().invoke(cli, ["train", "--preset", preset, "--dry-run"])
        assert res.exit_code == 2 and f"preset '{preset}' (plugin 'qa')" in res.output
        assert "Traceback" not in res.output


def test_a_presets_own_mistake_chosen_in_a_config_file_names_the_preset_not_the_file(tmp_path):
    path = _write_toml(tmp_path / "c.toml", 'preset = "qa-nope"\n')
    with _attribution_host():
        res = CliRunner().invoke(cli, ["train", "--config", path, "--dry-run"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("Error: preset 'qa-nope' (plugin 'qa') has settings dyngan refuses: "), err
    assert "unknown detector 'nope'" in err and "config file" not in err


def test_a_datasets_unknown_default_model_names_the_dataset():
    with _attribution_host():
        with pytest.raises(UsageError) as e:
            resolve_settings({"dataset": "qa-odd-data"})
        assert str(e.value).startswith("dataset 'qa-odd-data' (plugin 'qa') gives default_model 'no-such-model', "
                                       "which dyngan cannot use (unknown model 'no-such-model'")
        assert str(e.value).endswith("choose a model with --model")
        assert resolve_settings({"dataset": "qa-odd-data", "model": "mlp"})["model"] == "mlp"


def test_a_preset_valid_only_with_the_users_settings_on_top_is_not_refused():
    # resolving the preset alone first refused it (a review of the attribution)
    with _attribution_host():
        cfg = resolve_settings({"preset": "qa-needs-cond", "conditioner": "onehot"})
        assert cfg["partitioner"] == "dyngan" and cfg["conditioner"] == "onehot"
        with pytest.raises(UsageError) as e:  # without it, the same error on its own: the preset's
            resolve_settings({"preset": "qa-needs-cond"})
        assert str(e.value).startswith("preset 'qa-needs-cond' (plugin 'qa') has settings dyngan refuses: "
                                       "partitioner 'dyngan' needs a conditioner")
        # the user's own mistake beside a preset stays the user's
        with pytest.raises(UsageError) as e:
            resolve_settings({"preset": "qa-needs-cond", "conditioner": "onehot", "stepz": 3})
        assert str(e.value).startswith("unknown setting 'stepz'")
        with pytest.raises(UsageError, match="unknown preset 'nope'"):
            resolve_settings({"preset": "nope"})


def test_a_good_preset_still_resolves_with_the_users_settings_on_top():
    cfg = resolve_settings({"preset": "dyngan", "steps": 77, "options": {"detector": {"delta": 0.3}}})
    assert cfg["steps"] == 77 and cfg["options"]["detector"]["delta"] == 0.3 and cfg["preset"] == "dyngan"


@pytest.mark.parametrize("text, flags, words", [
    ('device = 5\n', [], "setting 'device' must be auto, cpu, cuda or cuda:N, got 5"),
    ('compile = "yes"\n', [], "setting 'compile' must be true or false"),
    ('detector = "dyngan"\n[options.detector]\nbogus = 3\n', [], "detector 'dyngan': unknown option 'bogus'"),
    ('loss = "nope"\n', [], "unknown loss 'nope'"),
])
def test_a_mistake_written_in_the_config_file_names_the_file(tmp_path, text, flags, words):
    path = _write_toml(tmp_path / "c.toml", text)
    res = _dry_run(["--config", path, *flags])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith(f"Error: config file {path!r}: ") and words in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in res.output


def test_a_mistake_typed_as_a_flag_is_not_blamed_on_the_config_file(tmp_path):
    path = _write_toml(tmp_path / "c.toml", 'device = 5\nsteps = 10\n')
    # the flag's value replaces the file's: the error is the flag's, without the file's name
    res = _dry_run(["--config", path, "--device", "tpu"])
    assert res.exit_code == 2 and "got 'tpu'" in res.stderr and "config file" not in res.stderr, res.output
    good = _write_toml(tmp_path / "good.toml", 'steps = 10\n')
    res = _dry_run(["--config", good, "-o", "detector.delta=0.1"])
    assert res.exit_code == 2 and "config file" not in res.stderr and "no detector" in res.stderr, res.output
    # the library's own errors keep their class when the file is named
    from core.config import read_toml

    with pytest.raises(OptionError, match=r"^config file .*unknown option 'bogus'"):
        resolve_settings({"config": _write_toml(tmp_path / "o.toml",
                                                'detector = "dyngan"\n[options.detector]\nbogus = 3\n')})
    assert read_toml(good)["steps"] == 10
