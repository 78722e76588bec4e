"""The ``personalab`` command line: one module per command group, listed by group in ``personalab --help``.

Two jobs on one machine oversubscribe its cores, and GNU OpenMP's workers then spin at
their barriers while the other job holds the cores (a 12 s extraction took 26-120+ s beside
a second one). libgomp shortens its spin to 1000 iterations itself when one process has
more threads than cores, but cannot see other processes; the command line sets the same
``GOMP_SPINCOUNT`` before torch loads (unless the user set it), which costs a single job
nothing. ``--threads`` splits the cores between jobs.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from importlib import import_module  # noqa: E402

from personalab.cli.common import app  # noqa: E402

GROUPS = ("demo", "models", "vectors", "steering", "weights", "studies", "reports")
"""Command modules, in the order of their groups in ``personalab --help``; importing one registers its commands."""

for _group in GROUPS:
    import_module(f"personalab.cli.{_group}")

__all__ = ["app"]
