"""saga's benchmarks: one entry point, ``python -m benchmarks.run`` (or
``python benchmarks/run.py``), and one module per job. See benchmarks/README.md.

Only ``_internals`` touches saga beyond its public API (private ``Store`` and the table
layout); everything else would keep working against any saga with the same public API.
"""
