"""Components that misbehave while a run trains, samples or is scored: each fails with one line
naming its plugin and method (exit 1), before anything broken is saved, and a saved run stays
usable. (Found by a QA pass that wrote such plugins; each case crashed with a traceback, saved a
checkpoint no command could load, or was silently accepted before.)"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import assert_clean_error, invoke
from core import hookimpl
from core.components import CollapseDetector, ConditioningSpec, Detection, Metric, Option, Partitioner, PartitionUpdate
from core.testing import plugin_host
from dyngan_plugins.conditioners import OneHotConditioner
from dyngan_plugins.losses import NonSaturatingLoss
from dyngan_plugins.mlp import MLP as MLPModel

FLAGS = ["--dataset", "grid25", "--device", "cpu", "--seed", "0", "--log-every", "10", "--eval-every", "0",
         "--checkpoint-every", "10", "-o", "dataset.n=500", "-q"]


def _half(ctx) -> Detection:
    n = ctx.data.shape[0]
    collapsed = torch.arange(n, device=ctx.device) < n // 2
    return Detection(collapsed=collapsed, fraction=torch.tensor(0.5, device=ctx.device))


class Mutator(CollapseDetector):
    """Changes one of the loop's tensors in place from its second detection on."""

    name = "qa-mutate"
    options = {"every": Option(10, "every", min=1),
               "what": Option("prior", "data | prior | labels", choices=("data", "prior", "labels"))}

    def detect(self, ctx):
        if ctx.step >= 20:
            getattr(ctx, self.opts.what).mul_(2) if self.opts.what != "labels" else ctx.labels.fill_(1)
        return _half(ctx)


class BadState(CollapseDetector):
    name = "qa-state"
    options = {"every": Option(10, "every", min=1), "what": Option("none", "none | tuple-key | sparse")}

    def detect(self, ctx):
        return _half(ctx)

    def state_dict(self):
        return {"none": None, "tuple-key": {(1, 2): 3},
                "sparse": {"s": torch.eye(3).to_sparse()}}[self.opts.what]


class EveryChanges(CollapseDetector):
    """``every`` is valid when the run starts and 0 afterwards: the loop reads it once."""

    name = "qa-every"
    reads = 0

    @property
    def every(self):
        type(self).reads += 1
        return 10 if type(self).reads == 1 else 0

    def detect(self, ctx):
        return _half(ctx)


class Printer(CollapseDetector):
    name = "qa-print"
    options = {"every": Option(10, "every", min=1)}

    def detect(self, ctx):
        print("hello from detect")
        return _half(ctx)


class BadPartition(Partitioner):
    name = "qa-partition"
    options = {"every": Option(10, "every", min=1), "what": Option("negative-prior", "what to return")}

    def partition(self, ctx, detection):
        n = ctx.data.shape[0]
        labels = (torch.arange(n, device=ctx.device) % 2)
        if self.opts.what == "float-labels":
            return PartitionUpdate(labels=labels.float() * 0.99)
        prior = torch.zeros(ctx.capacity, device=ctx.device)
        prior[0], prior[1] = 1.5, -0.5  # sums to 1, one entry negative
        return PartitionUpdate(labels=labels, prior=prior)


class OddCapacity(OneHotConditioner):
    """The built-in one-hot conditioner with a broken spec or code module: ``what`` says how."""

    name = "qa-capacity"
    options = {**OneHotConditioner.options, "what": Option("capacity", "what goes wrong")}

    def spec(self):
        if self.opts.what == "dict":
            return {"g_dim": 3, "d_dim": 3, "capacity": 3}
        if self.opts.what == "capacity":
            return ConditioningSpec(g_dim=3, d_dim=3, capacity=0)
        return super().spec()

    def generator_code(self):
        if self.opts.what == "none-code":
            return None
        if self.opts.what == "function":
            return lambda cond: cond
        code = super().generator_code()
        return nn.Sequential(code, nn.Linear(code(torch.zeros(1, dtype=torch.long)).shape[1], 2)) \
            if self.opts.what == "width" else code


