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
