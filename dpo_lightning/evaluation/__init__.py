"""Evaluation beyond the loss: sampling and scoring completions (``generation``) and judges (``judges``).
"""
