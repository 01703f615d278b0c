"""benchmarks/stacked_balance.py: a stacked-digits KL split into per-channel balance and dependence."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from core import api

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "stacked_balance.py"
_spec = importlib.util.spec_from_file_location("stacked_balance", _PATH)
balance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(balance)


def test_every_triple_once_has_no_kl_at_all():
    triples = torch.cartesian_prod(torch.arange(10), torch.arange(10), torch.arange(10))
    d = balance.decompose(triples)
    assert d["n"] == 1000
    assert d["kl"] == pytest.approx(0.0, abs=1e-12)
    assert d["marginal_kl"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    assert d["dependence"] == pytest.approx(0.0, abs=1e-12)
    assert all(shares == [0.1] * 10 for shares in d["class_shares"])


def test_three_copies_of_one_uniform_channel_are_all_dependence():
    digit = torch.arange(10).repeat(50)
    d = balance.decompose(torch.stack([digit, digit, digit], 1))
    assert d["marginal_kl_sum"] == pytest.approx(0.0, abs=1e-12)
    # 10 triples of 1000 drawn: log(1000 / 10) nats, all of it the channels agreeing
    assert d["kl"] == pytest.approx(math.log(100))
    assert d["dependence"] == pytest.approx(math.log(100))


def test_a_biased_channel_shows_in_its_own_share_and_the_parts_add_up():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(10, (20000, 3), generator=g)
    pred[: 4000, 1] = 3  # channel 1 draws many more 3s
    d = balance.decompose(pred)
    assert d["kl"] == pytest.approx(d["marginal_kl_sum"] + d["dependence"])
    assert d["dependence"] >= 0.0  # the total correlation of a histogram is never negative
    assert d["marginal_kl"][1] > 10 * max(d["marginal_kl"][0], d["marginal_kl"][2])
    assert d["class_shares"][1][3] == pytest.approx(0.1 * 0.8 + 0.2, abs=0.01)
    assert all(sum(s) == pytest.approx(1.0, abs=1e-3) for s in d["class_shares"])


def test_knn_labels_by_the_majority_of_the_nearest_and_breaks_ties_by_distance():
    ref = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [9.0]])
    labels = torch.tensor([7, 7, 2, 4, 4, 1])
    x = torch.tensor([[0.05], [5.05], [8.0], [-3.0]])
    # 3-NN: {7, 7, 2} -> 7; {4, 4, 1 or 2} -> 4; {1, 4, 4} -> 4; {7, 7, 2} -> 7
    assert balance.knn_predict(x, ref, labels, k=3).tolist() == [7, 4, 4, 7]
    # 2-NN with one vote each: the nearer neighbour's digit wins
    assert balance.knn_predict(torch.tensor([[0.16], [0.14]]), ref, labels, k=2).tolist() == [2, 7]
    # k larger than the reference set: all of it votes, and 7 ties 4 with the nearer neighbours
    assert balance.knn_predict(x[:1], ref, labels, k=50).tolist() == [7]
    assert balance.knn_predict(torch.tensor([[6.0]]), ref, labels, k=50).tolist() == [4]
    assert balance.knn_predict(x[:0], ref, labels).shape == (0,)


def test_knn_reads_the_held_out_digits_about_as_well_as_the_conv_net():
    from dyngan_plugins.digits import _digits, _split, digit_classifier

    images, labels, _ = _digits()
    train, test = _split()
    knn = balance.knn_predict(images[test], images[train], labels[train], k=5)
    conv = digit_classifier().predict(images[test]).cpu()
    assert (knn == labels[test]).float().mean() > 0.97
    assert (knn == conv).float().mean() > 0.95


def _train(out: Path, dataset: str, n: int) -> Path:
    settings = {"dataset": dataset, "steps": 10, "seed": 0, "device": "cpu", "out": str(out),
                "options": {"dataset": {"n": n}}}
    return api.train(settings, quiet=True).run_dir


def test_a_stacked_digits_run_and_its_data_are_both_decomposed(tmp_path, capsys, monkeypatch):
    run = _train(tmp_path / "sd", "stacked-digits", 300)
    result = balance.analyse(run, n=600, seed=1)
    assert result["step"] == 10 and result["generator"] in ("raw", "ema")
    for part in ("samples", "data"):
        d = result[part]
        assert d["n"] == 600 and len(d["class_shares"]) == 3
        assert d["kl"] == pytest.approx(d["marginal_kl_sum"] + d["dependence"])
    o = result["knn"]
    assert o["k"] == 5 and o["held_out_accuracy"] > 0.97 and o["samples"]["n"] == 600
    assert 0.0 <= o["agreement"] <= 1.0 and len(o["agreement_per_channel"]) == 3
    assert o["agreement"] == pytest.approx(sum(o["agreement_per_channel"]) / 3)
    monkeypatch.setattr(sys, "argv", ["stacked_balance.py", str(run), "--n", "600", "--seed", "1", "--json"])
    assert balance.main() == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert "knn" not in balance.analyse(run, n=50, seed=1, knn=0)
    monkeypatch.setattr(sys, "argv", ["stacked_balance.py", str(run), "--knn", "-1"])
    assert balance.main() == 2
    assert "--knn at least 0" in capsys.readouterr().err


def test_a_run_without_digit_channels_is_refused_with_exit_2(tmp_path, capsys, monkeypatch):
    run = _train(tmp_path / "grid", "grid25", 500)
    monkeypatch.setattr(sys, "argv", ["stacked_balance.py", str(run)])
    assert balance.main() == 2
    err = capsys.readouterr().err
    assert "'grid25' has no digit channels" in err and "Traceback" not in err
