"""Recipes: typed steps, parsing, and running them on a model."""
from shrink.recipe.run import CompressResult, compress
from shrink.recipe.steps import AWQ, BUILTIN, GPTQ, RTN, KMeans, parse_recipe

__all__ = ["AWQ", "BUILTIN", "CompressResult", "GPTQ", "KMeans", "RTN", "compress", "parse_recipe"]
