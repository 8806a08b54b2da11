"""What can stop a run, and the exit code each gets from ``rlhf-jax``.

* :class:`UserError` (exit 2): something the user gave is wrong: a config field, a data row, a
  checkpoint, a path, a permission. The CLI prints one line, ``rlhf-jax: error: <message>``;
  ``--debug`` shows the traceback. Messages name the file / line / field, the value and what
  was expected.
* :class:`NonFiniteError` (exit 3): training produced NaN or Inf. The message names the stage,
  the step and the metric; the last finite checkpoint is kept.
* :class:`Preempted` (exit 143 after SIGTERM, 130 after SIGINT, as if the signal had killed the
  process): the current step finished and a checkpoint was saved; run the same command again to
  resume.
* A full disk or quota (exit 2): whatever raised it (an OSError, or orbax / TensorStore's
  ValueError from a background write), :func:`disk_full` finds it and the CLI prints one line
  naming the path and what is intact.
* ``rlhf-jax compile`` finding a step that does not fit the chip's memory (exit 4): a verdict on
  the config, not a mistake in it, so scripts can tell it from a config error (2).

Anything else is an internal error (exit 1) and keeps its traceback. :data:`EXIT_CODES` lists
them all, for ``rlhf-jax --help``.
"""
from __future__ import annotations

import errno
import os
import re
import signal

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_DOES_NOT_FIT = 4
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "done"),
    (EXIT_INTERNAL, "an internal error (a bug: the traceback is printed)"),
    (EXIT_USER_ERROR, "a problem with the inputs (flag, config, data, checkpoint, path, "
                      "permission, full disk): one line 'rlhf-jax: error: ...' (--debug shows the "
                      "traceback)"),
    (EXIT_NON_FINITE, "training produced NaN/Inf (the last finite checkpoint is kept)"),
    (EXIT_DOES_NOT_FIT, "compile: a step does not fit the chip's memory (one line per step)"),
    (EXIT_SIGINT, "stopped by SIGINT (Ctrl-C) after checkpointing: rerun the same command to "
                  "resume"),
    (EXIT_SIGTERM, "stopped by SIGTERM (preemption) after checkpointing: rerun the same command "
                   "to resume"),
)


class UserError(Exception):
    """A problem with the run's inputs, reported in one line (exit 2)."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError, ValueError):
    """A config field with a value the run cannot use."""


class UnknownFieldError(ConfigError, KeyError):
    """An override or lookup naming a config field that does not exist."""

    def __str__(self) -> str:   # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NonFiniteError(UserError):
    """A loss, gradient norm or parameter became NaN or Inf (exit 3)."""

    exit_code = EXIT_NON_FINITE


class Preempted(Exception):
    """SIGTERM / SIGINT arrived; the run checkpointed and stopped (exit 128 + signal number)."""

    def __init__(self, signum: int = signal.SIGTERM, message: str = ""):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name
        super().__init__(message or f"stopped by {name}; run the same command again to resume")


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# TensorStore (orbax's writer) reports a failed write as a ValueError whose text carries the
# OS error; only the text says that it was ENOSPC.
_DISK_FULL_TEXTS = tuple(os.strerror(code) for code in DISK_FULL_ERRNOS) + tuple(
    f"os_error_code='{code}'" for code in DISK_FULL_ERRNOS)
_TENSORSTORE_PATH = re.compile(r'(?:Failed writing|Error writing local file):? "([^"]+)"')


def disk_full(error: BaseException | None) -> tuple[BaseException, str | None] | None:
    """``(the exception, the path it was writing or None)`` when ``error``, or any exception it
    was raised from or that it groups, says the disk or quota is full; else None."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e, e.filename if isinstance(e.filename, str) else None
        text = str(e)
        if any(marker in text for marker in _DISK_FULL_TEXTS):
            paths = _TENSORSTORE_PATH.findall(text)
            return e, paths[-1] if paths else None
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None
