"""Collators: one documented batch contract for every loss.

Paired batch of B pairs (``PreferenceCollator``), plain layout (TRL 1.16's ``DataCollatorForPreference``):

    input_ids        [2B, L]  rows 0..B-1: prompt+chosen, rows B..2B-1: prompt+rejected, right-padded
    attention_mask   [2B, L]  1 on real tokens
    completion_mask  [2B, L]  1 on completion tokens
    score_src/tgt/seq/pos [T] the completion tokens to score (see ``logprobs.py``)
    index            [B]      dataset row of each pair (reference-cache lookups)
    num_sequences    int      2B
    ref_chosen_logps, ref_rejected_logps [B]  only when the dataset carries precomputed reference log-probs

Unpaired batch (KTO, ``UnpairedCollator``): the same with rows 0..B-1 = prompt+completion, ``label`` [B]
(bool) and, when ``kl_pairs`` is on, rows B..2B-1 = prompt i + completion (i-1) mod B, the mismatched pairs
TRL's KTOTrainer uses for its KL estimate.

Other layouts (``layout=``) hold the same sequences (same ``score_seq`` numbering, same ``score_tgt`` and
``score_pos`` values, so every loss sees identical inputs) in fewer tokens:

    prefix_shared    one row per prompt: [prompt | chosen | rejected], the prompt computed once; positions
                     restart at len(prompt) for each completion (``position_ids``) and the 4D mask built from
                     ``segment_ids`` / ``branch_ids`` (``logprobs.tree_attention_mask``) hides the chosen
                     tokens from the rejected ones. Unpaired rows with KL pairs share prompt i likewise.
    packed           the prefix-shared units of the whole batch in one row, no padding (4D mask).
    packed_unshared  every sequence (prompt + completion) in one row, positions restarting per sequence:
                     the padding-free layout flash-attention varlen kernels take (``segment_ids`` only).

Those layouts add ``position_ids``, ``segment_ids`` (-1 on padding) and, with prefix sharing, ``branch_ids``
(0 prompt, 1 first completion, 2 second); ``attention_mask`` stays the 2D real-token mask (for counting),
and ``completion_mask`` marks completion tokens.

Vision (the collator given a ``processor``, rows with ``images``: a list of encoded bytes per row). A batch in
which some row has an image also carries (a batch without any image is exactly the text batch above):

    vision              dict of the model-forward image tensors from the processor's image path, run on the
                        batch's images at collate time (``vision_collate.py``): ``pixel_values`` and whatever the
                        family adds (``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``, ...). Images
                        are in the order their tokens appear when the layout's rows are read row-major: plain =
                        every pair's images for rows 0..B-1, then again for rows B..2B-1 (TRL's order);
                        prefix_shared / packed = every pair's images once; packed_unshared = one copy per sequence
                        (pair 0 chosen, pair 0 rejected, pair 1 ...). Idefics3 / SmolVLM: pixel_values
                        [1, images, C, H, W] with pixel_attention_mask [1, images, H, W]; LLaVA-NeXT: [images,
                        patches, C, H, W] with image_sizes [images, 2]; Qwen2-VL: flat patches with
                        image_grid_thw [images, 3]; LLaVA / Gemma 3: [images, C, H, W].
    token_type_ids      [N, L] for families whose processor returns them (Gemma 3: 1 on the image token;
                        PaliGemma: 0 on the prompt with its image, 1 on completion tokens), 0 on padding
    mm_token_type_ids   [N, L] Qwen2-VL / Qwen2.5-VL: 1 on image tokens, 0 elsewhere and on padding

The prompt ids already hold the expanded image tokens (``tokenize.py``), so every other key means what it means
for text, in every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dpo_lightning.data.layouts import check_layout, layout_batch
from dpo_lightning.data.vision_collate import VisionBatcher


@dataclass
class PreferenceCollator:
    """Collate tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) into the paired contract."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    layout: str = "plain"
    processor: Any = None  # a vision-language model's processor: batches with images get the vision keys

    def __post_init__(self):
        check_layout(self.layout)
        self._vision = VisionBatcher(self.processor) if self.processor is not None else None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [[r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows]]
        batch = layout_batch(self.layout, prompts, completions, self.pad_token_id, self.pad_to_multiple_of)
        batch = _add_vision(self._vision, batch, rows, self.layout, len(completions))
        return _add_common(batch, rows)


@dataclass
class UnpairedCollator:
    """Collate unpaired rows (``prompt_ids``, ``completion_ids``, ``label``) into the unpaired contract."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    kl_pairs: bool = False
    layout: str = "plain"
    from_pairs: bool = False  # rows 2i, 2i+1 are pair i's chosen and rejected: batches carry ``pair`` ids
    processor: Any = None  # a vision-language model's processor: batches with images get the vision keys

    def __post_init__(self):
        check_layout(self.layout)
        self._vision = VisionBatcher(self.processor) if self.processor is not None else None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [[r["completion_ids"] for r in rows]]
        if self.kl_pairs:  # prompt i with completion i-1: TRL KTOTrainer's mismatched KL pairs
            completions.append(completions[0][-1:] + completions[0][:-1])
        batch = layout_batch(self.layout, prompts, completions, self.pad_token_id, self.pad_to_multiple_of)
        batch["label"] = torch.tensor([bool(r["label"]) for r in rows])
        batch = _add_vision(self._vision, batch, rows, self.layout, len(completions))
        batch = _add_common(batch, rows)
        if self.from_pairs:  # lets the module score reward accuracy on pairs whose two rows share a batch
            batch["pair"] = batch["index"] // 2
        return batch


REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_shared_logps", "ref_rejected_shared_logps",
            "ref_logps", "ref_kl_logps")


def _add_vision(vision: VisionBatcher | None, batch: dict[str, Any], rows: list[dict[str, Any]], layout: str,
                k: int) -> dict[str, Any]:
    if vision is None or not any(r.get("images") for r in rows):
        return batch
    return vision.add(batch, layout, [list(r.get("images") or []) for r in rows], k)


def _add_common(batch: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    batch["index"] = torch.tensor([int(r.get("index", -1)) for r in rows], dtype=torch.long)
    for key in REF_KEYS:
        if key in rows[0]:
            batch[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)
    return batch
