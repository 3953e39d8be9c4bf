"""Which failures are the user's to fix (exit code 2, one message, never retried) and which are
transient (the only ones Prefect retries): shared by the CLI and every flow task."""

from __future__ import annotations

import errno
import sys
from typing import Any

# The user errors' classes by module. A class is looked up only where its module is already imported (an
# error of a class never imported cannot be raised), so that classifying costs no torch.
USER_ERRORS = {"flows.config": ("ConfigError",), "storage.errors": ("StoreError",),
               "tasks.data.kinds.base": ("BadImageError",), "tasks.extract.models": ("ModelError",),
               "tasks.extract.sites": ("SiteError",), "tasks.extract.options": ("ReductionError",),
               "tasks.extract.checkpoints": ("CheckpointError",), "builtins": ("FileNotFoundError", "PermissionError")}
USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
               errno.EDQUOT}
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBUSY}


def is_user_error(error: BaseException) -> bool:
    """Config, data, model, store and disk problems: deterministic, fixed by the user, not by a retry."""
    classes = tuple(getattr(sys.modules[module], name) for module, names in USER_ERRORS.items()
                    if module in sys.modules for name in names)
    return isinstance(error, classes) or (isinstance(error, OSError) and error.errno in USER_ERRNOS)


def is_transient(error: BaseException) -> bool:
    """Failures a retry can cure: timeouts, lost connections or workers, flaky I/O."""
    if is_user_error(error):
        return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    return type(error).__name__ in ("KilledWorker", "CommClosedError", "StreamClosedError")


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task run only when its exception is transient."""
    try:
        state.result()
    except Exception as error:  # the failed run's exception
        return is_transient(error)
    return False