class BadModel(MLPModel):
    """The built-in MLP with a broken generator output: ``what`` says how."""

    name = "qa-model"
    options = {**MLPModel.options, "what": Option("shape", "shape | eval-shape | eval-raise | requires-grad")}

    def build(self, data_shape, spec):
        G, D = super().build(data_shape, spec)
        what = self.opts.what
        if what == "g-function":
            return (lambda z, code=None: z[:, :2]), D
        if what == "d-no-params":
            return G, nn.Identity()

        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = G

            def forward(self, z, code=None):
                if what == "requires-grad":
                    with torch.enable_grad():
                        return self.inner(z, code) * torch.ones((), requires_grad=True)
                x = self.inner(z, code)
                if what == "shape" or (what == "eval-shape" and not self.training):
                    return torch.cat([x, x[:, :1]], 1)
                if what == "eval-raise" and not self.training:
                    raise RuntimeError("cannot run in eval mode")
                return x

        return Broken(), D


class BadLoss(NonSaturatingLoss):
    name = "qa-loss"
    options = {**NonSaturatingLoss.options, "what": Option("in-place", "what goes wrong")}

    @property
    def wants_real_grad(self):
        if self.opts.what == "wants-real-grad":
            raise RuntimeError("wants_real_grad broke")
        return False

    def optimizer_defaults(self):
        if self.opts.what == "defaults-raise":
            raise RuntimeError("optimizer_defaults broke")
        if self.opts.what == "defaults-list":
            return [1e-3]
        if self.opts.what == "defaults-junk":
            return {"lr_g": -1.0}
        if self.opts.what == "defaults-lr":
            return {"lr": 1e-4}
        if self.opts.what == "defaults-print":
            print("chatty: using the default optimiser")
        return super().optimizer_defaults()

    def d_loss(self, ctx):
        loss = super().d_loss(ctx)
        if self.opts.what == "in-place":
            loss = loss + 1e-3 * (ctx.real_logits ** 2).mean()  # pow's backward needs real_logits ...
            ctx.real_logits.add_(1.0)  # ... unchanged
        return loss


class BigMetric(Metric):
    name = "qa-metric"
    options = {"what": Option("big", "big | inf | print")}

    def compute(self, fake, real, dataset):
        if self.opts.what == "print":
            print("debug: computing qa-metric")
            return {"qa-metric/x": 1.0}
        return {"qa-metric/x": 10 ** 400 if self.opts.what == "big" else math.inf}


PLUGIN = types.SimpleNamespace(
    register_collapse_detectors=hookimpl(lambda register: [register(c) for c in
                                                           (Mutator, BadState, EveryChanges, Printer)]),
    register_partitioners=hookimpl(lambda register: register(BadPartition)),
    register_conditioners=hookimpl(lambda register: register(OddCapacity)),
    register_models=hookimpl(lambda register: register(BadModel)),
    register_losses=hookimpl(lambda register: register(BadLoss)),
    register_metrics=hookimpl(lambda register: register(BigMetric)),
)


@pytest.fixture
def qa():
    with plugin_host(("qa", PLUGIN)) as host:
        yield host


def train(out: Path, *args: str, steps: int = 30):
    return invoke(["train", *FLAGS, "--steps", str(steps), "--out", str(out), *args])


