"""Compression algorithms: pure functions, tensors in -> tensors (or codes) out."""
from shrink.algos.gptq import gptq
from shrink.algos.kmeans import KMeansResult, kmeans
from shrink.algos.result import QuantResult
from shrink.algos.rtn import rtn

__all__ = ["KMeansResult", "QuantResult", "gptq", "kmeans", "rtn"]
