"""The ``dyngan`` command line: thin click commands over library functions.

Each command parses its options, calls one library function and formats the
result. Library errors (``core.errors``) become one-line messages with exit
code 2 (bad input) or 1 (failure while running). Heavy modules (torch) are
imported inside the commands, so ``dyngan --help`` answers at once.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from .errors import DynganError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def fail(error: DynganError) -> "click.exceptions.Exit":
    """Print a library error as one line and exit with its code."""
    click.echo(f"Error: {error}", err=True)
    return click.exceptions.Exit(error.exit_code)


class DynganGroup(click.Group):
    """A group that adds plugin commands only when one is asked for by name.

    Loading plugins imports torch; ``dyngan --help`` must not, so the root help
    lists the core commands and plugin commands are found on first use.
    """

    _plugin_commands_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugin_commands_loaded:
            return
        self._plugin_commands_loaded = True
        from .plugins import get_host

        get_host().add_commands(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None:
            self._load_plugin_commands()
            cmd = super().get_command(ctx, cmd_name)
        return cmd

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DynganError as e:
            raise fail(e) from None


@click.group(
    cls=DynganGroup,
    context_settings=CONTEXT_SETTINGS,
    epilog="Plugins can add commands; `dyngan plugins` lists every plugin and what it adds.",
)
@click.version_option(__version__, "--version", prog_name="dyngan")
def cli() -> None:
    """dyngan: detect and resolve mode collapse in GANs.

    Losses, collapse detectors, partitioners, conditioners, datasets, models
    and metrics are plugins; `dyngan plugins` lists them.
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def plugins(as_json: bool) -> None:
    """List plugins: version, hooks, components by kind, and load errors."""
    from .plugins import get_host

    host = get_host()
    host.add_commands(cli)
    data = host.report()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for p in data:
        dist = f" [{p['distribution']} {p['version']}]" if p["distribution"] else ""
        if p["error"]:
            click.echo(f"{p['name']}{dist}  FAILED: {p['error']}")
            continue
        click.echo(f"{p['name']}{dist}  ({p['module']})")
        if p["hooks"]:
            click.echo(f"  hooks: {', '.join(p['hooks'])}")
        for kind, names in sorted(p["components"].items()):
            click.echo(f"  {kind}: {', '.join(names)}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="dyngan")
    except KeyboardInterrupt:  # pragma: no cover - training handles its own Ctrl-C
        click.echo("Interrupted.", err=True)
        sys.exit(130)
