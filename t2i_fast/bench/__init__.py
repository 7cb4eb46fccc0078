"""Yardsticks for the benchmarks in ``scripts/``: the plain-PyTorch step the step benchmark
measures the engine against (``plain.py``), kept apart from the project's own model code, and
the clocks and ceilings every benchmark times with (``timing.py``)."""
