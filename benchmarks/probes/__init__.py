"""Diagnostic GPU micro-benchmarks behind the notes in benchmarks/LOG.md: `python -m benchmarks.probes.NAME`."""
