"""Pictures of a run: samples, partitions and curves over training.

``write_report(run_dir)`` reads a run directory (config.json, metrics.jsonl and the
latest good checkpoint) and writes PNG files into ``run_dir/pictures/``:

``samples.png``
  2D data: generated samples over the real data with the mode centres, each centre
  marked covered (green ring) or missed (red cross), and a second panel with the real
  points coloured by the partition the run assigned them to.
  Other vector data: the same two panels on the first two principal axes of the
  real data (one dimension: histograms).
  Images ``(C, H, W)``: one row of generated images per active condition (prior > 0),
  beside real training images of the same partition when the run partitioned its data.
``curves.png``
  Losses of D and G over training, and, when the run logged them, modes covered,
  sample quality, the collapse fraction and the number of partitions.

A mode counts as covered as in the PacGAN protocol: at least one generated sample whose
nearest centre it is lies closer than 3 sigma to it (``coverage``). The pictures are a
pure function of the run directory and ``n``/``seed``; each file is written atomically.

matplotlib is the optional extra ``dyngan[plots]``, imported only here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import rundir
from .errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from .api import Run

    from .plugins import PluginHost

PICTURES = "pictures"
DPI = 110
#: real points drawn at most (a denser scatter only adds ink)
MAX_REAL_POINTS = 20_000
#: image grid: rows and samples per row
GRID_ROWS = 10
GRID_COLS = 10
#: a mode is covered by a sample closer than this many sigmas (PacGAN protocol)
COVER_SIGMAS = 3.0


def _pyplot():
    """matplotlib's pyplot with the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError('pictures need matplotlib: pip install "dyngan[plots]"') from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- coverage


def coverage(samples: "Tensor", centres: "Tensor | Sequence[Sequence[float]]", sigma: float,
             sigmas: float = COVER_SIGMAS, chunk: int = 65_536) -> "Tensor":
    """Which modes the samples cover: a bool tensor, one entry per centre.

    A mode is covered when at least one sample whose nearest centre it is lies strictly
    closer than ``sigmas * sigma`` to it (the PacGAN rule behind ``mixture/modes``).
    Non-finite samples cover nothing.
    """
    import torch

    c = torch.as_tensor(centres, dtype=torch.float64)
    if c.dim() != 2 or c.shape[0] == 0:
        raise ValueError(f"centres must be a non-empty (K, D) array, got shape {tuple(c.shape)}")
    x = samples.detach().to("cpu", torch.float64).reshape(samples.shape[0], -1)
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"samples have {x.shape[1]} dimensions, centres {c.shape[1]}")
    covered = torch.zeros(c.shape[0], dtype=torch.bool)
    thr = float(sigmas) * float(sigma)
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk]
        xb = xb[torch.isfinite(xb).all(1)]
        if xb.shape[0] == 0:
            continue
        d = torch.cdist(xb, c)
        nearest_d, nearest = d.min(1)
        covered[nearest[nearest_d < thr]] = True
    return covered


# --------------------------------------------------------------------------- the run


def condition_seed(seed: int, condition: int) -> int:
    """The noise seed of one condition's row of images (each row its own noise); also the seed
    of benchmarks/condition_balance.py's samples per condition."""
    return seed + 104_729 * (condition + 1)


def _title(run: "Run") -> str:
    cfg = run.cfg
    parts = [f"run {run.name}", cfg["dataset"], f"loss {cfg['loss']}"]
    if cfg.get("preset"):
        parts.append(f"preset {cfg['preset']}")
    elif cfg.get("partitioner"):
        parts.append(f"partitioner {cfg['partitioner']}")
    parts.append(f"step {run.step}")
    return "  |  ".join(parts)


# --------------------------------------------------------------------------- writing


