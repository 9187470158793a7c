"""Precomputed reference log-probs: one pass before training, cached on disk, reused by later runs and sweeps.

    reference.precompute=true   ->  the module's ``Reference`` (mode ``cached``) calls ``precompute_reference``
                                    from the module's ``setup`` hook, before any dataloader exists

Per row it stores what any loss of the registry can need, so one cache serves every loss and ``ld_alpha``:

    paired    ref_chosen_logps, ref_rejected_logps               sums over the completion tokens
              ref_chosen_shared_logps, ref_rejected_shared_logps sums over the first min(len chosen,
                                                                  len rejected) tokens (LD-DPO's shared part)
    unpaired  ref_logps                                          (KTO/BCO without KL rows)

Length normalization and LD-DPO's ``shared + alpha * (sum - shared)`` are applied later from these sums and
the batch's lengths (``inputs.py``), exactly as for a live reference.

The cache key hashes everything the values depend on: the reference weights (every tensor's bytes, or for
models over ``HASH_TENSOR_LIMIT`` bytes the weight files' content ids), the tokenizer fingerprint (vocabulary,
merges, special tokens, chat template), the truncation settings and the tokenized rows themselves (ids of
prompt and completions, in order; the layout is irrelevant). Change any of them and the values are recomputed;
keep them all and a second run (or every job of a sweep) loads the file instead. Files are written atomically
(temp file + rename) as safetensors under ``<cache_dir>/reference/<key>.safetensors``: reading one runs no
code (no pickle), so a cache folder shared between users is safe. The computing process holds
``<key>.safetensors.lock``, so parallel jobs (joblib, SLURM arrays on a shared filesystem) wait for it and load its
file instead of computing too.

KTO's KL rows pair prompt i with completion i-1 *of the same batch*: their reference values depend on how the
data is batched, so they cannot be precomputed; that combination is refused (``spec.check_precompute``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from dpo_lightning.engine.logprobs import sequence_logps
from dpo_lightning.files import disk_cache
from dpo_lightning.models.peft import adapters_disabled, is_peft_model
from dpo_lightning.reference.spec import Mode, PrecomputeError, build_reference, check_precompute

CACHE_VERSION = "2"  # 2: safetensors files
HASH_TENSOR_LIMIT = 4 * 2**30  # above this many bytes of weights, hash the weight files instead
PAIRED_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_shared_logps", "ref_rejected_shared_logps")
UNPAIRED_KEYS = ("ref_logps",)


# ------------------------------------------------------------------ fingerprints
def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if not t.numel():
        return
    flat = t.reshape(-1).view(torch.uint8)
    step = 1 << 26  # 64 MiB slices keep peak memory flat
    for s in range(0, flat.numel(), step):
        h.update(flat[s:s + step].numpy())


def weights_fingerprint(model: torch.nn.Module, *, source: str | None = None,
                        exclude: tuple[str, ...] = ("lora_", "modules_to_save")) -> str:
    """A hash of a model's weights (names, dtypes, shapes, bytes); LoRA weights excluded (the reference is
    the base model). Over ``HASH_TENSOR_LIMIT`` bytes, with a local ``source`` folder: the weight files."""
    h = hashlib.sha256()
    state = {k: v for k, v in model.state_dict().items()
             if torch.is_tensor(v) and not any(x in k for x in exclude)}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    if nbytes > HASH_TENSOR_LIMIT and source and Path(source).is_dir():
        dtypes = sorted({str(v.dtype) for v in state.values()})
        h.update(json.dumps(["files", dtypes, sorted((k, list(v.shape)) for k, v in state.items())]).encode())
        h.update(_files_fingerprint(Path(source)).encode())
        return h.hexdigest()
    for k in sorted(state):
        v = state[k]
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        _update_tensor(h, v)
    return h.hexdigest()


def _files_fingerprint(folder: Path) -> str:
    """Content ids of a model folder's weight files and config: a Hugging Face cache stores weights as
    content-addressed blobs (the symlink target's name is the file's sha256); other files are hashed."""
    from dpo_lightning.data.cache_keys import hash_file

    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix not in (".safetensors", ".bin", ".json") or not f.is_file():
            continue
        target = f.resolve()
        if f.is_symlink() and target.parent.name == "blobs":
            h.update(f"{f.name}|{target.name}".encode())
            continue
        h.update(f.name.encode())
        hash_file(h, target)
    return h.hexdigest()


def rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    """A hash of the tokenized rows (prompt and completion ids, in order, and each image's content: its bytes'
    sha256, never its path), independent of batch layout."""
    h = hashlib.sha256()
    for r in rows:
        comps = (r["chosen_ids"], r["rejected_ids"]) if "chosen_ids" in r else (r["completion_ids"],)
        images = [hashlib.sha256(b).hexdigest() for b in r.get("images") or ()]
        h.update(json.dumps([r["prompt_ids"], *comps] + ([images] if images else [])).encode())
    return h.hexdigest()


def cache_key(*, weights: str, tokenizer: str, truncation: dict[str, Any], rows: str) -> str:
    return disk_cache.cache_key(weights, tokenizer, truncation, rows, version=CACHE_VERSION, length=24)


def cache_root(cache_dir: str | Path | None) -> Path:
    return disk_cache.cache_root(cache_dir, "reference")


# ------------------------------------------------------------------ computation
@torch.no_grad()
def compute_reference_logps(model: torch.nn.Module, rows: list[dict[str, Any]], collator, *,
                            batch_size: int = 16, chunk_size: int = 1024,
                            device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Reference sums for every row (see the module docstring), one no-grad pass in length order."""
    paired = "chosen_ids" in rows[0]
    check_precompute(not paired and bool(getattr(collator, "kl_pairs", False)))
    keys = PAIRED_KEYS if paired else UNPAIRED_KEYS
    out = {k: torch.zeros(len(rows), dtype=torch.float64) for k in keys}
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def cost(i):
        r = rows[i]
        return len(r["prompt_ids"]) + (len(r["chosen_ids"]) + len(r["rejected_ids"]) if paired
                                       else len(r["completion_ids"]))
    order = sorted(range(len(rows)), key=cost, reverse=True)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = collator([rows[i] for i in idx])
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            if batch.get("vision"):  # pixel tensors (a vision-language model's batch)
                batch["vision"] = {k: v.to(device) for k, v in batch["vision"].items()}
            res = sequence_logps(model, batch, batch["num_sequences"], chunk_size=chunk_size)
            B, tok = len(idx), res.token_logps.double()
            sums = res.logps.double().cpu()
            ix = torch.tensor(idx)
            if paired:
                shared = torch.minimum(res.lengths[:B], res.lengths[B:2 * B])
                shared = torch.cat([shared, shared])
                w = (res.pos <= shared[res.seq]).double()
                shared_sums = tok.new_zeros(2 * B).index_add(0, res.seq, tok * w).cpu()
                out["ref_chosen_logps"][ix], out["ref_rejected_logps"][ix] = sums[:B], sums[B:2 * B]
                out["ref_chosen_shared_logps"][ix] = shared_sums[:B]
                out["ref_rejected_shared_logps"][ix] = shared_sums[B:2 * B]
            else:
                out["ref_logps"][ix] = sums[:B]
    finally:
        model.train(was_training)
    return {k: v.float() for k, v in out.items()}