def steps_saved(run: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.json"))


@pytest.mark.parametrize("what", ["prior", "labels", "data"])
def test_a_detector_changing_the_loops_tensors_in_place_fails_before_the_step_is_saved(qa, tmp_path, what):
    run = tmp_path / "r"
    res = train(run, "--detector", "qa-mutate", "-o", f"detector.what={what}", "--conditioner", "onehot")
    assert_clean_error(res, 1, "detector 'qa-mutate' (plugin 'qa') raised in detect()",
                       f"changed ctx.{what} in place")
    assert steps_saved(run) == [10]  # step 20, whose detection changed it, is not saved
    res = invoke(["sample", str(run), "--n", "5", "--out", str(tmp_path / "s.npy")])
    assert res.exit_code == 0, res.output  # the saved run stays usable


@pytest.mark.parametrize("what, needle", [
    ("negative-prior", "prior must be a tensor of 30 finite, non-negative entries"),
    ("float-labels", "labels of dtype torch.float32, not an integer one"),
])
def test_a_partition_update_that_cannot_be_used_fails_before_it_is_saved(qa, tmp_path, what, needle):
    run = tmp_path / "r"
    res = train(run, "--detector", "dyngan", "--partitioner", "qa-partition", "-o", f"partitioner.what={what}",
                "--conditioner", "onehot")
    assert_clean_error(res, 1, "partitioner 'qa-partition' (plugin 'qa') raised in partition()", needle)
    assert steps_saved(run) == []  # the first partition (step 10) fails before its checkpoint


@pytest.mark.parametrize("what, needle", [
    ("none", "its state_dict() returned NoneType, not a dict"),
    ("tuple-key", "its state_dict() has the key (1, 2) (tuple); keys must be strings"),
    ("sparse", "is a torch.sparse_coo tensor; a checkpoint keeps dense tensors"),
])
def test_a_state_dict_a_checkpoint_cannot_hold_is_named_and_leaves_no_orphan_file(qa, tmp_path, what, needle):
    run = tmp_path / "r"
    res = train(run, "--detector", "qa-state", "-o", f"detector.what={what}")
    assert_clean_error(res, 1, "detector 'qa-state' (plugin 'qa') raised in state_dict()", needle)
    assert list((run / "checkpoints").glob("*")) == []  # no tensor file without its JSON


def test_the_loop_reads_every_once(qa, tmp_path):
    EveryChanges.reads = 0
    res = train(tmp_path / "r", "--detector", "qa-every")
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "detection"] == [10, 20, 30]


def test_what_a_component_prints_goes_to_stderr(qa, tmp_path):
    res = train(tmp_path / "r", "--detector", "qa-print")
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{tmp_path / 'r'}\n"  # the run directory alone: RUN=$(dyngan train ...)
    assert res.stderr.count("hello from detect") == 3