def _save(fig: Any, path: Path) -> Path:
    """Save a figure atomically: a temporary name in the same directory, then a rename."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=DPI, format="png", metadata={"Software": None}, bbox_inches="tight",
                    pad_inches=0.15, facecolor="white")
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):  # a read-only run directory, a full disk, a folder in the way
            raise UsageError(f"cannot write pictures into {str(path.parent)!r}: {e.strerror or e}") from None
        raise
    finally:
        plt.close(fig)
    return path


#: partitions the sample picture's legend lists one by one (more: a note instead)
LEGEND_PARTITIONS = 30


def _partition_colours(k: int) -> list:
    import matplotlib

    names = ["tab10"] if k <= 10 else ["tab20", "tab20b", "tab20c"]
    cols: list = []
    for nm in names:
        cmap = matplotlib.colormaps[nm]
        cols.extend(cmap(i) for i in range(cmap.N))
    return [cols[i % len(cols)] for i in range(k)]


def _partition_entries(run: "Run") -> list[tuple[int, Any, str]]:
    """Each partition the run's labels use: (label, its colour, its legend text with its size)."""
    import torch

    active = sorted(int(v) for v in torch.unique(run.labels).tolist())
    counts = torch.bincount(run.labels, minlength=max(active) + 1)
    cols = _partition_colours(len(active))
    return [(lab, cols[i], f"partition {lab} ({int(counts[lab])} points)") for i, lab in enumerate(active)]


def _subsample(n_total: int, n_max: int, seed: int) -> "Tensor":
    import torch

    if n_total <= n_max:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n_max].sort().values


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------- vector data


def _projection(real: "Tensor") -> tuple["Tensor", "Tensor", list[str]]:
    """Mean and the two leading principal axes of the real data (identity for 2D)."""
    import torch

    d = real.shape[1]
    real = real.double()  # data near float32's range would overflow the mean and the SVD there
    mean = real.mean(0)
    if d == 2:
        return torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), ["x[0]", "x[1]"]
    sub = real[_subsample(real.shape[0], 50_000, 0)] - mean
    _, s, v = torch.linalg.svd(sub, full_matrices=False)
    if v.shape[0] < 2:  # a single sample: one axis; the second shows nothing
        v = torch.cat([v, torch.zeros(2 - v.shape[0], d, dtype=v.dtype)])
        s = torch.cat([s, torch.zeros(2 - s.shape[0], dtype=s.dtype)])
    var = (s ** 2) / max(float((s ** 2).sum()), 1e-30)
    return mean, v[:2].T, [f"principal axis {i + 1} ({100 * float(var[i]):.0f}% of variance)" for i in range(2)]


