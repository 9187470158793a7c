"""Setup for the entry points (``train.py``, ``evaluate.py``): the one construction path of both (``build``),
eval setup, runtime helpers (config tree, W&B) and the location of the packaged Hydra configs (``locate``).
"""
