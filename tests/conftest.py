"""Fixtures shared by all tests (pytest puts this folder on sys.path before importing this file)."""

from slurm_cluster import slurm_cluster  # noqa: F401  (a real one-node SLURM cluster, session-wide)
