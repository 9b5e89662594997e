"""Compression algorithms: pure functions, tensors in -> tensors (or codes) out."""
from shrink.algos.kmeans import KMeansResult, kmeans

__all__ = ["KMeansResult", "kmeans"]
