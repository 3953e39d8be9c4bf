"""Progress of long stages in the user's units (images, CKA tasks, probes), handed to the pure task
functions as plain callbacks: a rich bar on a terminal, otherwise a plain log line every few seconds."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from flows.logs import run_logger

Advance = Callable[..., None]
LOG_EVERY_S = 5.0


class ProgressLog:
    """Counts done units and logs `description: done/total unit (pct), rate unit/s, ETA` at most every
    `every` seconds, and once at the end."""

    def __init__(self, description: str, total: int | None, unit: str, every: float = LOG_EVERY_S,
                 log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.description, self.total, self.unit, self.every = description, total, unit, every
        self.log, self.clock = log or run_logger().info, clock
        self.done, self.began = 0, clock()
        self.last = self.began

    def line(self) -> str:
        elapsed = max(self.clock() - self.began, 1e-9)
        rate = self.done / elapsed
        text = f"{self.description}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.1f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {(self.total - self.done) / rate:.0f} s"
        return text

    def advance(self, n: int = 1, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.done += n
        now = self.clock()
        if now - self.last >= self.every and self.done != self.total:  # the last line is close()'s
            self.last = now
            self.log(self.line())

    def close(self) -> None:
        self.log(self.line() + f" in {self.clock() - self.began:.1f} s")


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, unit: str = "images") -> Iterator[Advance]:
    """Show progress while the block runs; yields `advance(n, total=None)` (`total` may be set late,
    as the CKA engine does). A bar with the rate on a terminal; log lines otherwise."""
    if not sys.stderr.isatty():
        log = ProgressLog(description, total, unit)
        yield log.advance
        log.close()
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task_id = bar.add_task(description, total=total, rate="")

        def advance(n: int = 1, total: int | None = None) -> None:
            bar.update(task_id, advance=n, total=total)
            speed = bar.tasks[0].speed
            bar.update(task_id, rate=f"{speed:.1f} {unit}/s" if speed else "")

        yield advance


class BarsInTurn:
    """Progress bars (description, unit) shown one after the other: the first call of bar k's advance
    closes the bar before it and opens bar k, so each bar's rate, ETA and time are its own."""

    def __init__(self, stack: contextlib.ExitStack, bars: Sequence[tuple[str, str]]) -> None:
        self.stack, self.bars = stack, bars
        self.current: tuple[int, Advance] | None = None

    def advance(self, k: int) -> Advance:
        """Bar k's `advance(n, total=None)`."""
        def advance(n: int = 1, total: int | None = None) -> None:
            if self.current is None or self.current[0] != k:
                self.stack.close()
                self.current = (k, self.stack.enter_context(progress_bar(self.bars[k][0], None, self.bars[k][1])))
            self.current[1](n, total)
        return advance


@contextlib.contextmanager
def bars_in_turn(*bars: tuple[str, str]) -> Iterator[list[Advance]]:
    """The advances of `BarsInTurn` bars; the open one closes with the block."""
    with contextlib.ExitStack() as stack:
        turns = BarsInTurn(stack, bars)
        yield [turns.advance(k) for k in range(len(bars))]
