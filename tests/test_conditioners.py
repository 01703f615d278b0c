"""The onehot and embedding conditioners: specs, code modules, fixed capacity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import OptionError
from core.plugins import load_plugins
from dyngan_plugins.conditioners import EmbeddingConditioner, OneHotConditioner
from dyngan_plugins.mlp import MLP


def test_registered_through_the_entry_point():
    host = load_plugins(env={"DYNGAN_LOAD_PLUGINS": "conditioners"})
    assert not host.failed
    assert host.registry.get("conditioner", "onehot") is OneHotConditioner
    assert host.registry.get("conditioner", "embedding") is EmbeddingConditioner


def test_onehot_spec_and_defaults():
    c = OneHotConditioner()
    spec = c.spec()
    assert (spec.g_dim, spec.d_dim, spec.d_heads, spec.capacity) == (30, 30, 1, 30)
    assert c.fake_conditions == "prior"
    c5 = OneHotConditioner(capacity=5, fake_conditions="real")
    assert c5.spec().capacity == 5 and c5.spec().g_dim == 5
    assert c5.fake_conditions == "real"
    with pytest.raises(OptionError):
        OneHotConditioner(fake_conditions="uniform")
    with pytest.raises(OptionError):
        OneHotConditioner(capacity=0)


def test_onehot_codes_are_parameter_free_one_hot_maps():
    c = OneHotConditioner(capacity=7)
    for mod in (c.generator_code(), c.discriminator_code()):
        assert list(mod.parameters()) == []
        assert mod.state_dict() == {}  # nothing to save, nothing to train
        ids = torch.tensor([0, 3, 6, 3])
        assert torch.equal(mod(ids), F.one_hot(ids, 7).float())
        assert mod.to(torch.float64)(ids).dtype == torch.float64
        with pytest.raises(IndexError):
            mod(torch.tensor([7]))  # beyond capacity


def test_embedding_spec_codes_and_defaults():
    c = EmbeddingConditioner()
    spec = c.spec()
    assert (spec.g_dim, spec.d_dim, spec.d_heads, spec.capacity) == (256, 0, 20, 20)
    assert c.fake_conditions == "real"
    assert c.discriminator_code() is None
    c = EmbeddingConditioner(capacity=4, dim=8)
    g = c.generator_code()
    params = list(g.parameters())
    assert len(params) == 1 and params[0].shape == (4, 8) and params[0].requires_grad
    codes = g(torch.tensor([0, 1, 2, 3, 1]))
    assert codes.shape == (5, 8)
    assert torch.allclose(codes.norm(dim=1), torch.ones(5), atol=1e-6)
    assert torch.equal(codes[1], codes[4])
    assert not torch.allclose(codes[0], codes[1])


@pytest.mark.parametrize("cls,opts", [(OneHotConditioner, {"capacity": 6}), (EmbeddingConditioner, {"capacity": 6, "dim": 16})])
def test_networks_accept_every_slot_without_resizing(cls, opts):
    torch.manual_seed(0)
    cond = cls(**opts)
    spec = cond.spec()
    G, D = MLP(hidden=16).build((2,), spec)
    gc, dc = cond.generator_code(), cond.discriminator_code()
    shapes = {k: v.shape for k, v in {**G.state_dict(), **D.state_dict()}.items()}
    ids = torch.arange(spec.capacity).repeat(2)
    z = torch.randn(ids.shape[0], 50)
    x = G(z, gc(ids))
    assert x.shape == (ids.shape[0], 2)
    logits, feats = D(x, None if dc is None else dc(ids))
    assert logits.shape == (ids.shape[0], spec.d_heads) and feats.shape == (ids.shape[0], 16)
    # a multi-head D answers each sample with the logit of its own condition
    picked = logits.gather(1, ids[:, None]).squeeze(1) if spec.d_heads > 1 else logits.squeeze(1)
    assert picked.shape == (ids.shape[0],)
    if spec.d_heads > 1:
        assert torch.equal(picked[:spec.capacity], logits[torch.arange(spec.capacity), torch.arange(spec.capacity)])
    # using the last slot resized nothing
    assert {k: v.shape for k, v in {**G.state_dict(), **D.state_dict()}.items()} == shapes
    # the generator's output depends on the condition
    z1 = torch.randn(1, 50).expand(spec.capacity, 50)
    out = G(z1, gc(torch.arange(spec.capacity)))
    assert not torch.allclose(out[0], out[-1])


def test_each_call_builds_a_fresh_module():
    c = EmbeddingConditioner(capacity=3, dim=4)
    a, b = c.generator_code(), c.generator_code()
    assert a is not b


def test_mlp_normal_init_is_the_reference_codes():
    """model.init=normal: every Linear of G and D gets N(0, 0.02) weights and zero biases (the
    DynGAN 2D code's initialisation); the default keeps PyTorch's fan-in scaled uniform init."""
    spec = OneHotConditioner(capacity=30).spec()
    torch.manual_seed(0)
    G, D = MLP(hidden=128, init="normal").build((2,), spec)
    layers = [m for net in (G, D) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 6
    weights = torch.cat([m.weight.flatten() for m in layers])
    assert abs(weights.std().item() - 0.02) < 1e-3 and abs(weights.mean().item()) < 1e-3
    assert all(torch.count_nonzero(m.bias) == 0 for m in layers)
    torch.manual_seed(0)
    G0, _ = MLP(hidden=128).build((2,), spec)
    first = next(m for m in G0.modules() if isinstance(m, torch.nn.Linear))
    # PyTorch's default: uniform within 1/sqrt(fan_in), biases non-zero
    assert first.weight.abs().max().item() <= 1 / (50 + 30) ** 0.5 + 1e-6
    assert first.weight.std().item() > 0.05 and torch.count_nonzero(first.bias) > 0
    with pytest.raises(OptionError):
        MLP(init="xavier")


class _Recording:
    """A loss plugin whose ns-like loss records the conditions each step's context holds."""

    seen: list = []

    @staticmethod
    def loss_class():
        from core.components import Loss

        class RecordingLoss(Loss):
            name = "recording"

            def d_loss(self, ctx):
                _Recording.seen.append(("d", ctx.real_cond.clone(), ctx.fake_cond.clone()))
                return F.softplus(-ctx.real_logits).mean() + F.softplus(ctx.fake_logits).mean()

            def g_loss(self, ctx):
                _Recording.seen.append(("g", None, ctx.fake_cond.clone()))
                return F.softplus(-ctx.fake_logits).mean()

        return RecordingLoss


@pytest.mark.parametrize("mode", ["prior", "prior-fresh", "real"])
def test_the_training_loop_draws_fake_conditions_as_the_option_says(tmp_path, mode):
    import types

    from core import api, hookimpl
    from core.testing import plugin_host
    from core.training import Trainer

    @hookimpl
    def register_losses(register):
        register(_Recording.loss_class())

    _Recording.seen = []
    with plugin_host(("recording", types.SimpleNamespace(register_losses=register_losses))) as host:
        cfg, run_dir = api.prepare({"dataset": "grid25", "loss": "recording", "conditioner": "onehot",
                                    "steps": 3, "batch_size": 64, "device": "cpu", "eval_every": 0,
                                    "checkpoint_every": 0, "out": str(tmp_path / "r"), "threads": 1,
                                    "options": {"dataset": {"n": 500}, "conditioner": {
                                        "capacity": 8, "fake_conditions": mode}}}, host=host)
        tr = Trainer(cfg, host.registry, run_dir, quiet=True)
        # five active conditions: the real labels and the prior both spread over slots 0-4
        tr.labels.copy_(torch.arange(tr.N) % 5)
        tr.prior.zero_()[:5] = 0.2
        tr.run()
    d = [(r, f) for k, r, f in _Recording.seen if k == "d"]
    g = [f for k, _, f in _Recording.seen if k == "g"]
    assert len(d) == len(g) == 3
    for (real, fake_d), fake_g in zip(d, g):
        assert int(fake_d.max()) <= 4 and int(fake_g.max()) <= 4  # only active slots
        if mode == "real":
            assert torch.equal(fake_d, real) and torch.equal(fake_g, real)
        else:
            assert not torch.equal(fake_d, real)  # drawn from the prior, not the batch's labels
            assert torch.equal(fake_g, fake_d) == (mode == "prior")  # prior-fresh: the G step draws anew
            assert len(fake_g.unique()) == 5
