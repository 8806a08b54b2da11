"""``runtime.configure_logging``: in a multi-process job only process 0 logs below WARNING."""
from __future__ import annotations

import logging

import jax
import pytest

from rlhf_jax import runtime


@pytest.fixture
def root_level():
    root = logging.getLogger()
    before = root.level
    yield root
    root.setLevel(before)


@pytest.mark.parametrize("index, level, expected", [
    (0, "INFO", logging.INFO),
    (1, "INFO", logging.WARNING),
    (3, "DEBUG", logging.WARNING),
    (1, "ERROR", logging.ERROR),          # quieter than WARNING stays as quiet
])
def test_other_processes_log_warnings_only(monkeypatch, root_level, index, level, expected):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: index)
    root_level.setLevel(level)            # what basicConfig sets where no handler exists yet
    runtime.configure_logging(level)
    assert root_level.level == expected


def test_a_single_process_never_asks_for_its_index(monkeypatch, root_level):
    def process_index():
        raise AssertionError("the backend would start before jax.distributed is initialized")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax, "process_index", process_index)
    root_level.setLevel(logging.INFO)
    runtime.configure_logging("INFO")
    assert root_level.level == logging.INFO
