"""Streaming, mergeable statistics and the diagnostics built on them."""

from .accum import DistinctCount, Histogram, MinMax, Moments, QuantileSketch, Sum, TopK

__all__ = ["DistinctCount", "Histogram", "MinMax", "Moments", "QuantileSketch", "Sum", "TopK"]
