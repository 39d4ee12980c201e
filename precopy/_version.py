"""precopy's version: one place, read by the build (pyproject.toml), ``--version``, the report and HELLO."""

__version__ = "0.1.0"
