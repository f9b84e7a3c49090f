"""The ``lav2`` command line. Subcommands import heavy libraries inside their bodies only."""