def save_atomic(path: Path, values: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``values`` as a safetensors file (tensors + a JSON metadata string; no pickle), atomically."""
    from safetensors.torch import save_file

    disk_cache.publish_file(path, lambda tmp: save_file(
        {k: v.detach().cpu().contiguous() for k, v in values.items()}, tmp,
        metadata={"meta": json.dumps(meta, sort_keys=True, default=str)}), suffix=".safetensors")


def load(path: Path, n_rows: int) -> dict[str, torch.Tensor] | None:
    """The cached values, or None (a miss) when the file is unreadable, not safetensors, or for other rows.
    Reading a safetensors file runs no code, so a shared cache folder is safe to read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        values = load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError):
        return None
    if not values or any(v.numel() != n_rows for v in values.values()):
        return None
    return values


def attach(rows: list[dict[str, Any]], values: dict[str, torch.Tensor]) -> None:
    """Write the per-row values into the row dicts (the collators copy them into batches); rows built on
    access (``TokenRows``) carry them as columns."""
    if hasattr(rows, "set_column"):
        for k, v in values.items():
            rows.set_column(k, v.detach().cpu().numpy())
        return
    cols = {k: v.tolist() for k, v in values.items()}
    for i, r in enumerate(rows):
        for k, col in cols.items():
            r[k] = col[i]


