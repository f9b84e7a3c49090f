"""Fuzz targets (run as scripts, see fuzz/README.md; importable for tests)."""
