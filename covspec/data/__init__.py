"""Benchmarks: the synthetic shapes set and VQAv2, MMBench and MMMU from local files; ``load_benchmark`` loads any."""

from covspec.data.registry import load_benchmark

__all__ = ["load_benchmark"]
