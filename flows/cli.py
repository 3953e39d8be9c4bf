"""The `ckaflow` command line: run, demo, sites, status, report, zoo."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from flows.config import STAGES, ConfigError  # noqa: E402

app = typer.Typer(help="Where inside vision networks do representations agree? CKA at every layer and sublayer.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
console = Console()
DEMO_CONFIG = "demo.yaml"
DEMO_ZOO = "runs/zoo"


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _run(config, store: str | None, **options) -> str:
    from flows.pipeline import compare
    from flows.server import start_temporary_server
    from storage import StoreError

    start_temporary_server()
    try:
        return compare(str(config), store=store, **options)
    except (ConfigError, StoreError, ValueError, FileNotFoundError) as error:
        _fail(str(error))


@app.command()
def run(config: Annotated[Path, typer.Argument(help="YAML run configuration")],
        store: Annotated[Optional[str], typer.Option(help="run store (path or fsspec URL); overrides the config")] = None,
        stage: Annotated[Optional[str], typer.Option(help=f"run only this stage: {', '.join(STAGES)}")] = None,
        fresh: Annotated[bool, typer.Option(help="delete the store and recompute everything")] = False,
        refresh: Annotated[Optional[str], typer.Option(help="recompute this stage and the ones after it")] = None,
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

    train_zoo(out_dir=DEMO_ZOO, variant="demo")
    config = resources.files("flows").joinpath(DEMO_CONFIG)
    with resources.as_file(config) as path:
        index = _run(path, store, fresh=fresh)
    console.print(f"report: [bold]{Path(index).resolve() if '://' not in index else index}[/bold]")


@app.command()
def sites(arch: Annotated[str, typer.Argument(help="timm architecture name")],
          arch_kwargs: Annotated[str, typer.Option(help='JSON keyword arguments, e.g. \'{"img_size": 32}\'')] = "{}") -> None:
    """List the sites ARCH offers under each preset, with the feature width of each reduction."""
    from rich.table import Table

    from tasks.extract import list_sites

    try:
        kwargs = json.loads(arch_kwargs)
    except json.JSONDecodeError as error:
        _fail(f"--arch-kwargs is not valid JSON: {error}")
    for preset, entries in list_sites(arch, kwargs).items():
        table = Table(title=f"{arch}: {preset} ({len(entries)} sites)")
        table.add_column("site")
        table.add_column("feature width by reduction")
        for site, widths in entries:
            table.add_row(site, ", ".join(f"{name}={width}" for name, width in widths.items()))
        console.print(table)


@app.command()
def status(store: Annotated[str, typer.Argument(help="run store (path or fsspec URL)")],
           verify: Annotated[bool, typer.Option(
               help="also check that every done flag has its data and every fingerprint its inputs "
                    "(reads all activations); exit status 1 on an inconsistency")] = False) -> None:
    """What is done and what is left in a run store."""
    from storage import StoreError, verify_store
    from storage.status import render_status

    try:
        console.print(render_status(store))
        checked = verify_store(store) if verify else None
    except StoreError as error:
        _fail(str(error))
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
    from tasks.report import render_report

    console.print(f"report: [bold]{render_report(storage.open_store(store, mode='r'))}[/bold]")


@app.command()
def zoo(out_dir: Annotated[str, typer.Option(help="where checkpoints and model cards go")] = DEMO_ZOO,
        variant: Annotated[str, typer.Option(help="demo or test")] = "demo",
        force: Annotated[bool, typer.Option(help="retrain even when cached")] = False) -> None:
    """Train the offline model zoo (supervised, contrastive, MAE, fine-tuned) on the digits data."""
    from flows.train_zoo import train_zoo

    for name, path in train_zoo(out_dir=out_dir, variant=variant, force=force).items():
        console.print(f"{name}: {path}")
