"""Where a bench script writes its JSON: ``--out`` if given, else a new timestamped file.

The committed ``bench/results/*.json`` are what the README and docs/ quote, so a rerun without
``--out`` must not replace them: it writes ``bench/results/<name>-<UTC time>.json`` instead.
"""
from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def add_out_argument(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default=None, metavar="PATH",
                        help=f"write the JSON here (default: a new "
                             f"bench/results/{name}-<UTC time>.json; the committed "
                             f"bench/results/{name}.json is replaced only when named)")


def out_path(out: str | None, name: str, *, now: datetime | None = None,
             results: str = RESULTS) -> str:
    """``out`` when given; otherwise ``results/<name>-<YYYYmmddTHHMMSSZ>.json`` that does not exist
    yet (``-1``, ``-2``, ... appended when two runs start in the same second)."""
    if out:
        return out
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path, n = os.path.join(results, f"{name}-{stamp}.json"), 0
    while os.path.exists(path):
        n += 1
        path = os.path.join(results, f"{name}-{stamp}-{n}.json")
    return path