def _samples_vector(run: "Run", n: int, seed: int, plt: Any) -> Path:
    import torch

    real = run.real.reshape(run.real.shape[0], -1)
    d = real.shape[1]
    fake = run.generate(n, seed)
    fake = fake.reshape(n, -1)
    finite = torch.isfinite(fake).all(1)
    keep = _subsample(real.shape[0], MAX_REAL_POINTS, seed + 1)
    real_pts = real[keep]
    labels = run.labels[keep] if run.labels is not None else None

    centres = run.info.get("centres")
    sigma = run.info.get("sigma")
    cov = None
    if centres is not None and sigma is not None:
        try:
            c = torch.as_tensor(centres, dtype=torch.float32)
            if c.dim() == 2 and c.shape[1] == d and c.shape[0] > 0:
                cov = coverage(fake, c, float(sigma))
            else:
                centres = None
        except (TypeError, ValueError):
            centres = None
    else:
        centres = None

    # the partition panel only says something when the run partitions (or did)
    if labels is not None and not (run.cfg.get("partitioner") or int(run.labels.max()) > 0):
        labels = None
    if d == 1:
        return _samples_1d(run, real_pts, fake[finite], plt, labels)

    mean, axes, axis_names = _projection(real)

    def proj(x):
        return ((x.double() - mean) @ axes).float()

    rp, fp = proj(real_pts), proj(fake[finite])
    panels = 2 if labels is not None else 1
    fig, axs = plt.subplots(1, panels, figsize=(6.2 * panels, 7.0), squeeze=False)
    # fixed layout: equal-aspect axes, titles above, legends below (cropped by the tight bbox)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.86, bottom=0.12, wspace=0.18)
    ax = axs[0][0]
    # generated over the real data: drawn under it, samples inside a real cluster were hidden
    ax.scatter(rp[:, 0], rp[:, 1], s=2, c="0.2", alpha=0.5, linewidths=0, label="real data",
               rasterized=True, zorder=2)
    ax.scatter(fp[:, 0], fp[:, 1], s=5, c="tab:blue", alpha=0.45, linewidths=0,
               label=f"generated ({int(finite.sum())})", rasterized=True, zorder=3)
    head = f"step {run.step}: {_plural(int(finite.sum()), 'generated sample')}"
    if centres is not None and cov is not None:
        cp = proj(torch.as_tensor(centres, dtype=torch.float32))
        hit, miss = cp[cov], cp[~cov]
        if hit.shape[0]:
            ax.scatter(hit[:, 0], hit[:, 1], s=140, facecolors="none", edgecolors="tab:green", linewidths=2.0,
                       label=f"mode covered ({hit.shape[0]})", zorder=4)
        if miss.shape[0]:
            ax.scatter(miss[:, 0], miss[:, 1], s=110, c="tab:red", marker="x", linewidths=2.5,
                       label=f"mode missed ({miss.shape[0]})", zorder=4)
        head = (f"step {run.step}: {int(cov.sum())}/{cov.numel()} modes covered\n"
                f"(covered: a generated sample within {COVER_SIGMAS:g} sigma = {COVER_SIGMAS * float(sigma):.3g})")
    if int((~finite).sum()):
        head += f"\n{int((~finite).sum())} generated samples are NaN/inf (not drawn)"
    ax.set_title(head, fontsize=11)
    _vector_axes(ax, axis_names, rp, fp)
    _point_legend(ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, fontsize=9,
                            frameon=False))

    if labels is not None:
        ax2 = axs[0][1]
        entries = _partition_entries(run)
        cols = [col for _, col, _ in entries]
        for lab, col, text in entries:
            m = labels == lab  # (a partition none of the drawn points is in keeps its legend entry)
            ax2.scatter(rp[m, 0], rp[m, 1], s=3, color=col, linewidths=0, alpha=0.8, label=text, rasterized=True)
        if centres is not None:
            cp = proj(torch.as_tensor(centres, dtype=torch.float32))
            ax2.scatter(cp[:, 0], cp[:, 1], s=16, c="black", marker="+", linewidths=0.8,
                        label="mode centre", zorder=4)
        k = len(entries)
        ax2.set_title(f"real data coloured by partition: {_plural(k, 'partition')}", fontsize=11)
        _vector_axes(ax2, axis_names, rp, fp)
        if k <= LEGEND_PARTITIONS:  # (30: the onehot conditioner's capacity)
            many = k > 12
            _point_legend(ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=5 if many else 3,
                                     fontsize=6.5 if many else 8, frameon=False))
        else:
            distinct = len(set(map(tuple, cols)))
            ax2.text(0.01, 0.01, f"{k} partitions, one colour each"
                     + (f" (colours repeat after {distinct})" if k > distinct else "")
                     + (", + a mode centre" if centres is not None else "") + "; no legend above "
                     f"{LEGEND_PARTITIONS}", fontsize=8, transform=ax2.transAxes, va="bottom")
    sup = _title(run)
    if centres is not None and cov is not None:
        sup += f"  |  {int(cov.sum())}/{cov.numel()} modes covered"
    sup += f"  |  {_plural(len(run.conditions), 'partition')}"
    fig.suptitle(sup, fontsize=12)
    return _save(fig, run.dir / PICTURES / "samples.png")


def _point_legend(leg: Any) -> None:
    """Legend entries of tiny scatter points drawn big and opaque enough to read."""
    for h in getattr(leg, "legend_handles", getattr(leg, "legendHandles", [])):
        sizes = getattr(h, "get_sizes", lambda: [])()
        if len(sizes) and float(sizes[0]) < 20:
            h.set_sizes([30.0])
            h.set_alpha(1.0)


def _vector_axes(ax: Any, names: list[str], rp: "Tensor", fp: "Tensor") -> None:
    import torch

    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_aspect("equal", adjustable="box")
    # frame the real data (generated outliers far away would otherwise shrink it to a dot)
    lo = torch.quantile(rp, 0.0, dim=0)
    hi = torch.quantile(rp, 1.0, dim=0)
    span = (hi - lo).clamp_min(1e-6)
    lo, hi = lo - 0.15 * span, hi + 0.15 * span
    if fp.shape[0]:
        flo = torch.quantile(fp, 0.01, dim=0)
        fhi = torch.quantile(fp, 0.99, dim=0)
        lo = torch.minimum(lo, flo - 0.05 * span)
        hi = torch.maximum(hi, fhi + 0.05 * span)
    # a square window: with equal scales the panel then fills its (near square) box
    mid, half = (lo + hi) / 2, float((hi - lo).max()) / 2
    ax.set_xlim(float(mid[0]) - half, float(mid[0]) + half)
    ax.set_ylim(float(mid[1]) - half, float(mid[1]) + half)
    ax.grid(True, alpha=0.25)


