"""The `ckaflow` command line: run, demo, sites, status, report, zoo."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Optional

import flows.environment  # noqa: F401  (the environment defaults, before Prefect is imported)
import typer
from rich.console import Console
from rich.markup import escape

from flows.config import STAGES, load_config
from flows.errors import is_user_error

app = typer.Typer(help="Where inside vision networks do representations agree? CKA at every layer and sublayer.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
console = Console()
error_console = Console(stderr=True)  # user errors: `ckaflow run x.yaml > log` still shows them
DEMO_CONFIG = "demo.yaml"
DEMO_ZOO = "runs/zoo"
_options = {"debug": False, "verbose": False}


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", help="also show Dask's and Prefect's INFO logs")] = False,
         debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of user errors (exit code 2 otherwise)")] = False,
         ) -> None:
    """User errors (config, data, store, disk) exit with code 2 and one message; --debug shows the traceback."""
    _options.update(debug=debug, verbose=verbose)


def _quiet_logs() -> None:
    """Our log levels on top of Prefect's logging set-up (which runs when prefect is imported): only once
    the pre-flight checks passed, so that a config error costs no Prefect import."""
    import prefect  # noqa: F401

    from flows.logs import configure_logging

    configure_logging(verbose=_options["verbose"], debug=_options["debug"])


def _fail(message: str) -> None:
    """Each line of `message` (one per problem) as an `error:` line on stderr; exit code 2."""
    for line in filter(None, map(str.strip, message.splitlines())):
        error_console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _describe(error: BaseException, plan: Any = None, store: str | None = None) -> str:
    """One message for a user error; disk-full and read-only errors name the path and what to do."""
    if not isinstance(error, OSError) or error.errno is None:
        return str(error)
    where = error.filename or store
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        from storage import format_size

        need = f" (the run writes about {format_size(plan.store_bytes)} in all)" if plan is not None else ""
        return (f"disk full while writing {where}{need}: free space on that file system and run the same command "
                "again; finished shards and block pairs are kept and the run resumes")
    return f"{error.strerror}: {where}"


@contextlib.contextmanager
def _user_errors(known: dict[str, Any] | None = None) -> Iterator[None]:
    """Turn user errors into one `error:` line and exit code 2 (re-raised with --debug). `known`: what is known
    of the run so far, filled in as it goes (its `store`, the pre-flight `plan`), for disk errors."""
    try:
        yield
    except Exception as error:
        if _options["debug"] or not is_user_error(error):
            raise
        _fail(_describe(error, (known or {}).get("plan"), (known or {}).get("store")))


def _run(config, store: str | None, stage: str | None = None, refresh: str | None = None, fresh: bool = False,
         **options) -> str:
    known: dict[str, Any] = {"store": store}
    with _user_errors(known):
        cfg = load_config(config, {"store": store} if store else None)  # the schema: no heavy import
        known["store"] = cfg.store
        from flows.preflight import preflight

        known["plan"] = preflight(cfg, stage, refresh, fresh)  # before the Prefect server starts
        _quiet_logs()
        from flows.pipeline import run_pipeline
        from flows.server import start_temporary_server

        if not os.environ.get("PREFECT_API_URL"):
            console.print("starting a temporary Prefect server (about 10-20 s; to skip this, run `prefect server "
                          "start` once and set PREFECT_API_URL, see the README)", highlight=False)
            start_temporary_server()
        return run_pipeline(cfg, stage=stage, refresh=refresh, fresh=fresh, checked=True, **options)


@app.command()
def run(config: Annotated[Path, typer.Argument(help="YAML run configuration")],
        store: Annotated[Optional[str], typer.Option(help="run store (path or fsspec URL); overrides the config")] = None,
        stage: Annotated[Optional[str], typer.Option(help=f"run only this stage: {', '.join(STAGES)}")] = None,
        fresh: Annotated[bool, typer.Option(help="delete the store and recompute everything")] = False,
        refresh: Annotated[Optional[str], typer.Option(
            help=f"recompute this stage and the ones after it: {', '.join(STAGES)}")] = None,
        wait: Annotated[bool, typer.Option(help="wait for another run on the same store instead of failing")] = False,
        break_locks: Annotated[bool, typer.Option(help="take over locks of dead runs on other machines")] = False,
        dask_address: Annotated[Optional[str], typer.Option(
            help="scheduler of an external Dask cluster (overrides compute.dask_address)")] = None,
        ) -> None:
    """Run the pipeline for CONFIG and print where the report is. Re-running resumes."""
    index = _run(config, store, stage=stage, fresh=fresh, refresh=refresh, wait=wait, break_locks=break_locks,
                 dask_address=dask_address)
    if index:
        console.print(f"report: [bold]{index}[/bold]")


@app.command()
def demo(store: Annotated[str, typer.Option(help="run store for the demo")] = "runs/demo",
         fresh: Annotated[bool, typer.Option(help="recompute everything")] = False) -> None:
    """Train the offline model zoo once (cached), compare it on the digits data and print the report path."""
    from flows.train_zoo import train_zoo

    _quiet_logs()
    train_zoo(out_dir=DEMO_ZOO, variant="demo")
    config = resources.files("flows").joinpath(DEMO_CONFIG)
    with resources.as_file(config) as path:
        index = _run(path, store, fresh=fresh)
    console.print(f"report: [bold]{Path(index).resolve() if '://' not in index else index}[/bold]")


@app.command()
def sites(arch: Annotated[str, typer.Argument(help="timm architecture name or import path 'package.module:factory'")],
          arch_kwargs: Annotated[str, typer.Option(help='JSON keyword arguments, e.g. \'{"img_size": 32}\'')] = "{}",
          input_size: Annotated[Optional[int], typer.Option(
              help="input size in px (default: the model's; a model without a timm data config: 224)")] = None,
          ) -> None:
    """List the sites ARCH offers under each preset and the output of every module (for glob patterns),
    with the feature width of each reduction. Every name printed is a valid `sites` entry of a config."""
    from rich.table import Table
    from rich.text import Text

    from tasks.extract import list_sites

    try:
        kwargs = json.loads(arch_kwargs)
    except json.JSONDecodeError as error:
        _fail(f"--arch-kwargs is not valid JSON: {error}")
    with _user_errors():
        listing = list_sites(arch, kwargs, input_size)
    for preset, entries in listing.items():
        table = Table(title=Text(f"{arch}: {preset} ({len(entries)} sites)"))  # Text: no markup or :emoji: codes
        table.add_column("site", no_wrap=True)  # never folded: copied into a config as it is
        table.add_column("feature width by reduction")
        for site, widths in entries:
            table.add_row(Text(site), ", ".join(f"{name}={width}" for name, width in widths.items()))
        console.print(table)


@app.command()
def status(store: Annotated[str, typer.Argument(help="run store (path or fsspec URL)")],
           verify: Annotated[bool, typer.Option(
               help="also check that every done flag has its data and every fingerprint its inputs "
                    "(reads all activations); exit status 1 on an inconsistency")] = False) -> None:
    """What is done and what is left in a run store."""
    import storage

    with _user_errors():
        storage.open_store(store, mode="r")  # a missing store costs no xarray
        from storage.status import render_status

        console.print(render_status(store))
        checked = storage.verify_store(store) if verify else None
    if checked is not None:
        for line in checked.stale:
            console.print(f"[yellow]stale:[/yellow] {line}", soft_wrap=True)
        for line in checked.errors:
            console.print(f"[red]inconsistent:[/red] {line}", soft_wrap=True)
        console.print("verify: consistent" if checked.ok else f"verify: {len(checked.errors)} inconsistencies")
        if not checked.ok:
            raise typer.Exit(1)


@app.command()
def report(store: Annotated[str, typer.Argument(help="run store (path or fsspec URL)")]) -> None:
    """Re-render the report of a run store."""
    import storage

    with _user_errors():
        root = storage.open_store(store, mode="r")  # a missing store costs no report import
        from tasks.report import render_report

        index = render_report(root)
    console.print(f"report: [bold]{index}[/bold]")


@app.command()
def config(schema: Annotated[bool, typer.Option("--schema", help="print the JSON schema instead")] = False) -> None:
    """Print the configuration reference (every key, its type, default and meaning), built from the schema."""
    from flows.config import RunConfig, config_reference

    typer.echo(json.dumps(RunConfig.model_json_schema(), indent=2) if schema else config_reference(), nl=False)


@app.command()
def zoo(out_dir: Annotated[str, typer.Option(help="where checkpoints and model cards go")] = DEMO_ZOO,
        variant: Annotated[str, typer.Option(help="demo or test")] = "demo",
        force: Annotated[bool, typer.Option(help="retrain even when cached")] = False) -> None:
    """Train the offline model zoo (supervised, contrastive, MAE, fine-tuned) on the digits data."""
    from flows.train_zoo import train_zoo

    _quiet_logs()
    for name, path in train_zoo(out_dir=out_dir, variant=variant, force=force).items():
        console.print(f"{name}: {path}")
