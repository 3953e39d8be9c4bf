"""`ckaflow status STORE`: what is done and what is left in a run store."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table

from storage.activations import list_models, model_attrs, model_progress
from storage.layout import model_path
from storage.records import is_complete
from storage.results import ANALYSES, PARTIALS, SIMILARITY, list_analyses, list_similarity
from storage.runs import FAILED, SUCCEEDED, last_successful_run, run_history
from storage.reports import report_exists
from storage.samples import read_samples
from storage.sizes import format_size
from storage.store import StoreLike, open_store, store_url


def _bytes_stored(group: Any) -> int:
    return sum(array.nbytes_stored() for _, array in group.arrays()) + sum(
        _bytes_stored(sub) for _, sub in group.groups())


def store_status(store: StoreLike) -> dict[str, Any]:
    """Per model: shards done/total, sites, dtype, bytes stored; matrices complete or in progress."""
    root = open_store(store, mode="r")
    status: dict[str, Any] = {"store": store_url(root), "samples": None, "models": [], "similarity": [],
                              "in_progress": [], "analyses": list_analyses(root),
                              "report": report_exists(root), "last_success": last_successful_run(root) or None,
                              "last_run": (run_history(root) or [None])[-1]}
    if is_complete(root, "samples"):
        samples = read_samples(root)
        status["samples"] = {"n": samples.sizes["sample"], "fingerprint": samples.attrs["fingerprint"]}
    for model in list_models(root):
        attrs, (done, total) = model_attrs(root, model), model_progress(root, model)
        status["models"].append({"name": model, "done": done, "total": total, "sites": len(attrs["sites"]),
                                 "dtype": attrs["dtype"], "bytes": _bytes_stored(root[model_path(model)]),
                                 "nonfinite": sum(attrs["nonfinite"].values())})
    for name in list_similarity(root):
        matrix = root[f"{SIMILARITY}/{name}/cka"]
        status["similarity"].append({"name": name, "shape": list(matrix.shape)})
    partials = f"{SIMILARITY}/{PARTIALS}"
    if partials in root:
        for name, group in root[partials].groups():
            finished = sum(1 for _, array in group.arrays() if array.attrs.get("done"))
            if finished:
                status["in_progress"].append({"name": name, "tasks_done": finished})
    return status


def _describe_run(run: dict[str, Any]) -> str:
    name = (run.get("config") or {}).get("name", "?")
    stages = ", ".join(run.get("stages_done") or []) or "none"
    return f"{name!r} started {run.get('started')}, finished {run.get('finished')}, stages done: {stages}"


def render_status(store: StoreLike) -> Group:
    """The status of a store as rich tables."""
    status = store_status(store)
    samples = status["samples"]
    header = Table.grid()
    header.add_row(f"store: {status['store']}")
    success, last = status["last_success"], status["last_run"]
    header.add_row(f"last successful run: {_describe_run(success)}" if success else "last successful run: none")
    if last is not None and last.get("outcome") != SUCCEEDED:
        state = "failed" if last.get("outcome") == FAILED else "did not finish (running, or killed)"
        header.add_row(f"latest run {state}: {_describe_run(last)}"
                       + (f"; error: {last['error']}" if last.get("error") else ""))
    header.add_row(f"samples: {samples['n']} (fingerprint {samples['fingerprint'][:12]})" if samples
                   else "samples: not sampled yet")
    models = Table(title="activations")
    for column in ("model", "shards done", "sites", "dtype", "size", "NaN/Inf"):
        models.add_column(column)
    for m in status["models"]:
        state = f"{m['done']}/{m['total']}" + ("" if m["done"] == m["total"] else " (resume: re-run extract)")
        models.add_row(m["name"], state, str(m["sites"]), m["dtype"], format_size(m["bytes"]), str(m["nonfinite"]))
    matrices = Table(title="similarity")
    matrices.add_column("matrix")
    matrices.add_column("state")
    for s in status["similarity"]:
        matrices.add_row(s["name"], f"complete, {s['shape'][0]} x {s['shape'][1]} sites")
    for s in status["in_progress"]:
        matrices.add_row(s["name"], f"in progress: {s['tasks_done']} tasks finished")
    footer = Table.grid()
    footer.add_row(f"{ANALYSES}: {', '.join(status['analyses']) or 'none'}")
    footer.add_row(f"report: {'written' if status['report'] else 'not yet'}")
    return Group(header, models, matrices, footer)
