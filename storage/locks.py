"""Write locks in the run store: one small JSON object per locked unit (a model's shard, or its
metadata while it is created), created atomically where the store allows it (local files, memory).
On object stores without an atomic create the lock is written and read back: two writers racing
within the same instant could both proceed, so give concurrent machines disjoint shard ranges there.

A lock names its owner (host, pid, process start time) and its age. A lock whose owner process is
gone (same host, pid dead or reused) is stale and broken automatically; a lock held by a live
process, or by another host, refuses the second writer unless it asks to break locks explicitly."""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass

import psutil
import zarr

from storage.errors import StoreError
from storage.store import create_key, delete_key, list_keys, read_key

LOCKS = "_locks"


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock, and since when."""

    host: str
    pid: int
    process_started: float
    created: float
    token: str

    @property
    def age(self) -> float:
        return max(0.0, time.time() - self.created)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, {self.age:.0f} s old"

    def is_stale(self) -> bool:
        """True when the owner is a process of this host that no longer runs."""
        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.process_started) > 1.0
        except psutil.NoSuchProcess:
            return True


def _this_process(token: str) -> LockInfo:
    started = psutil.Process().create_time()
    return LockInfo(socket.gethostname(), psutil.Process().pid, started, time.time(), token)


def _parse(raw: bytes | None) -> LockInfo | None:
    if raw is None:
        return None
    try:
        return LockInfo(**json.loads(raw))
    except (ValueError, TypeError):
        return LockInfo("unknown", -1, 0.0, 0.0, "corrupt")


class Locks:
    """The locks one writer holds on units of one model (`_locks/<model>/<unit>`)."""

    def __init__(self, root: zarr.Group, model: str, *, break_locks: bool = False) -> None:
        self.root, self.model, self.break_locks = root, model, break_locks
        self.token = uuid.uuid4().hex
        self.held: set[str] = set()

    def _key(self, unit: str) -> str:
        return f"{LOCKS}/{self.model}/{unit}.lock"

    def holder(self, unit: str) -> LockInfo | None:
        return _parse(read_key(self.root, self._key(unit)))

    def try_acquire(self, unit: str) -> LockInfo | None:
        """Take the lock on `unit`; None on success, else the live holder (stale locks are broken)."""
        if unit in self.held:
            return None
        me = _this_process(self.token)
        payload = json.dumps(me.__dict__).encode()
        for _ in range(3):
            if create_key(self.root, self._key(unit), payload):
                self.held.add(unit)
                return None
            holder = self.holder(unit)
            if holder is None:
                continue
            if not (holder.is_stale() or self.break_locks):
                return holder
            delete_key(self.root, self._key(unit))
        return self.holder(unit)

    def acquire_all(self, units: list[str], what: str) -> None:
        """Take every lock or none: StoreError naming the holders when any is held by a live writer."""
        refused = {}
        for unit in units:
            holder = self.try_acquire(unit)
            if holder is not None:
                refused[unit] = holder
        if refused:
            self.release([u for u in units if u not in refused])
            shown = "; ".join(f"{u}: {h.describe()}" for u, h in list(refused.items())[:5])
            raise StoreError(f"{what}: {len(refused)} unit(s) are being written by another run ({shown}). "
                             "Wait for it to finish, or pass break_locks (CLI: --break-locks) if it is dead")

    def wait_acquire(self, unit: str, what: str, timeout: float = 120.0) -> None:
        """Take a short-lived lock, waiting for a live holder to release it."""
        deadline = time.monotonic() + timeout
        while (holder := self.try_acquire(unit)) is not None:
            if time.monotonic() > deadline:
                raise StoreError(f"{what}: still locked by {holder.describe()} after {timeout:.0f} s")
            time.sleep(0.2)

    def live_foreign(self) -> dict[str, LockInfo]:
        """Locks on this model held by other live writers."""
        prefix = f"{LOCKS}/{self.model}/"
        found = {}
        for key in list_keys(self.root, prefix):
            unit = key[len(prefix):].removesuffix(".lock")
            holder = self.holder(unit)
            if holder is not None and holder.token != self.token and not holder.is_stale():
                found[unit] = holder
        return found

    def release(self, units: list[str] | None = None) -> None:
        for unit in list(self.held if units is None else units):
            if unit in self.held:
                holder = self.holder(unit)
                if holder is not None and holder.token == self.token:
                    delete_key(self.root, self._key(unit))
                self.held.discard(unit)
