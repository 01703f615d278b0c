"""The ``dyngan`` command line: thin click commands over library functions.

Each command parses its options, calls one library function and formats the
result. Library errors (``core.errors``) become one-line messages with exit
code 2 (bad input) or 1 (failure while running). Heavy modules (torch) are
imported inside the commands, so ``dyngan --help`` answers at once.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from typing import Any

import click

from . import __version__
from .console import safe_write
from .errors import DynganError, format_traceback, traceback_wanted

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def fail(error: DynganError) -> "click.exceptions.Exit":
    """Print a library error as one line (after its traceback with ``DYNGAN_TRACEBACK=1``) and exit
    with its code."""
    # a stderr that is gone (a closed pipe, a hung-up terminal) is muted: the exit code still says it
    if not traceback_wanted() or safe_write(sys.stderr, format_traceback(error) + "\n"):
        safe_write(sys.stderr, f"Error: {_bounded(str(error))}\n")
    return click.exceptions.Exit(error.exit_code)


#: the longest error line printed: a message quoting a huge value (a 500,000-character setting in a
#: config file) keeps its start and end around a note of what was left out
MAX_ERROR_CHARS = 4000


def _bounded(text: str) -> str:
    if len(text) <= MAX_ERROR_CHARS:
        return text
    head, tail = MAX_ERROR_CHARS * 3 // 4, MAX_ERROR_CHARS // 4
    return f"{text[:head]} [... {len(text) - head - tail:,} characters left out ...] {text[-tail:]}"


class DynganGroup(click.Group):
    """A group that adds plugin commands only when one is asked for by name.

    Loading plugins imports torch; ``dyngan --help`` must not, so the root help
    lists the core commands and plugin commands are found on first use.
    """

    _commands_host: Any = None  # the plugin host whose commands were added
    _core_commands: frozenset[str] | None = None

    def _load_plugin_commands(self) -> None:
        from .plugins import get_host

        host = get_host()
        if self._commands_host is host:
            return
        self._commands_host = host
        if self._core_commands is None:  # before any plugin command: the core's own
            self._core_commands = frozenset(self.commands)
        host.add_commands(self, protected=self._core_commands)

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
        except KeyboardInterrupt:  # click would say "Aborted!" and exit 1; training handles its own
            click.echo("Error: interrupted by Ctrl-C", err=True)
            raise click.exceptions.Exit(130) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - a plugin's command may raise anything
            which = self._plugin_command(ctx.invoked_subcommand)
            if which is None:
                raise  # a core command: a bug of dyngan's own, shown in full
            # a runtime failure of the plugin's code, not bad input: one line naming it, exit code 1
            if traceback_wanted():
                click.echo(format_traceback(e), err=True)
            lines = str(e).strip().splitlines()
            why = f"{type(e).__name__}: {lines[0]}{' ...' if len(lines) > 1 else ''}" if lines else type(e).__name__
            click.echo(f"Error: {which} failed: {why}", err=True)
            raise click.exceptions.Exit(1) from None

    def _plugin_command(self, name: str | None) -> str | None:
        """``command 'NAME' of plugin 'P' (distribution D)`` when ``name`` is a command a plugin added,
        else None (a core command)."""
        if name is None or self._core_commands is None or name in self._core_commands:
            return None
        host = self._commands_host
        info = next((p for p in getattr(host, "plugins", {}).values() if name in p.commands), None)
        if info is None:
            return f"plugin command {name!r}"
        dist = f" (distribution {info.distribution})" if info.distribution else ""
        return f"command {name!r} of plugin {info.name!r}{dist}"


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
@click.option("--options", "show_options", is_flag=True,
              help="Also show each component's options (as -o KIND.KEY=DEFAULT) and each preset's settings.")
def plugins(as_json: bool, show_options: bool) -> None:
    """List plugins: version, hooks, components by kind, and load errors.

    The JSON output always carries the option schemas (key "options").
    """
    from .plugins import get_host

    host = get_host()
    cli._load_plugin_commands()  # type: ignore[attr-defined]
    data = host.report()
    for warning in host.warnings:  # e.g. DYNGAN_BLOCK_PLUGINS naming nothing installed
        click.echo(f"Warning: {warning}", err=True)
    nothing = _nothing_loaded(host)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        if nothing:
            click.echo(nothing, err=True)  # stdout stays JSON
        return
    for info, p in zip(host.plugins.values(), data):  # report() lists host.plugins in order
        dist = f" [{p['distribution']} {p['version']}]" if p["distribution"] else ""
        if p["error"]:
            click.echo(f"{p['name']}{dist}  FAILED: {p['error']}")
            if info.traceback and traceback_wanted():
                click.echo(textwrap.indent(info.traceback.rstrip("\n"), "  "))
            continue
        click.echo(f"{p['name']}{dist}  ({p['module']})")
        if p["hooks"]:
            click.echo(f"  hooks: {', '.join(p['hooks'])}")
        if p["commands"]:
            click.echo(f"  commands: {', '.join(p['commands'])}")
        for kind, names in sorted(p["components"].items()):
            click.echo(f"  {kind}: {', '.join(names)}")
            if show_options:
                for name in names:
                    lines = _describe_lines(kind, p["options"].get(kind, {}).get(name, {}))
                    click.echo(f"    {name}" + ("" if lines else ": no options"))
                    for line in lines:
                        click.echo(f"      {line}")
    if nothing:
        click.echo(nothing)


def _nothing_loaded(host: Any) -> str | None:
    """``no plugins loaded`` and why, when no plugin loaded; else None."""
    if host.loaded:
        return None
    if host.load_nothing:
        return "no plugins loaded (DYNGAN_LOAD_PLUGINS is set and empty)"
    if host.plugins:
        return "no plugins loaded: every plugin failed"
    if host.skipped:
        return "no plugins loaded: DYNGAN_LOAD_PLUGINS / DYNGAN_BLOCK_PLUGINS skip every installed plugin"
    return "no plugins loaded"


def _describe_lines(kind: str, schema: dict[str, Any]) -> list[str]:
    """Lines for one component under ``dyngan plugins --options``."""
    if isinstance(schema.get("malformed"), str):  # the schema itself could not be read
        return [f"malformed: {schema['malformed']}"]
    lines = []
    if kind == "preset":
        for key, value in schema.items():
            if key == "options" and isinstance(value, dict):
                lines += [f"-o {k}.{kk}={_cli_value(vv)}" for k, opts in value.items()
                          for kk, vv in (opts.items() if isinstance(opts, dict) else [])]
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        return lines
    for key, o in schema.items():
        if "malformed" in o:
            lines.append(f"-o {kind}.{key}: malformed ({o['malformed']})")
            continue
        lines.append(f"-o {kind}.{key}={_cli_value(o['default'])}  [{_option_type(o)}]  {o['help']}".rstrip())
    return lines


def _cli_value(v: Any) -> str:
    """A value as it is written after ``-o kind.key=``."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _option_type(o: dict[str, Any]) -> str:
    from .options import Option

    fields = {k: o[k] for k in ("min", "max", "nullable")}
    choices = tuple(o["choices"]) if o["choices"] is not None else None
    t = {"bool": bool, "int": int, "float": float, "str": str}.get(o["type"])
    if t is None:
        return o["type"]
    return Option(o["default"], type=t, choices=choices, **fields).describe()



