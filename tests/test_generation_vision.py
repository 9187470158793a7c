"""Generation evaluation with images (tiny LLaVA, builtin:shapes-style data): held-out prompts keep their images,
sampling and gen/kl scoring see the pixels, records name the images by sha256, the W&B table shows them; and
`dpo-train experiment=tiny_vlm` end to end."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import requires_vision

from dpo_lightning import GenerationSettings, PreferenceDataModule, PreferenceLitModule
from dpo_lightning.data import shapes
from dpo_lightning.data.vision_collate import pixel_inputs
from dpo_lightning.evaluation.generation import generate_and_score, held_out_prompts, score_completions
from dpo_lightning.models.hf import ModelSpec, load_tokenizer

pytestmark = requires_vision
SPEC = ModelSpec("builtin:tiny-vlm")


@pytest.fixture(scope="module")
def vision_rows(tmp_path_factory):
    """A small shapes file tokenized by the tiny VLM's processor: (processor, held-out rows)."""
    path = shapes.write(tmp_path_factory.mktemp("shapes"), n_pairs=16, seed=5, image_size=32)
    processor = load_tokenizer(SPEC)
    dm = PreferenceDataModule(str(path), tokenizer=processor, val_fraction=0.5, batch_size=4, num_proc=1,
                              cache_dir=str(tmp_path_factory.mktemp("cache")), report_path=None)
    dm.setup("fit")
    return processor, list(dm.val_rows)


def test_held_out_prompts_keep_their_images(vision_rows):
    _, rows = vision_rows
    prompts = held_out_prompts(rows, 5)
    assert len(prompts) == 5 and all(len(p) == 3 and len(p[2]) == 1 for p in prompts)
    by_index = sorted(rows, key=lambda r: r["index"])
    assert [p[2][0] for p in prompts] == [bytes(r["images"][0]) for r in by_index[:5]]
    # the same question text with another picture is another prompt; text rows are as they were
    assert len({tuple(p[1]) for p in prompts}) < 5
    assert held_out_prompts([{"index": 0, "prompt_ids": [1]}, {"index": 1, "prompt_ids": [1]}], 2) == [(0, [1])]


def test_generation_scores_with_the_images(vision_rows):
    processor, rows = vision_rows
    torch.manual_seed(0)
    module = PreferenceLitModule(SPEC)
    prompts = held_out_prompts(rows, 3)
    settings = GenerationSettings(num_samples=2, max_new_tokens=4, batch_size=4)
    records, refs = generate_and_score(module, processor, prompts, settings, seed=0)
    assert len(records) == 6 and sorted(refs) == [0, 1, 2]
    assert all(r["kl"] == 0.0 for r in records)  # same weights, same images, same engine
    for r in records:
        assert r["images"] == [{"sha256": hashlib.sha256(prompts[r["prompt_index"]][2][0]).hexdigest()}]
        assert "<image>" not in r["prompt"] and r["prompt"].startswith("user :")
    # the policy log-prob of a sample = the model's own forward on the prompt, its image and the sample
    tok = processor.tokenizer
    r = records[0]
    ids, pics = prompts[0][1], prompts[0][2]
    comp = tok(r["policy"], add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if r["eos"] else [])
    assert len(comp) == r["length"]
    with torch.no_grad():
        logits = module.policy(input_ids=torch.tensor([ids + comp]), **pixel_inputs(processor, pics)).logits[0]
    lp = logits.float().log_softmax(-1)[len(ids) - 1:-1].gather(1, torch.tensor(comp)[:, None]).sum()
    torch.testing.assert_close(torch.tensor(r["policy_logp"]), lp, atol=1e-4, rtol=0)
    # another picture gives another score: the images reach the scoring
    other = score_completions(module.policy, [ids], [comp], pad_token_id=tok.pad_token_id, processor=processor,
                              images=[prompts[1][2]])
    assert abs(float(other[0]) - r["policy_logp"]) > 1e-4


def test_callback_in_a_fit_records_images_and_shows_them_in_wandb(tmp_path, monkeypatch):
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from dpo_lightning.callbacks import GenerationEvaluation

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []  # what reaches W&B (an offline run keeps a table's images inside its run artifact, not in files/)
    original = WandbLogger.log_table
    monkeypatch.setattr(WandbLogger, "log_table", lambda self, **kw: (logged.append(kw), original(self, **kw))[1])
    L.seed_everything(0)
    path = shapes.write(tmp_path / "shapes", n_pairs=24, seed=1, image_size=32)
    dm = PreferenceDataModule(str(path), tokenizer=SPEC, val_fraction=0.25, batch_size=4, num_proc=1,
                              cache_dir=str(tmp_path / "cache"), report_path=None)
    cb = GenerationEvaluation({"num_prompts": 2, "num_samples": 1, "max_new_tokens": 3}, dirpath=str(tmp_path / "gen"))
    wandb_logger = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(max_steps=2, val_check_interval=2, accelerator="cpu", logger=[wandb_logger], callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(PreferenceLitModule(SPEC, optimizer={"lr": 1e-2}), datamodule=dm)
    wandb_logger.experiment.finish()
    records = [json.loads(x) for x in (tmp_path / "gen" / "step_2.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["images"]) == 1 and len(r["images"][0]["sha256"]) == 64 for r in records)
    assert "gen/kl" in cb.last_metrics
    import wandb
    from PIL import Image

    (table,) = logged
    assert table["key"] == "generations/step_2" and table["columns"][-1] == "image"
    assert [row[1] for row in table["data"]] == [r["prompt"] for r in records]
    for row, r in zip(table["data"], records):
        assert isinstance(row[-1], wandb.Image)
        shown = Image.open(row[-1]._path).convert("RGB")
        drawn = next(p for p in (tmp_path / "shapes" / "img").glob("*.png")
                     if hashlib.sha256(p.read_bytes()).hexdigest() == r["images"][0]["sha256"])
        assert shown.tobytes() == Image.open(drawn).convert("RGB").tobytes()  # the prompt's own picture
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/table/generations/step_2_*.json"))


@pytest.mark.slow
@pytest.mark.subprocess
def test_dpo_train_experiment_tiny_vlm(tmp_path):
    """The vision default as a user runs it (fewer steps): the summary line, generations with images."""
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "dpo_lightning.train", "experiment=tiny_vlm", f"paths.output_dir={out}", "logger=csv",
         "trainer.max_steps=6", "trainer.val_check_interval=3", "generation.num_prompts=2", "export=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    assert "held-out reward accuracy: before 0.000" in res.stdout and "72 held-out pairs" in res.stdout
    records = [json.loads(x) for x in (out / "generations" / "step_6.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 1 and all(r["images"] and r["prompt"].startswith("user :") for r in records)
