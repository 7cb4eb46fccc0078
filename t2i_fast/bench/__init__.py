"""Yardsticks for the step benchmark (``scripts/bench_step.py``): what the engine is measured
against, kept apart from the project's own model code."""
