"""Run-time helpers for the entry points: config tree, flat hyperparameters, W&B without credentials."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def find_error(err: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first of ``err`` and the errors it was raised from or during (``__cause__``, ``__context__``) that
    is one of ``types``: an entry point's one-line error, also when a library wrapped it (a callback's error
    inside Lightning's fit, a write failing while another error was handled). None when there is none."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, types):
            return e
        todo += [e.__cause__, e.__context__]
    return None


def print_config_tree(cfg: DictConfig, save_to: str | Path | None = None) -> None:
    """Print the composed config as a rich tree (one branch per group) and optionally save it as YAML."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="bold")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold cyan")
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)
    if save_to is not None:
        save_config(cfg, save_to)


def config_summary(cfg: DictConfig, saved_to: str | Path | None = None) -> str:
    """One line naming what a run trains (model, loss and its beta, lr, steps) and where its full config is."""
    def get(key: str):
        return OmegaConf.select(cfg, key, default=None)

    loss = f"{get('loss.name')}" + (f" (beta {get('loss.beta')})" if get("loss.beta") is not None else "")
    parts = [f"model {get('model.name_or_path')}", f"loss {loss}", f"lr {get('optimizer.lr')}",
             f"max_steps {get('trainer.max_steps')}", f"reference {get('reference.mode')}"]
    where = f"; full config: {saved_to} (print it with print_config=true)" if saved_to else ""
    return "config: " + ", ".join(parts) + where


def save_config(cfg: DictConfig, path: str | Path) -> None:
    from dpo_lightning.files.atomic import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"loss": {"beta": 0.1}} -> {"loss.beta": 0.1}; ``_target_`` keys are dropped."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if k == "_target_":
                continue
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = d if isinstance(d, (int, float, str, bool)) or d is None else str(d)
    return out


def wandb_has_credentials() -> bool:
    """True when W&B could log online without prompting (API key in env, netrc, or settings)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        if rc.authenticators(host):
            return True
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return False


def prepare_wandb(logger_cfg: DictConfig | None) -> str | None:
    """Switch W&B to offline mode when there are no credentials; returns a notice to print, or None."""
    if not logger_cfg or "wandb" not in logger_cfg:
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    offline = bool(logger_cfg.wandb.get("offline")) or os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled")
    if not offline and not wandb_has_credentials():
        logger_cfg.wandb.offline = True
        os.environ["WANDB_MODE"] = "offline"
        return "W&B: no credentials found (WANDB_API_KEY or `wandb login`): logging offline."
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    return None


def wandb_sync_hint(loggers: list) -> str | None:
    """The `wandb sync` command for the offline W&B run of this job, if one was logged."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
            runs = sorted(Path(lg.save_dir or ".").glob("wandb/offline-run-*"), key=lambda p: p.stat().st_mtime)
            return f"wandb sync {runs[-1]}" if runs else f"wandb sync {lg.save_dir}/wandb/offline-run-*"
    return None
