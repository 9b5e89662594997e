"""Measurements: size, quality, latency, energy."""
from shrink.eval.weights import LayerError, roundtrip_errors, sqnr_db, summarize

__all__ = ["LayerError", "roundtrip_errors", "sqnr_db", "summarize"]
