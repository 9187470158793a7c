"""Setup for the entry points (``train.py``, ``evaluate.py``): eval setup, runtime helpers (config tree,
W&B) and the location of the packaged Hydra configs (``locate``).
"""