def test_what_a_loss_prints_while_settings_resolve_leaves_dry_runs_json_alone(qa):
    res = invoke(["train", "--loss", "qa-loss", "-o", "loss.what=defaults-print", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["loss"] == "qa-loss"  # it began with the loss's line
    assert "chatty" in res.stderr


def test_what_a_metric_prints_leaves_evaluate_json_and_the_other_commands_stdout_alone(qa, tmp_path):
    run = tmp_path / "r"
    assert train(run, "--metrics", "qa-metric", "-o", "metric.what=print", steps=10).exit_code == 0
    res = invoke(["evaluate", str(run), "--n", "100", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"]["qa-metric/x"] == 1.0  # it began with the metric's line
    assert "debug: computing qa-metric" in res.stderr
    res = invoke(["report", str(run), "--n", "100"])
    assert res.exit_code == 0, res.output
    assert "debug" not in res.stdout


@pytest.mark.parametrize("what, method, needle", [
    ("capacity", "spec", "capacity = 0; it must be an int >= 1"),
    ("dict", "spec", "returned dict, not a core.components.ConditioningSpec"),  # blamed the model's build
    # the model was blamed for the shape error these gave in G's first layer
    ("width", "generator_code", "its module maps 128 condition ids to torch.float32 (128, 2); the "
                                "ConditioningSpec promises floating-point codes of shape (128, 30)"),
    ("none-code", "generator_code", "returned None, but its ConditioningSpec gives the networks a code of width 30"),
    ("function", "generator_code", "returned function; it must return a torch.nn.Module or None"),
])
def test_a_conditioner_the_networks_cannot_use_fails_naming_it(qa, tmp_path, what, method, needle):
    res = train(tmp_path / "r", "--conditioner", "qa-capacity", "-o", f"conditioner.what={what}")
    assert_clean_error(res, 1, f"conditioner 'qa-capacity' (plugin 'qa') raised in {method}()", needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("what, needle", [
    ("g-function", "returned a G of type function, not a torch.nn.Module"),
    ("d-no-params", "returned a D with no trainable parameters"),  # torch's empty-parameter-list traceback
])
def test_a_model_whose_networks_cannot_train_fails_naming_it(qa, tmp_path, what, needle):
    res = train(tmp_path / "r", "--model", "qa-model", "-o", f"model.what={what}")
    assert_clean_error(res, 1, "model 'qa-model' (plugin 'qa') raised in build()", needle)
    assert not (tmp_path / "r").exists()


def test_a_generator_of_the_wrong_shape_fails_before_training_naming_the_model(qa, tmp_path):
    res = train(tmp_path / "r", "--model", "qa-model")
    assert_clean_error(res, 1, "model 'qa-model' (plugin 'qa') raised in G.forward()",
                       "G returned samples of shape (128, 3) for 128 samples of data shaped (2,)")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("what, needle", [
    ("eval-shape", "in eval mode G returned samples of shape (5, 3) for 5 samples of data shaped (2,)"),
    ("eval-raise", "RuntimeError: cannot run in eval mode"),
])
def test_a_generator_that_breaks_in_eval_mode_fails_naming_the_model(qa, tmp_path, what, needle):
    run = tmp_path / "r"
    res = train(run, "--model", "qa-model", "-o", f"model.what={what}", "--eval-every", "0", steps=10)
    # the final evaluation fails after the final step is saved
    assert_clean_error(res, 1, "model 'qa-model' (plugin 'qa') raised in G.forward()")
    assert steps_saved(run) == [10]
    res = invoke(["sample", str(run), "--n", "5", "--out", str(tmp_path / "s.npy")])
    assert_clean_error(res, 1, "model 'qa-model' (plugin 'qa') raised in G.forward()", needle)
    assert not (tmp_path / "s.npy").exists()


def test_samples_that_carry_autograd_history_are_detached(qa, tmp_path):
    import numpy as np

    run = tmp_path / "r"
    assert train(run, "--model", "qa-model", "-o", "model.what=requires-grad", steps=10).exit_code == 0
    for n in ("5", "5000"):  # one batch, and several
        res = invoke(["sample", str(run), "--n", n, "--out", str(tmp_path / "s.npy")])
        assert res.exit_code == 0, res.output
        assert np.load(tmp_path / "s.npy").shape == (int(n), 2)


@pytest.mark.parametrize("what, method, needle", [
    ("in-place", "d_loss", "back-propagating the value it returned failed (in the loss or in the model's forward"),
    ("wants-real-grad", "wants_real_grad", "RuntimeError: wants_real_grad broke"),
    ("defaults-raise", "optimizer_defaults", "RuntimeError: optimizer_defaults broke"),
    ("defaults-list", "optimizer_defaults", "returned list; it must return a dict"),
    ("defaults-junk", "optimizer_defaults", "recommended lr_g = -1.0, which dyngan refuses"),
    # an unknown key was ignored without a word (the learning rates stayed dyngan's)
    ("defaults-lr", "optimizer_defaults", "returned the key 'lr', which dyngan does not know; it may "
                                          "recommend lr_g, lr_d, betas"),
])
def test_a_loss_that_breaks_fails_naming_it(qa, tmp_path, what, method, needle):
    res = train(tmp_path / "r", "--loss", "qa-loss", "-o", f"loss.what={what}")
    assert_clean_error(res, 1, f"loss 'qa-loss' (plugin 'qa') raised in {method}()", needle)
    if method == "optimizer_defaults":  # read while resolving the settings: --dry-run says so too
        res = invoke(["train", "--loss", "qa-loss", "-o", f"loss.what={what}", "--dry-run"])
        assert_clean_error(res, 1, f"loss 'qa-loss' (plugin 'qa') raised in {method}()", needle)


def test_a_metric_value_past_floats_range_is_named(qa, tmp_path):
    run = tmp_path / "r"
    res = train(run, "--metrics", "qa-metric", steps=10)
    assert_clean_error(res, 1, "metric 'qa-metric' (plugin 'qa') raised in compute()", "too large for a float")
    assert steps_saved(run) == [10]


def test_evaluate_json_is_standard_json_with_non_finite_values(qa, tmp_path):
    run = tmp_path / "r"
    assert train(run, "--metrics", "qa-metric", "-o", "metric.what=inf", steps=10).exit_code == 0
    res = invoke(["evaluate", str(run), "--n", "100", "--json"])
    assert res.exit_code == 0, res.output

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    out = json.loads(res.stdout, parse_constant=refuse)
    assert out["metrics"]["qa-metric/x"] == "inf"  # as metrics.jsonl writes it
