"""Drawing the report's figures: a section describes each figure as a `FigureSpec` (a `figures` function
and its arguments); `draw_all` draws them, several at a time in worker processes when asked, and gives
`FigureFile`s (PNG and SVG bytes, from one layout per figure)."""

from __future__ import annotations

import base64
import json
import math
import os
import pickle
import queue
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Progress = Callable[[int, int | None], Any]


@dataclass(frozen=True)
class FigureOptions:
    """How figures are drawn. color_range (the config's `report.color_range`): the colour scale of each CKA
    matrix, shared by every heatmap drawn from it: "data" (the matrix's finite range, rounded out) or "unit"
    (0-1, extended below 0 when the data are)."""

    color_range: str = "data"

    def __post_init__(self) -> None:
        if self.color_range not in ("data", "unit"):
            raise ValueError(f"color_range {self.color_range!r}: expected 'data' or 'unit'")


@dataclass(frozen=True)
class FigureSpec:
    """One figure to draw: its file name, caption, the `figures` function that draws it and that function's
    arguments; a heatmap also carries its matrix (`hover`: gid, rows, cols, values) for the page's read-out.
    `cost`: a rough relative drawing time (cells or sites), to start the slow figures first; `folded`: the
    summary line of a figure the page shows folded behind <details> ('' : shown open)."""

    name: str
    title: str
    draw: Callable[..., Any]
    kwargs: Mapping[str, Any]
    hover: Mapping[str, Any] | None = None
    cost: float = 1.0
    folded: str = ""


@dataclass(frozen=True)
class FigureFile:
    """One drawn figure: its files, the heatmap read-out (`hover`) the HTML shows beside inline SVG, and the
    summary line it is folded behind (`folded`, '' when shown open)."""

    name: str
    title: str
    png: bytes
    svg: bytes
    hover: Mapping[str, Any] | None = None
    folded: str = ""

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    @property
    def inline_svg(self) -> str:
        """The SVG element alone (no XML prolog or doctype), for embedding in the page."""
        text = self.svg.decode("utf-8")
        return text[text.index("<svg"):]

    @property
    def hover_json(self) -> str:
        """`hover` as JSON safe inside a <script> element (values rounded to 4 digits, NaN as null)."""
        values = [[None if not math.isfinite(v) else round(v, 4) for v in row] for row in self.hover["values"]]
        return json.dumps(dict(self.hover) | {"values": values}).replace("</", "<\\/")


def _encode(draw: Callable[..., Any], kwargs: Mapping[str, Any]) -> tuple[bytes, bytes]:
    from tasks.report.figures import encode

    return encode(draw(**kwargs))


def _serve() -> None:
    """A drawing worker (`python -m tasks.report.drawing`): reads pickled (draw, kwargs) from stdin until it
    closes and answers each with a pickled (True, (png, svg)), or (False, the traceback) when drawing
    failed; anything printed goes to stderr."""
    jobs, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    while True:
        try:
            draw, kwargs = pickle.load(jobs)
        except EOFError:
            return
        try:
            answer = (True, _encode(draw, kwargs))
        except Exception:  # noqa: BLE001 - reported to the caller, which raises it
            answer = (False, traceback.format_exc())
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()


def _drawn(specs: Sequence[FigureSpec], workers: int) -> Iterator[tuple[int, tuple[bytes, bytes]]]:
    """(index into `specs`, (png, svg)) as figures finish, the costliest first, each drawer taking the next
    figure when it is done: this process and up to `workers - 1` worker processes. Workers are fresh
    interpreters (neither forked nor started by multiprocessing, which would run the caller's main script
    again): they copy nothing of this process's threads, locks or main module. A worker that cannot start
    or stops hands its figure back to this process; a figure that fails to draw raises here."""
    todo: queue.Queue[int] = queue.Queue()
    for i in sorted(range(len(specs)), key=lambda i: -specs[i].cost):
        todo.put(i)
    done: queue.Queue[tuple[int, str, Any]] = queue.Queue()  # (index, "drawn" | "failed" | "returned", answer)
    stop = threading.Event()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

    def feed() -> None:
        try:
            worker = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env)
        except OSError:
            return
        with worker:
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    break
                try:
                    pickle.dump((specs[i].draw, specs[i].kwargs), worker.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                    worker.stdin.flush()
                    ok, answer = pickle.load(worker.stdout)
                except (EOFError, OSError, pickle.UnpicklingError):
                    worker.kill()
                    done.put((i, "returned", None))
                    return
                done.put((i, "drawn" if ok else "failed", answer))
            worker.stdin.close()

    feeders = [threading.Thread(target=feed, daemon=True) for _ in range(min(workers, len(specs)) - 1)]
    for thread in feeders:
        thread.start()
    try:
        for _ in specs:
            try:
                i, state, answer = done.get_nowait()
            except queue.Empty:
                try:
                    i, state, answer = todo.get_nowait(), "returned", None
                except queue.Empty:
                    i, state, answer = done.get()
            if state == "failed":
                raise RuntimeError(f"drawing figure {specs[i].name!r} failed in a worker process:\n{answer}")
            yield i, answer if state == "drawn" else _encode(specs[i].draw, specs[i].kwargs)
    finally:
        stop.set()
        for thread in feeders:  # each ends its worker (after the figure it draws): none is left running
            thread.join()


def draw_all(specs: Sequence[FigureSpec], *, workers: int = 1, kept: Mapping[int, tuple[bytes, bytes]] | None = None,
             progress: Progress | None = None) -> list[FigureFile]:
    """Every figure of `specs`, in their order: those in `kept` (index -> (png, svg)) as they are, the others
    drawn by this process and `workers - 1` worker processes; `progress(done now, len(specs))`, once for the
    kept figures and then as each one is drawn."""
    kept = kept or {}
    files = [FigureFile(spec.name, spec.title, *kept[i], spec.hover, spec.folded) if i in kept else None
             for i, spec in enumerate(specs)]
    if progress is not None and kept:
        progress(len(kept), len(specs))
    todo = [i for i in range(len(specs)) if i not in kept]
    for j, (png, svg) in _drawn([specs[i] for i in todo], workers):
        spec = specs[todo[j]]
        files[todo[j]] = FigureFile(spec.name, spec.title, png, svg, spec.hover, spec.folded)
        if progress is not None:
            progress(1, len(specs))
    return files


if __name__ == "__main__":
    _serve()
