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

Anything else is an internal error and keeps its traceback.
"""
from __future__ import annotations

import signal

EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3


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
