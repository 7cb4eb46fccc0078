"""Fused GPU operators (Triton) with PyTorch reference implementations.

Each submodule imports Triton on its own; importing this package imports nothing heavy.
"""
