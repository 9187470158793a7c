"""Training: the LightningModule (``module``), loss inputs (``inputs``), optimizer and scheduler specs
(``optim``), the non-finite guard (``nonfinite``), memory helpers (``memory``) and strategies (``strategies``).
"""