def _samples_1d(run: "Run", real: "Tensor", fake: "Tensor", plt: Any, labels: "Tensor | None" = None) -> Path:
    """Histograms of one-dimensional data: generated against real, and (a run that partitions)
    the real data stacked by partition beside it."""
    import torch

    panels = 2 if labels is not None else 1
    fig, axs = plt.subplots(1, panels, figsize=(8 * panels, 4.5), layout="constrained", squeeze=False)
    ax = axs[0][0]
    lo = float(torch.minimum(real.min(), fake.min() if fake.numel() else real.min()))
    hi = float(torch.maximum(real.max(), fake.max() if fake.numel() else real.max()))
    # float64: hi - lo of data near float32's range overflows there (the bins came out inf)
    bins = torch.linspace(lo, hi if hi > lo else lo + max(1.0, abs(lo) * 1e-6), 81, dtype=torch.float64).tolist()
    ax.hist(real[:, 0].tolist(), bins=bins, density=True, color="0.6", alpha=0.7, label="real data")
    ax.hist(fake[:, 0].tolist(), bins=bins, density=True, histtype="step", color="tab:blue",
            linewidth=2, label=f"generated ({fake.shape[0]})")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_title(f"step {run.step}: generated vs real  |  {_plural(len(run.conditions), 'partition')}", fontsize=11)
    ax.legend()
    ax.grid(True, alpha=0.25)
    if labels is not None:
        ax2 = axs[0][1]
        entries = _partition_entries(run)
        parts = [(real[labels == lab, 0].tolist(), col, text) for lab, col, text in entries]
        parts = [p for p in parts if p[0]]
        ax2.hist([p[0] for p in parts], bins=bins, stacked=True, color=[p[1] for p in parts],
                 label=[p[2] for p in parts])
        ax2.set_xlabel("x")
        ax2.set_ylabel("real samples")
        k = len(entries)
        ax2.set_title(f"real data stacked by partition: {_plural(k, 'partition')}", fontsize=11)
        if k <= LEGEND_PARTITIONS:
            ax2.legend(fontsize=8 if k <= 12 else 6.5, ncol=1 if k <= 12 else 3)
        ax2.grid(True, alpha=0.25)
    fig.suptitle(_title(run), fontsize=12)
    return _save(fig, run.dir / PICTURES / "samples.png")


# --------------------------------------------------------------------------- images


