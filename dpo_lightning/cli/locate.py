"""Locate the packaged Hydra configs and compose them without the command line (tests, notebooks).

Installed wheels carry them as ``dpo_lightning/conf``; a source checkout has them in the top-level
``conf/``. Your own project can add its config folder on top: ``dpo-train --config-dir my_conf`` or
``hydra.searchpath=[file://my_conf]``; ``pkg://dpo_lightning.conf`` names ours from elsewhere.
"""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    here = Path(__file__).resolve().parent.parent  # the dpo_lightning package
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"dpo_lightning's Hydra configs were not found next to {here}; reinstall the package")


def compose(config_name: str = "train", overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose a config exactly as the CLI would (Hydra imported here, lazily)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides or []),
                             return_hydra_config=return_hydra_config)
