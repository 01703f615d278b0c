"""The hook specifications: the contract between dyngan and its plugins.

Every hook is a registration hook, called once at start-up. A plugin module
implements any of them with ``@hookimpl`` (``from core import hookimpl``) and
is declared in its distribution's ``pyproject.toml``::

    [project.entry-points.dyngan]
    my_plugin = "my_package.my_module"

``register`` takes a component class (see ``core.components``): a subclass of
the base class of the hook's kind, with a unique ``name``. Registering a class
of the wrong kind, or a name another plugin has, is an error naming both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click

    from .components import (
        CollapseDetector,
        Conditioner,
        Dataset,
        Loss,
        Metric,
        Model,
        Partitioner,
        Preset,
    )

hookspec = pluggy.HookspecMarker("dyngan")
hookimpl = pluggy.HookimplMarker("dyngan")


@hookspec
def register_losses(register: "Callable[[type[Loss]], None]") -> None:
    """Register GAN losses: subclasses of ``core.components.Loss`` that define
    ``d_loss(ctx: DStepContext)`` and ``g_loss(ctx: GStepContext)``, each
    returning a scalar tensor to minimise, computed on logits."""


@hookspec
def register_collapse_detectors(register: "Callable[[type[CollapseDetector]], None]") -> None:
    """Register mode-collapse detectors: subclasses of
    ``core.components.CollapseDetector`` with an ``every`` option and
    ``detect(ctx: TrainContext) -> Detection`` (a bool mask over the training
    set of the samples the generator misses, and the fraction)."""


@hookspec
def register_partitioners(register: "Callable[[type[Partitioner]], None]") -> None:
    """Register training-set partitioners: subclasses of
    ``core.components.Partitioner`` with an ``every`` option and
    ``partition(ctx: TrainContext, detection: Detection | None) ->
    PartitionUpdate | None`` (new labels for every training sample)."""


@hookspec
def register_conditioners(register: "Callable[[type[Conditioner]], None]") -> None:
    """Register conditioning strategies: subclasses of
    ``core.components.Conditioner`` with ``spec() -> ConditioningSpec`` and
    ``generator_code()`` / ``discriminator_code()`` modules mapping condition
    ids to codes."""


@hookspec
def register_datasets(register: "Callable[[type[Dataset]], None]") -> None:
    """Register datasets: subclasses of ``core.components.Dataset`` with
    ``load(generator) -> Tensor (N, *shape)`` (float32, CPU) and ``info()``."""


@hookspec
def register_models(register: "Callable[[type[Model]], None]") -> None:
    """Register network pairs: subclasses of ``core.components.Model`` with a
    ``z_dim`` option and ``build(data_shape, spec) -> (G, D)``."""


@hookspec
def register_metrics(register: "Callable[[type[Metric]], None]") -> None:
    """Register metrics: subclasses of ``core.components.Metric`` with
    ``supports(dataset) -> bool`` and ``compute(fake, real, dataset) ->
    dict[str, float]``."""


@hookspec
def register_presets(register: "Callable[[type[Preset]], None]") -> None:
    """Register presets: subclasses of ``core.components.Preset`` whose
    ``settings`` bundle a method's components and options for
    ``dyngan train --preset NAME``."""


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add commands to the ``dyngan`` click group (``@cli.command()``).
    Import heavy modules inside the command, not at module level."""


#: hook name -> component kind it fills (register_commands fills none)
REGISTRATION_HOOKS: dict[str, str] = {
    "register_losses": "loss",
    "register_collapse_detectors": "detector",
    "register_partitioners": "partitioner",
    "register_conditioners": "conditioner",
    "register_datasets": "dataset",
    "register_models": "model",
    "register_metrics": "metric",
    "register_presets": "preset",
}