def _to_rgb(x: "Tensor") -> "Tensor":
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` in [0, 1] (1 channel: grey)."""
    import torch

    x = torch.nan_to_num(x.float(), nan=-1.0, posinf=1.0, neginf=-1.0)
    x = ((x + 1) / 2).clamp(0, 1)
    c = x.shape[1]
    if c == 3:
        pass
    elif c == 1:
        x = x.expand(-1, 3, -1, -1)
    else:  # no natural colour mapping: the mean over channels, in grey
        x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1)


def _mosaic(rows: list["Tensor"], cols: int, pad: int = 1) -> "Tensor":
    """Rows of ``(k <= cols, H, W, 3)`` images -> one ``(rows*(H+pad)+pad, cols*(W+pad)+pad, 3)`` picture."""
    import torch

    h, w = rows[0].shape[1], rows[0].shape[2]
    out = torch.ones(len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3)
    for r, imgs in enumerate(rows):
        for c in range(min(cols, imgs.shape[0])):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y:y + h, x:x + w] = imgs[c]
    return out


def _samples_images(run: "Run", seed: int, plt: Any) -> Path:
    import torch

    shape = tuple(run.real.shape[1:])
    if len(shape) == 2:  # (H, W): one grey channel
        def as_chw(x):
            return x.reshape(x.shape[0], 1, *shape)
    else:
        def as_chw(x):
            return x

    prior = run.prior.cpu()
    active = run.conditions
    active.sort(key=lambda k: (-float(prior[k]), k))
    shown = sorted(active[:GRID_ROWS])
    per = max(1, GRID_ROWS // len(shown))  # rows per condition (unconditional: all ten rows)
    gen_rows, real_rows, row_names = [], [], []
    labels = run.labels
    partitioned = labels is not None and len(active) > 1
    g = torch.Generator().manual_seed(seed + 1)
    for k in shown:
        imgs = _to_rgb(as_chw(run.generate(per * GRID_COLS, condition_seed(seed, k), condition=k)))
        for r in range(per):
            gen_rows.append(imgs[r * GRID_COLS:(r + 1) * GRID_COLS])
            row_names.append(f"condition {k}\np = {float(prior[k]):.3f}" if r == 0 else "")
        if partitioned:
            idx = torch.nonzero(labels == k).flatten()
            if idx.numel():
                pick = idx[torch.randperm(idx.numel(), generator=g)[:per * GRID_COLS]]
                rimgs = _to_rgb(as_chw(run.real[pick]))
            else:
                rimgs = torch.ones(0, *gen_rows[-1].shape[1:])
            for r in range(per):
                real_rows.append(rimgs[r * GRID_COLS:(r + 1) * GRID_COLS]
                                 if rimgs.shape[0] > r * GRID_COLS else torch.ones(0, *gen_rows[-1].shape[1:]))
    if not partitioned:  # real images, drawn at random, for comparison
        pick = torch.randperm(run.real.shape[0], generator=g)[:len(gen_rows) * GRID_COLS]
        rimgs = _to_rgb(as_chw(run.real[pick]))
        real_rows = [rimgs[r * GRID_COLS:(r + 1) * GRID_COLS] for r in range(len(gen_rows))]

    gen = _mosaic(gen_rows, GRID_COLS)
    real = _mosaic(real_rows, GRID_COLS) if real_rows and any(r.shape[0] for r in real_rows) else None
    h = gen.shape[0]
    cell = 0.62  # inches per image, whatever its pixel size
    n_rows = len(gen_rows)
    width = (2.0 + GRID_COLS * cell) * (2 if real is not None else 1) + 0.4
    fig, axs = plt.subplots(1, 2 if real is not None else 1, figsize=(width, 1.3 + n_rows * cell), squeeze=False,
                            layout="constrained")
    step_h = (h - 1) / n_rows
    # one label per condition, centred on its group of rows; lines between the groups
    ticks = [0.5 + step_h * (i + per / 2) for i, nm in enumerate(row_names) if nm]
    bounds = [step_h * i for i in range(per, n_rows, per)] if per > 1 and len(shown) > 1 else []
    names = [nm for nm in row_names if nm]
    ax = axs[0][0]
    ax.imshow(gen.numpy(), interpolation="nearest")
    ax.set_title(f"generated, {'one row' if per == 1 else f'{per} rows'} per condition "
                 f"({len(shown)} of {len(active)} conditions shown)"
                 if len(active) > 1 else "generated (unconditional)", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks(ticks if len(active) > 1 else [])
    ax.set_yticklabels(names if len(active) > 1 else [], fontsize=9)
    ax.tick_params(length=0)
    for y in bounds:
        ax.axhline(y, color="black", linewidth=1.5)
    if real is not None:
        ax2 = axs[0][1]
        ax2.imshow(real.numpy(), interpolation="nearest")
        ax2.set_title("real training images of each partition" if partitioned else "real training images",
                      fontsize=11)
        ax2.set_xticks([])
        ax2.set_yticks(ticks if partitioned else [])
        ax2.set_yticklabels([f"partition {k}\n{int((labels == k).sum())} images" for k in shown]
                            if partitioned else [], fontsize=9)
        ax2.tick_params(length=0)
        for y in bounds if partitioned else []:
            ax2.axhline(y, color="black", linewidth=1.5)
    fig.suptitle(_title(run) + f"  |  {_plural(len(run.conditions), 'partition')}", fontsize=12)
    return _save(fig, run.dir / PICTURES / "samples.png")


# --------------------------------------------------------------------------- curves


#: logged values beyond this size are left out of the curves: an axis cannot span them
_PLOTTABLE = 1e300


def _num(v: Any) -> float | None:
    """A logged number that a curve can show, or None. NaN (logged as a string) stays NaN: a gap
    in its line. inf, values beyond +-1e300 (no axis spans them) and non-numbers are None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v) if not isinstance(v, int) or abs(v) < 2**1023 else math.inf
    elif isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
    else:
        return None
    return f if math.isnan(f) or abs(f) <= _PLOTTABLE else None


def _series(records: list[dict[str, Any]], key: str, event: str | None) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("event") != event or not isinstance(r.get("step"), int):
            continue
        v = _num(r.get(key))
        if v is not None:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _from_zero(ax: Any) -> None:
    """A y axis that starts at 0, a little below it so that markers at 0 stay whole."""
    top = ax.get_ylim()[1]
    top = top if top > 0 else 1.0
    ax.set_ylim(-0.03 * top, top)


def _keys(records: list[dict[str, Any]], event: str, pred) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        if r.get("event") == event:
            for k in r:
                if pred(k):
                    seen[k] = None
    return list(seen)


def _curves(run: "Run", plt: Any) -> Path:
    import re

    recs = run.metrics
    panels: list[tuple[str, Any]] = []

    def losses(ax):
        drawn = False
        for key, lab, col in (("loss/d", "discriminator (D)", "tab:red"), ("loss/g", "generator (G)", "tab:blue")):
            xs, ys = _series(recs, key, None)
            if xs:
                ax.plot(xs, ys, color=col, linewidth=1.3, label=lab)
                drawn = True
        for i, r in enumerate(r for r in recs if r.get("event") == "divergence" and isinstance(r.get("step"), int)):
            ax.axvline(r["step"], color="black", linestyle=":", linewidth=1.2,
                       label="divergence (NaN/inf)" if i == 0 else None)
            drawn = True
        ax.set_ylabel("loss")
        ax.set_title(f"losses ({run.cfg['loss']})", fontsize=11)
        if drawn:
            ax.legend(fontsize=9, loc="best", framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "no losses logged yet", ha="center", va="center", transform=ax.transAxes)

    panels.append(("losses", losses))

    mode_keys = _keys(recs, "eval", lambda k: k.endswith("/modes"))
    if mode_keys:
        total = None
        if isinstance(run.info.get("centres"), list):
            total = len(run.info["centres"])
        elif _num(run.info.get("modes")) is not None:
            total = int(_num(run.info["modes"]))
        else:
            for k in _keys(recs, "eval", lambda k: k.endswith("/max_modes")):
                _, ys = _series(recs, k, "eval")
                if ys:
                    total = int(ys[-1])

        def modes(ax):
            for k in mode_keys:
                xs, ys = _series(recs, k, "eval")
                ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.3, label=k)
            if total:
                ax.axhline(total, color="0.4", linestyle="--", linewidth=1, label=f"all modes ({total})")
            ax.set_ylabel("modes covered")
            _from_zero(ax)
            if total:  # above the frame, not on it
                lo, hi = ax.get_ylim()
                ax.set_ylim(lo, max(hi, 1.06 * total))
            ax.set_title("modes covered (evaluation)", fontsize=11)
            ax.legend(fontsize=9, loc="best", framealpha=0.6)

        panels.append(("modes", modes))

    def metric_panel(keys: list[str], ylabel: str, title: str, scale: Callable[[Any], None]):
        """A panel of evaluation series ``keys``, one line each; ``scale(ax)`` sets the y range."""
        def draw(ax):
            for k, also, (xs, ys) in _distinct_series(keys):
                ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.3, label=" = ".join([k, *also]))
            ax.set_ylabel(ylabel)
            scale(ax)
            ax.set_title(title, fontsize=11)
            ax.legend(fontsize=9, loc="best", framealpha=0.6)
        return draw

    def _distinct_series(keys: list[str]) -> list[tuple[str, list[str], tuple[list[int], list[float]]]]:
        """``keys`` with each series that repeats an earlier one exactly (the PacGAN ``hq`` is the
        DynGAN protocol's ``hq3``) folded into that one's label: drawn twice, one hid the other.
        Each comes with its series (steps, values)."""
        out: list[tuple[str, list[str], tuple[list[int], list[float]]]] = []
        seen: dict[tuple, int] = {}
        for k in keys:
            series = _series(recs, k, "eval")
            sig = tuple(map(tuple, series))
            if sig in seen:
                out[seen[sig]][1].append(k)
            else:
                seen[sig] = len(out)
                out.append((k, [], series))
        return out

    hq_keys = _keys(recs, "eval", lambda k: re.search(r"/hq\d*$", k) is not None)
    if hq_keys:
        panels.append(("quality", metric_panel(hq_keys, "fraction of samples", "high-quality samples (evaluation)",
                                               lambda ax: ax.set_ylim(-0.02, 1.02))))
    kl_keys = _keys(recs, "eval", lambda k: re.search(r"(^|/)(reverse_)?kl$", k) is not None)
    if kl_keys:
        panels.append(("kl", metric_panel(kl_keys, "KL (nats)",
                                          "KL(generated mode histogram || uniform), 0 is best (evaluation)",
                                          _from_zero)))
    # every other metric (prdc's precision and recall, a plugin's), bookkeeping keys left out
    shown = set(mode_keys) | set(hq_keys) | set(kl_keys)
    other_keys = _keys(recs, "eval", lambda k: "/" in k and k not in shown and not re.search(r"/(n|max_modes)$", k))
    if other_keys:
        panels.append(("other metrics", metric_panel(other_keys, "value", "other metrics (evaluation)",
                                                     lambda ax: None)))

    cx, cy = _series(recs, "collapse/fraction", "detection")
    if cx:
        def collapse(ax):
            ax.plot(cx, cy, marker="o", markersize=4, color="tab:purple", linewidth=1.3,
                    label="collapsed fraction of training samples")
            tau = (run.cfg.get("options", {}).get("partitioner") or {}).get("tau")
            if _num(tau) is not None and run.cfg.get("partitioner"):
                ax.axhline(float(tau), color="0.4", linestyle="--", linewidth=1,
                           label=f"partition threshold tau = {float(tau):g}")
            ax.set_ylabel("fraction")
            _from_zero(ax)
            det = run.cfg.get("detector")
            ax.set_title("collapse detection" + (f" ({det})" if det else ""), fontsize=11)
            ax.legend(fontsize=9, loc="best", framealpha=0.6)

        panels.append(("collapse", collapse))

    px, py = _series(recs, "partition/count", "partition")
    if px or run.cfg.get("partitioner"):
        last = max([run.step] + [r["step"] for r in recs if isinstance(r.get("step"), int)])

        def parts(ax):
            xs = [0] + px + [max(last, px[-1] if px else 0)]
            ys = [1.0] + py + [py[-1] if py else 1.0]
            ax.step(xs, ys, where="post", color="tab:green", linewidth=1.8, label="partitions")
            if px:
                ax.plot(px, py, "o", color="tab:green", markersize=4)
            ax.set_ylabel("partitions")
            ax.set_ylim(0, max(ys) + 1)
            ax.yaxis.get_major_locator().set_params(integer=True)
            part = run.cfg.get("partitioner")
            ax.set_title("number of partitions" + (f" ({part})" if part else "")
                         + ("" if px else ": never partitioned"), fontsize=11)

        panels.append(("partitions", parts))

    fig, axs = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels) + 0.8), sharex=True, squeeze=False,
                            layout="constrained")
    for (_, draw), ax in zip(panels, axs[:, 0]):
        draw(ax)
        ax.grid(True, alpha=0.3)
        for s in px:  # when the data were re-partitioned
            ax.axvline(s, color="tab:green", alpha=0.25, linewidth=1)
    axs[-1][0].set_xlabel("training step")
    fig.suptitle(_title(run), fontsize=12)
    return _save(fig, run.dir / PICTURES / "curves.png")


# --------------------------------------------------------------------------- entry point


def write_report(run_dir: str | Path, n: int = 2500, seed: int = 0, host: "PluginHost | None" = None,
                 *, device: str = "cpu") -> list[Path]:
    """Write the pictures of a run into ``run_dir/pictures/``; returns their paths.

    ``n`` generated samples are drawn for vector data (image grids draw their own ten
    per row), with ``seed``. Raises UsageError / CheckpointError for a bad run directory,
    UsageError when matplotlib is missing.
    """
    from .api import _check_n, load_run, run_path

    _check_n(n)
    run_dir = run_path(run_dir)
    rundir.read_config(run_dir)  # a bad run directory says so before anything else
    plt = _pyplot()
    run = load_run(run_dir, device=device, host=host)
    _ = run.metrics  # a bad metrics.jsonl says so before any picture is written
    out = run_dir / PICTURES
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write pictures into {str(out)!r}: {e.strerror or e}") from None
    shape = tuple(run.real.shape[1:])
    written = []
    with plt.rc_context({"figure.dpi": DPI, "axes.titleweight": "normal"}):
        if len(shape) == 2 or (len(shape) == 3 and shape[1] > 1 and shape[2] > 1):
            written.append(_samples_images(run, seed, plt))
        else:  # vectors, and any other shape as the vectors of its flattened samples
            written.append(_samples_vector(run, n, seed, plt))
        written.append(_curves(run, plt))
    return written
