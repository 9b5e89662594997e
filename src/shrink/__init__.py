"""shrink: take a trained model and a target; return a smaller, faster model
that provably still works, with the evidence."""
__version__ = "0.1.0"



def __getattr__(name):
    # `shrink.plan(...)` is the plan package itself, made callable (see shrink/plan/__init__.py);
    # imported on first use so `import shrink` stays light.
    if name == "plan":
        import importlib

        return importlib.import_module("shrink.plan")
    # `shrink.load(name_or_path)`: built-in models, HF directories, weights files (shrink/models/io.py).
    if name == "load":
        from shrink.models.io import load

        return load
    # `shrink.compress(model, recipe, calibration=None, evaluate=None)` (shrink/recipe/run.py)
    if name == "compress":
        from shrink.recipe.run import compress

        return compress
    raise AttributeError(f"module 'shrink' has no attribute {name!r}")
