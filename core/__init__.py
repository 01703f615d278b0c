"""dyngan's plugin host: hook specifications, component contracts, registry, training pipeline.

``core`` knows no GAN method by name; every loss, detector, partitioner,
conditioner, dataset, model and metric comes from a plugin (the built-in ones
live in ``dyngan_plugins``).
"""

from __future__ import annotations

from .hookspecs import hookimpl

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("dyngan")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["hookimpl", "__version__"]