def _opt(*names: str, **kw: Any):
    return click.option(*names, default=None, show_default=False, **kw)


#: ``--seed`` of ``sample`` / ``evaluate`` / ``report``; the bound is core.config.MAX_SEED, written
#: out so that `dyngan --help` does not import the config machinery (tests/test_config.py checks them)
_seed_option = click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)


def _run_dir(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """RUN_DIR, refused when empty (an unset shell variable): Path("") is the current directory."""
    if not value.strip():
        from .errors import UsageError

        raise UsageError("RUN_DIR is empty: name a run directory (the --out of `dyngan train`)")
    return value


_run_dir_argument = click.argument("run_dir", type=click.Path(), callback=_run_dir)
#: which weights ``sample`` / ``evaluate`` use (the choices of ``core.api.GENERATORS``)
_generator_option = click.option(
    "--generator", type=click.Choice(["auto", "ema", "raw"]), default="auto", show_default=True,
    help="ema: G's weight average (runs trained with --g-ema); raw: the trained weights; "
         "auto: the average when the run keeps one.")


@cli.command(context_settings={"show_default": True})
@_opt("--dataset", help="Dataset name (default grid25).")
@_opt("--loss", help="Loss name (default ns).")
@_opt("--detector", help="Collapse detector name, or none.")
@_opt("--partitioner", help="Partitioner name, or none.")
@_opt("--conditioner", help="Conditioner name, or none.")
@_opt("--preset", help="A named bundle of the above, e.g. dyngan.")
@_opt("--model", help="Model name (default: the dataset's).")
@_opt("--metrics", help="Comma-separated metric names (default: the dataset's).")
@_opt("--steps", type=int, help="Generator steps (default 30000).")
@_opt("--batch-size", "batch_size", type=int, help="Batch size (default 128).")
@_opt("--lr-g", "lr_g", type=float, help="Generator learning rate (default: the loss's, else the preset's, else 1e-3).")
@_opt("--lr-d", "lr_d", type=float, help="Discriminator learning rate (default: the loss's, else the preset's, else 1e-3).")
@_opt("--betas", help="Adam betas as B1,B2 (default: the loss's, else the preset's, else 0.5,0.999).")
@_opt("--seed", type=int, help="Seed for data, initialisation and batches (default 0).")
@_opt("--device", help="auto | cpu | cuda | cuda:N (default auto).")
@_opt("--out", type=click.Path(), help="Run directory (default: a new numbered one under runs/).")
@click.option("-o", "--option", "options", multiple=True, metavar="KIND.KEY=VALUE",
              help="A component option, e.g. -o detector.delta=0.1 (repeatable).")
@_opt("--config", "config", type=click.Path(), help="A TOML file with the same settings; flags override it.")
@_opt("--log-every", "log_every", type=int, help="Gather and log scalars every N steps (default 100).")
@_opt("--eval-every", "eval_every", type=int, help="Compute metrics every N steps, 0 = at the end only "
      "(default 5000).")
@_opt("--checkpoint-every", "checkpoint_every", type=int, help="Checkpoint every N steps, 0 = at the end only (default 5000).")
@_opt("--keep-checkpoints", "keep_checkpoints", type=int, help="How many of the newest checkpoints a run "
      "keeps (default 3).")
@_opt("--amp", type=click.Choice(["none", "bf16"]), help="bf16 autocast (CUDA; default none).")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the networks (default off; D stays uncompiled with R1 or WGAN-GP).")
@_opt("--on-divergence", "on_divergence", type=click.Choice(["stop", "rollback"]),
      help="On NaN/inf: stop, or roll back to the last checkpoint and go on with a new random stream.")
@_opt("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is often fastest "
      "for the small 2D networks).")
@_opt("--g-ema", "g_ema", type=float, help="Keep an exponential moving average of G's weights with this "
      "decay per step (e.g. 0.999; 0 = none, the default without a preset; the dyngan preset sets 0.99); "
      "sampling and metrics then use it.")
@_opt("--adam-impl", "adam_impl", type=click.Choice(["fused", "foreach", "loop"]),
      help="Adam's kernels: fused (the default: one kernel per step), foreach, or loop (one per "
      "parameter tensor, torch's own CPU choice). Same maths, different rounding; runs from before "
      "this setting resume with loop.")
@_opt("--sampling", type=click.Choice(["replacement", "epoch"]),
      help="How real batches are drawn: independently with replacement (the default), or as shuffled "
      "epochs, each training sample once per epoch and the last partial batch dropped (the DynGAN 2D code's way).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--dry-run", is_flag=True, help="Validate and print the resolved config; train nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def train(options: tuple[str, ...], compile_: bool | None, resume: bool, dry_run: bool, quiet: bool,
          **flags: Any) -> None:
    """Train a GAN; prints the run directory."""
    from . import api
    from .config import parse_option_flags

    settings = {k: v for k, v in flags.items() if v is not None}
    if compile_ is not None:
        settings["compile"] = compile_
    if options:
        settings["options"] = parse_option_flags(options)
    from .distributed import from_env, launched_by_torchrun

    if dry_run:
        import os

        if launched_by_torchrun() and os.environ.get("RANK", "").strip() != "0":
            return  # under torchrun rank 0 alone checks and prints the config (once, not per rank)
        with _components_print_to_stderr():  # a loss's print while it resolves: not in the JSON
            resolved = api.dry_run(settings, resume=resume)
        click.echo(json.dumps(resolved, indent=2, sort_keys=True))
        return

    comm = from_env()  # started by torchrun: data-parallel over its ranks (core/distributed.py)
    try:
        # stdout carries the run directory alone (RUN=$(dyngan train ...))
        with _components_print_to_stderr():
            result = api.train(settings, resume=resume, quiet=quiet, comm=comm)
    finally:
        if comm is not None:
            comm.close()
    if comm is None or comm.rank == 0:
        # a closed stdout (`| head -1`) is muted: the run is trained and saved all the same
        safe_write(sys.stdout, f"{result.run_dir}\n")


@cli.command()
@_run_dir_argument
@click.option("--n", "n", type=int, required=True, help="Number of samples.")
@click.option("--out", "out", type=click.Path(), required=True, help="Output .npy file.")
@_seed_option
@click.option("--device", default="cpu", show_default=True)
@_generator_option
@click.option("--condition", type=int, default=None, metavar="C",
              help="Draw every sample from condition C (one partition of a DynGAN run) "
                   "instead of drawing conditions from the run's prior.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def sample(run_dir: str, n: int, out: str, seed: int, device: str, generator: str,
           condition: int | None, quiet: bool) -> None:
    """Write N samples of a run's latest checkpoint to a .npy file."""
    from pathlib import Path

    from . import api
    from .errors import UsageError

    if not out.endswith(".npy"):
        raise UsageError(f"--out must name a .npy file, got {out!r}")
    api._check_n(n)  # the message names the flag (the library's names its argument)
    with _components_print_to_stderr():
        arr = api.sample(run_dir, n, seed, device=device, generator=generator, condition=condition,
                         progress=None if quiet else api.SamplingProgress(n))
    try:
        _save_npy(Path(out), arr)
    except OSError as e:
        raise UsageError(f"cannot write {out!r}: {e.strerror or e}") from None
    of = "" if condition is None else f" of condition {condition}"
    click.echo(f"{out}: {arr.shape[0]} samples{of} of shape {tuple(arr.shape[1:])}")


def _components_print_to_stderr() -> Any:
    """A context in which what is printed (a plugin's ``print``, a library's chatter) goes to
    stderr: a command's stdout holds its own output alone (`train`'s run directory, `evaluate
    --json`'s JSON, `sample`'s and `report`'s file lines), for scripts that read it."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr)


def _save_npy(path: Any, arr: Any) -> None:
    """Write ``arr`` to ``path`` as .npy, straight from its memory (no copy of the file's bytes in
    memory), so that a crash leaves either the old file or the new one."""
    import numpy as np

    from .checkpoint import atomic_write

    # a real file: numpy writes the array's buffer itself
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


@cli.command()
@_run_dir_argument
@click.option("--n", "n", type=int, default=None, help="Samples to score (default: the run's eval_samples, by "
              "default the dataset's, e.g. 2500).")
@_seed_option
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_generator_option
def evaluate(run_dir: str, n: int | None, seed: int, device: str, as_json: bool, generator: str) -> None:
    """The run's metrics (mode coverage on the built-in mixtures and digits, PRDC on your own data)
    on samples from its latest checkpoint."""
    from . import api

    with _components_print_to_stderr():  # `evaluate --json | jq`: stdout holds the JSON alone
        res = api.evaluate(run_dir, n, seed, device=device, generator=generator)
    if as_json:  # standard JSON: a NaN or inf value is written as a string, as metrics.jsonl does
        values = {k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in res["metrics"].items()}
        click.echo(json.dumps({**res, "metrics": values}, indent=2, allow_nan=False))
        return
    click.echo(f"{res['run']}  step {res['step']}  {res['dataset']}  {res['samples']} samples  "
               f"generator {res['generator']}")
    for name, proto in res["protocols"].items():
        if proto:
            click.echo(f"  [{name}] {proto}")
    width = max((len(k) for k in res["metrics"]), default=0) + 2  # one column, however long the names
    for k, v in res["metrics"].items():
        click.echo(f"  {k:{width}s}{v:.4f}" if isinstance(v, float) else f"  {k:{width}s}{v}")


@cli.command()
@_run_dir_argument
@click.option("--n", "n", type=int, default=2500, show_default=True, help="Samples to draw.")
@_seed_option
def report(run_dir: str, n: int, seed: int) -> None:
    """Pictures of a run: samples, curves, partitions (needs dyngan[plots])."""
    from pathlib import Path

    from .report import write_report

    with _components_print_to_stderr():
        paths = write_report(Path(run_dir), n=n, seed=seed)
    for path in paths:
        click.echo(str(path))


@cli.command("install")
@click.argument("targets", nargs=-1, required=True, metavar="PACKAGE_OR_PATH...")
@click.option("-e", "--editable", is_flag=True, help="Install project directories in editable mode (pip -e).")
@click.option("--no-deps", is_flag=True, help="Do not install the packages' dependencies.")
@click.option("--no-build-isolation", is_flag=True,
              help="Build with the setuptools already installed (works offline).")
@click.option("-U", "--upgrade", is_flag=True, help="Upgrade the packages if they are installed.")
@click.option("-v", "--verbose", is_flag=True, help="Show pip's output.")
def install_command(targets: tuple[str, ...], editable: bool, no_deps: bool, no_build_isolation: bool,
                    upgrade: bool, verbose: bool) -> None:
    """Install plugin packages (pip, into dyngan's environment) and show what they register."""
    from .install import install_plugins

    res = install_plugins(targets, editable=editable, no_deps=no_deps, no_build_isolation=no_build_isolation,
                          upgrade=upgrade, echo=(lambda line: click.echo(line, err=True)) if verbose else None)
    failed = False
    for d in res.distributions:
        click.echo(f"installed {d.name} {d.version or ''}".rstrip())
        if not d.plugins and res.listing_error is None:
            click.echo("  registers no dyngan plugin (no entry point in the group 'dyngan')")
        for p in d.plugins:
            if p.get("error"):
                failed = True
                click.echo(f"  plugin {p['name']}  FAILED: {p['error']}")
                continue
            click.echo(f"  plugin {p['name']} ({p['module']})")
            for kind, names in sorted(p["components"].items()):
                click.echo(f"    {kind}: {', '.join(names)}")
    if res.listing_error is not None:
        click.echo(f"Error: installed, but the plugins could not be listed: {res.listing_error}", err=True)
        raise click.exceptions.Exit(1)
    for c in res.clashes:
        click.echo(f"Warning: plugins {c.kept!r} ({c.kept_distribution}) and {c.failed!r} ({c.failed_distribution}) "
                   f"both register {c.kind} {c.name!r}, so plugin {c.failed!r} fails to load: none of its "
                   "components can be used", err=True)
    if res.clashes:
        c = res.clashes[0]
        click.echo(f"Error: installed, but it clashes with another plugin (see above); undo the install "
                   f"(`dyngan uninstall {c.installed}`) or skip one of the two plugins with DYNGAN_BLOCK_PLUGINS "
                   f"(e.g. DYNGAN_BLOCK_PLUGINS={c.failed})", err=True)
        raise click.exceptions.Exit(2)
    if res.without_plugin:  # pip did install it, and it stays: say so and how to remove it
        from .install import pip_uninstall_hint

        names = [d.name for d in res.without_plugin]
        one = len(names) == 1
        click.echo(f"Error: installed, but {', '.join(names)} {'has' if one else 'have'} no dyngan plugin: "
                   f"{'its distribution declares' if one else 'their distributions declare'} no entry point in the "
                   "group 'dyngan' (`[project.entry-points.dyngan]` in pyproject.toml), so dyngan cannot use "
                   f"{'it' if one else 'them'}; remove {'it' if one else 'them'} with pip (`dyngan uninstall` "
                   f"removes plugins only): `{pip_uninstall_hint(names)}`", err=True)
        raise click.exceptions.Exit(2)
    if failed:
        click.echo("Error: installed, but a plugin failed to load (see above); `dyngan plugins` shows it too",
                   err=True)
        raise click.exceptions.Exit(1)


@cli.command("uninstall")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("-v", "--verbose", is_flag=True, help="Show pip's output.")
def uninstall_command(names: tuple[str, ...], verbose: bool) -> None:
    """Uninstall plugin distributions (pip).

    Only a distribution that declares a dyngan plugin (an entry point in the group 'dyngan') is
    removed: dyngan itself, its dependencies (torch, click, ...) and any other package are refused
    (exit code 2), and nothing is uninstalled then.
    """
    from .install import uninstall_plugins

    res = uninstall_plugins(names, echo=(lambda line: click.echo(line, err=True)) if verbose else None)
    for name, version, plugins in res.removed:
        click.echo(f"uninstalled {name} {version} (plugins: {', '.join(plugins)})")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="dyngan")
    except KeyboardInterrupt:  # pragma: no cover - training handles its own Ctrl-C
        click.echo("Interrupted.", err=True)
        sys.exit(130)
