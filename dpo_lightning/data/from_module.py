"""Let a ``PreferenceDataModule`` learn what its rows must look like from the module it is trained with.

In a plain Lightning project (no Hydra) a user writes ``trainer.fit(module, datamodule=dm)``; the data module's
``paired`` / ``kl_pairs`` left as ``None`` are then taken from ``module.loss_fn`` in ``setup`` (an unpaired loss
such as KTO gets pairs split into rows, plus its KL rows), so forgetting ``paired=module.loss_fn.paired`` no
longer fails later. Values given explicitly are kept, and a contradiction is refused.
"""

from __future__ import annotations

from typing import Any


def adopt_loss_settings(dm: Any, module: Any) -> bool:
    """Fill ``dm.paired`` / ``dm.kl_pairs`` left as None from ``module.loss_fn``. Returns True when rows the data
    module already built are of the wrong kind for this loss and must be built again."""
    loss = getattr(module, "loss_fn", None)
    if loss is None or not hasattr(loss, "paired"):
        return False
    paired, kl_pairs = bool(loss.paired), bool(getattr(loss, "needs_kl_pairs", False))
    if dm.paired is not None and bool(dm.paired) != paired:
        kind = "paired rows (prompt/chosen/rejected)" if paired else "unpaired rows (pairs are split)"
        raise ValueError(f"PreferenceDataModule(paired={dm.paired}) does not fit loss {loss.name!r}, which needs "
                         f"{kind}; leave paired=None to follow the module's loss")
    dm.paired = paired
    if dm.kl_pairs is None:
        dm.kl_pairs = kl_pairs
    rows: Any = getattr(dm, "train_rows", None)
    return bool(rows) and ("chosen_ids" in rows[0]) != paired