def cached_reference_logps(rows: list[dict[str, Any]], model: torch.nn.Module, collator, *, weights: str,
                           tokenizer: str, truncation: dict[str, Any], cache_dir: str | Path | None = None,
                           batch_size: int = 16, chunk_size: int = 1024, device=None,
                           is_writer: bool = True, barrier=None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load the rows' reference values from the cache, or compute and save them. Returns (values, info)."""
    key = cache_key(weights=weights, tokenizer=tokenizer, truncation=truncation, rows=rows_fingerprint(rows))
    path = cache_root(cache_dir) / f"{key}.safetensors"
    info: dict[str, Any] = {"key": key, "path": str(path), "rows": len(rows)}
    values = load(path, len(rows)) if path.exists() else None
    if values is None and not is_writer and barrier is not None:
        barrier()  # the writer rank computes; the others wait and read its file
        values = load(path, len(rows)) if path.exists() else None
        barrier = None
    if values is None and is_writer:
        # Other processes (parallel sweep jobs) may want the same values: one computes under the file lock,
        # the others wait for it and then load its file instead of computing too.
        with compute_lock(path):
            values = load(path, len(rows)) if path.exists() else None
            if values is None:
                values, seconds = _compute(model, rows, collator, batch_size, chunk_size, device)
                info.update(hit=False, seconds=seconds)
                save_atomic(path, values, {"weights": weights, "tokenizer": tokenizer, "truncation": truncation,
                                           "rows": len(rows), "version": CACHE_VERSION})
    elif values is None:
        values, seconds = _compute(model, rows, collator, batch_size, chunk_size, device)
        info.update(hit=False, seconds=seconds)
    if "hit" not in info:
        info.update(hit=True, seconds=0.0)
    if barrier is not None:
        barrier()
    return values, info


def _compute(model, rows, collator, batch_size, chunk_size, device) -> tuple[dict[str, torch.Tensor], float]:
    t0 = time.perf_counter()
    values = compute_reference_logps(model, rows, collator, batch_size=batch_size, chunk_size=chunk_size,
                                     device=device)
    return values, time.perf_counter() - t0


@contextlib.contextmanager
def compute_lock(path: Path, poll: float = 0.5):
    """An exclusive lock on ``<path>.lock`` (``filelock``: fcntl/msvcrt, released if the holder dies); says
    so when it has to wait for another process computing the same reference values."""
    with disk_cache.file_lock(path, poll=poll, waiting=f"[dpo_lightning] another process is computing these "
                              f"reference log-probs ({path.name}); waiting for it (lock file beside it)"):
        yield


# ------------------------------------------------------------------ the Reference's hook
def precompute_reference(reference, datamodule, *, trainer=None, chunk_size: int = 1024,
                         policy_trained: bool = False) -> list[dict[str, Any]]:
    """Fill ``ref_*`` into the datamodule's train and validation rows for ``reference``, a ``Reference`` in
    ``cached`` mode.

    The reference is the policy's initial weights (the policy itself, before any step: no copy), the
    policy with LoRA adapters disabled, or a separately loaded model (``reference.name_or_path``, a lower
    ``reference.dtype``, quantization) that is freed right after. ``trainer`` places the computation and
    synchronizes ranks; ``policy_trained`` says the policy has already moved (then only a separately loaded
    reference can serve). Returns one info dict per row set.
    """
    from dpo_lightning.data.datamodule import tokenizer_fingerprint

    if datamodule is None or not hasattr(datamodule, "train_rows"):
        raise PrecomputeError("reference.precompute needs a PreferenceDataModule (trainer.fit(module, "
                              "datamodule=...)) to read the rows from")
    if datamodule.train_rows is None:
        datamodule.setup("fit")
    check_precompute(bool(getattr(datamodule, "kl_pairs", False)))
    row_sets = [rows for rows in (datamodule.train_rows, datamodule.val_rows) if rows]
    keys = PAIRED_KEYS if "chosen_ids" in row_sets[0][0] else UNPAIRED_KEYS
    todo = [rows for rows in row_sets if any(k not in rows[0] for k in keys)]
    if not todo:
        return []
    spec, policy, policy_spec = reference.spec, reference.policy, reference.policy_spec
    separate = spec.separate
    if not separate and policy_trained:
        raise PrecomputeError("the reference is the policy's initial weights, but the policy has been trained "
                              "since; precompute before training (rows without cached reference values)")
    device = trainer.strategy.root_device if trainer is not None else next(policy.parameters()).device
    is_writer = trainer is None or trainer.is_global_zero
    barrier = (lambda: trainer.strategy.barrier("reference_cache")) if (
        trainer is not None and trainer.world_size > 1) else None
    ctx: Any = contextlib.nullcontext()
    if separate:
        mode = Mode.MODEL if spec.name_or_path else Mode.COPY
        model = build_reference(mode, spec, policy_spec, policy)
        source = spec.name_or_path or policy_spec.name_or_path
    else:
        model, source = policy, policy_spec.name_or_path
        if is_peft_model(model):
            ctx = adapters_disabled(model)
    from dpo_lightning.models.hf import resolve_path

    try:
        source = resolve_path(type(policy_spec)(**{**policy_spec.__dict__, "name_or_path": source}))
    except Exception:  # noqa: BLE001 - only a hint for the file-based fingerprint of huge models
        source = None
    home = next(model.parameters()).device
    movable = home.type == "cpu" and not any(getattr(model, f, False) for f in ("is_loaded_in_4bit",
                                                                                 "is_loaded_in_8bit"))
    if movable:  # setup() runs before the strategy places the module; quantized models are placed already
        model.to(device)
    else:
        device = home
    infos = []
    try:
        with ctx:
            weights = weights_fingerprint(model, source=source)
            collator = datamodule.collator()
            for rows in todo:
                values, info = cached_reference_logps(
                    rows, model, collator, weights=weights, tokenizer=tokenizer_fingerprint(
                        datamodule.processor or datamodule.tokenizer),
                    truncation=dict(datamodule.truncation.__dict__), cache_dir=datamodule.cache_dir,
                    batch_size=max(datamodule.eval_batch_size, datamodule.batch_size),
                    chunk_size=chunk_size, device=device, is_writer=is_writer, barrier=barrier)
                attach(rows, values)
                infos.append(info)
    finally:
        if separate:
            del model
        elif movable:
            model.to(home)
    return infos
