"""shrink: take a trained model and a target; return a smaller, faster model
that provably still works, with the evidence."""
__version__ = "0.1.0"
