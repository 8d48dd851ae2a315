"""Fixtures of the Clusterer tests: fake and real tiny runs and their exports (tests/export_fixtures.py)."""
from export_fixtures import fake_export, fake_run, tiny_export, tiny_run  # noqa: F401
