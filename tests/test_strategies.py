"""Every strategy, quantization, peft and precision option composes and constructs its object; invalid
combinations are refused before any model loads; FSDP and FSDP2 really run (CPU processes, gloo) and match
one process step for step, with the full weights gathered for the export."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SCRIPTS, script_env
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpo_lightning.cli.locate import compose, config_dir
from dpo_lightning.config import base as validation  # the environment probes the checks look up
from dpo_lightning.config.validate import PRECISIONS, ConfigError, validate_config
from dpo_lightning.training.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    build_strategy,
    decoder_layer_classes,
    strategy_kind,
)

STRATEGIES = sorted(p.stem for p in (config_dir() / "strategy").glob("*.yaml"))
QUANTIZATIONS = sorted(p.stem for p in (config_dir() / "quantization").glob("*.yaml"))
PEFTS = sorted(p.stem for p in (config_dir() / "peft").glob("*.yaml"))
KIND = {"auto": "auto", "ddp": "ddp", "fsdp": "fsdp", "fsdp_offload": "fsdp", "fsdp2": "model_parallel",
        "deepspeed_zero2": "deepspeed", "deepspeed_zero2_offload": "deepspeed", "deepspeed_zero3": "deepspeed",
        "deepspeed_zero3_offload": "deepspeed"}
HAS_DEEPSPEED = validation.installed("deepspeed")


@pytest.fixture
def no_gpu(monkeypatch):
    """Behave as on a machine without CUDA, whatever this one has."""
    monkeypatch.setattr(validation, "cuda_available", lambda: False)


@pytest.fixture
def gpu(monkeypatch):
    """Behave as on a CUDA machine with bf16 (validation only: nothing runs on it)."""
    monkeypatch.setattr(validation, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def _cfg(*overrides: str):
    return compose("train", ["logger=csv", *overrides])


def test_every_option_file_is_known():
    assert set(STRATEGIES) == set(KIND), STRATEGIES
    assert set(QUANTIZATIONS) == {"none", "bnb_4bit", "bnb_8bit"}
    assert set(PEFTS) == {"none", "lora"}
    cfg = _cfg()
    assert cfg.strategy == "auto" and cfg.peft is None and cfg.model.quantization is None
    assert "strategy" not in cfg.trainer  # the group owns it


def test_every_yaml_key_has_a_comment():
    for group in ("strategy", "quantization", "peft", "hydra/launcher"):
        for path in (config_dir() / group).glob("*.yaml"):
            for line in path.read_text().splitlines():
                text = line.strip()
                if not text or text.startswith("#") or text.startswith("- ") or text.endswith(":") \
                        or text.startswith("defaults:"):
                    continue
                assert "#" in line, f"{path.name}: {line!r} has no comment"


# ------------------------------------------------------------------ strategies
@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_composes_and_constructs(name, gpu, monkeypatch):
    cfg = _cfg(f"strategy={name}", "trainer.accelerator=gpu")
    assert strategy_kind(cfg.strategy) == KIND[name]
    if KIND[name] == "deepspeed" and not HAS_DEEPSPEED:
        with pytest.raises(ConfigError, match="DeepSpeed is not installed.*pip install"):
            validate_config(cfg)
        pytest.skip("deepspeed is not installed: the refusal is tested, construction is not")
    validate_config(cfg)  # valid on a GPU machine
    strategy = build_strategy(cfg.strategy)
    if name == "auto":
        assert strategy == "auto"
    elif name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        assert type(strategy) is DDPStrategy
        assert strategy._ddp_kwargs["find_unused_parameters"] is False
    elif name.startswith("fsdp2"):
        assert isinstance(strategy, ModelParallelStrategy)
        assert strategy._tensor_parallel_size == 1 and strategy._checkpoint_layers
    elif name.startswith("fsdp"):
        assert isinstance(strategy, FSDPStrategy)
        assert strategy._state_dict_type == "sharded" and strategy._checkpoint_layers
        assert str(strategy.sharding_strategy).endswith("FULL_SHARD")
        assert bool(strategy.cpu_offload and strategy.cpu_offload.offload_params) == name.endswith("offload")
    else:
        assert isinstance(strategy, DeepSpeedStrategy)
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == (3 if "zero3" in name else 2)
        assert ("offload_optimizer" in zero) == name.endswith("offload")
        assert ("offload_param" in zero) == (name == "deepspeed_zero3_offload")
        assert strategy.exclude_frozen_parameters


@pytest.mark.parametrize("name", [n for n in STRATEGIES if KIND[n] in ("fsdp", "model_parallel", "deepspeed")])
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_sharded_strategies_refuse_cpu_with_our_message(name, accelerator, no_gpu):
    cfg = _cfg(f"strategy={name}", f"trainer.accelerator={accelerator}")
    with pytest.raises(ConfigError, match=r"CUDA GPUs.*strategy=ddp trainer.accelerator=cpu"):
        validate_config(cfg)


def test_deepspeed_missing_is_refused(gpu, monkeypatch):
    monkeypatch.setattr(validation, "installed", lambda name: name != "deepspeed")
    with pytest.raises(ConfigError, match=r"DeepSpeed is not installed.*dpo-lightning\[deepspeed\]"):
        validate_config(_cfg("strategy=deepspeed_zero3", "trainer.accelerator=gpu"))


def test_trainer_strategy_key_is_refused(no_gpu):
    with pytest.raises(ConfigError, match="strategy=ddp"):
        validate_config(_cfg("+trainer.strategy=ddp"))


def test_double_activation_checkpointing_is_refused(gpu):
    cfg = _cfg("strategy=fsdp", "trainer.accelerator=gpu", "++engine.gradient_checkpointing=true")
    with pytest.raises(ConfigError, match="engine.gradient_checkpointing=false"):
        validate_config(cfg)
    validate_config(_cfg("strategy=fsdp", "trainer.accelerator=gpu", "strategy.activation_checkpointing=false",
                         "++engine.gradient_checkpointing=true"))


def test_dpo_train_refuses_fsdp_on_cpu_before_loading_anything(tmp_path, monkeypatch):
    """dpo-train's own path in process (test_cli checks how the command line reports such an error: ``error:``
    and exit status 2): the refusal comes before anything is built or written."""
    from dpo_lightning import train as train_mod

    def build(*a, **k):
        raise AssertionError("the model was about to be loaded")

    monkeypatch.setattr(train_mod, "build", build)
    with pytest.raises(ConfigError) as err:
        train_mod.train(compose("train", ["strategy=fsdp", "trainer.accelerator=cpu", f"paths.output_dir={tmp_path}",
                                          "logger=csv"]))
    assert str(err.value).startswith("strategy=fsdp") and "strategy=ddp trainer.accelerator=cpu" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_ddp_trainer_constructs_on_cpu(no_gpu):
    from lightning.pytorch.strategies import DDPStrategy

    cfg = _cfg("strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    validate_config(cfg)
    trainer = instantiate(cfg.trainer, strategy=build_strategy(cfg.strategy), logger=False, callbacks=[])
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2


def test_decoder_layer_classes_found_from_the_model(tiny_path):
    from dpo_lightning import PreferenceLitModule

    module = PreferenceLitModule(str(tiny_path), loss="sigmoid")
    classes = decoder_layer_classes(module)
    assert {c.__name__ for c in classes} == {"LlamaDecoderLayer"}
    assert decoder_layer_classes(module, ["LlamaMLP"]) == {type(module.policy.model.layers[0].mlp)}
    with pytest.raises(ValueError, match="strategy.auto_wrap"):
        decoder_layer_classes(module, ["NoSuchLayer"])
    lora = PreferenceLitModule(str(tiny_path), loss="sigmoid", peft={"r": 2})
    assert {c.__name__ for c in decoder_layer_classes(lora)} == {"LlamaDecoderLayer"}  # through PEFT


# ------------------------------------------------------------------ quantization and peft
@pytest.mark.parametrize("name", QUANTIZATIONS)
def test_quantization_composes_and_constructs(name, no_gpu):
    from dpo_lightning.models.quantization import bnb_config

    cfg = _cfg(f"quantization={name}", "peft=lora", "trainer.accelerator=cpu")
    validate_config(cfg)
    spec = instantiate(cfg.model, _convert_="all")
    bnb = bnb_config(spec.quantization)
    if name == "none":
        assert spec.quantization is None and bnb is None
    elif name == "bnb_4bit":
        assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
        assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    else:
        assert bnb.load_in_8bit and bnb.llm_int8_threshold == 6.0
    # the group writes model.quantization also when model=hf is chosen
    hf = compose("train", ["model=hf", "model.name_or_path=gpt2", f"quantization={name}"])
    assert (hf.model.quantization is None) == (name == "none")


@pytest.mark.parametrize("name", ["bnb_4bit", "bnb_8bit"])
def test_quantized_full_finetuning_is_refused(name, no_gpu):
    with pytest.raises(ConfigError, match="cannot be fully fine-tuned.*peft=lora"):
        validate_config(_cfg(f"quantization={name}", "trainer.accelerator=cpu"))
    validate_config(_cfg(f"quantization={name}", "trainer.accelerator=cpu"), training=False)  # dpo-eval may


def test_bitsandbytes_missing_and_sharded_quantization_are_refused(gpu, monkeypatch):
    cfg = _cfg("quantization=bnb_4bit", "peft=lora", "trainer.accelerator=gpu")
    monkeypatch.setattr(validation, "installed", lambda name: name != "bitsandbytes")
    with pytest.raises(ConfigError, match="needs bitsandbytes: pip install"):
        validate_config(cfg)
    monkeypatch.setattr(validation, "installed", lambda name: True)
    with pytest.raises(ConfigError, match="strategy=ddp"):
        validate_config(_cfg("quantization=bnb_4bit", "peft=lora", "trainer.accelerator=gpu", "strategy=fsdp"))
    with pytest.raises(ConfigError, match="quant_type"):
        validate_config(_cfg("quantization=bnb_4bit", "peft=lora", "model.quantization.quant_type=nf5"))


@pytest.mark.parametrize("name", PEFTS)
def test_peft_composes_and_constructs(name, tiny_path, no_gpu):
    from dpo_lightning import PreferenceLitModule
    from dpo_lightning.models.peft import lora_config

    cfg = _cfg(f"peft={name}", "trainer.accelerator=cpu")
    validate_config(cfg)
    peft = OmegaConf.to_container(cfg.peft) if cfg.peft else None
    module = PreferenceLitModule(str(tiny_path), loss="sigmoid", peft=peft)
    if name == "none":
        assert peft is None and module.reference.mode == "copy" and module.reference.module is not None
        return
    lc = lora_config(peft)
    assert lc.r == 16 and lc.lora_alpha == 32 and lc.target_modules == "all-linear"
    assert module.reference.mode == "adapter" and module.reference.module is None
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".")[-4] for n in trainable if n.endswith("lora_A.default.weight")}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_reference_mode_adapter_without_peft_and_reference_quantization_are_checked(no_gpu):
    with pytest.raises(ConfigError, match="peft=lora"):
        validate_config(_cfg("reference.mode=adapter"))
    with pytest.raises(ConfigError, match="reference.mode=copy"):
        validate_config(_cfg("peft=lora", "+reference.quantization.bits=4"))
    validate_config(_cfg("peft=lora", "reference.mode=copy", "+reference.quantization.bits=8"))
    with pytest.raises(ConfigError, match="peft: unknown keys"):
        validate_config(_cfg("peft=lora", "+peft.rank=4"))


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-mixed"])
def test_precision_composes_and_constructs(precision, no_gpu):
    cfg = _cfg(f"trainer.precision={precision}", "trainer.accelerator=cpu")
    assert precision in PRECISIONS
    if precision == "16-mixed":
        with pytest.raises(ConfigError, match="16-mixed needs a CUDA GPU.*bf16-mixed"):
            validate_config(cfg)
        return
    validate_config(cfg)
    trainer = instantiate(cfg.trainer, strategy=build_strategy(cfg.strategy), logger=False, callbacks=[])
    assert trainer.precision == precision


def test_precision_on_gpus(gpu, monkeypatch):
    validate_config(_cfg("trainer.precision=16-mixed", "trainer.accelerator=gpu"))
    validate_config(_cfg("trainer.precision=bf16-mixed", "trainer.accelerator=gpu", "strategy=fsdp"))
    with pytest.raises(ConfigError, match="use one of 32-true, bf16-mixed"):
        validate_config(_cfg("trainer.precision=64-true", "trainer.accelerator=gpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="no bfloat16 support.*16-mixed"):
        validate_config(_cfg("trainer.precision=bf16-mixed", "trainer.accelerator=gpu"))
    with pytest.raises(ConfigError, match="compute_dtype=bfloat16"):
        validate_config(_cfg("quantization=bnb_4bit", "peft=lora", "trainer.accelerator=gpu"))


def test_gpu_requested_without_one_is_refused(no_gpu):
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        validate_config(_cfg("trainer.accelerator=gpu"))


# ------------------------------------------------------------------ SLURM launcher
def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 1 and launcher.timeout_min == 240


# ------------------------------------------------------------------ FSDP / FSDP2 on CPU processes
SHARDED_COMMON = [
    "logger=csv", "print_config=false", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
    "trainer.gradient_clip_val=null", "scheduler=constant", "scheduler.warmup_ratio=0.0", "optimizer.lr=1e-2",
    "data.val_fraction=0.02", "trainer.deterministic=true", "callbacks=none", "trainer.val_check_interval=1000",
    "+model.tiny.tie_word_embeddings=true",  # a tied LM head (as Qwen2.5-0.5B): gathered and exported once
]


def _run_sharded(script: Path, out: Path, *overrides: str) -> dict:
    try:
        res = subprocess.run([sys.executable, str(script), *SHARDED_COMMON, f"paths.output_dir={out}", *overrides],
                             capture_output=True, text=True, timeout=300, cwd=out.parent, env=script_env())
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"sharded run did not finish in 300s (a hang?):\n{(err.stderr or b'')[-3000:]}")
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _losses(out: Path) -> dict[int, float]:
    with open(out / "csv" / "metrics.csv") as fh:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def sharded_script(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    script = SCRIPTS / "run_sharded.py"
    single = _run_sharded(script, root / "single", "trainer.devices=1", "data.batch_size=8", "trainer.max_steps=4",
                          "eval_before=true")
    return script, root / "single", single


@pytest.mark.parametrize("name,atol_w", [("fsdp", 1e-4), ("fsdp2", 5e-4)])
@pytest.mark.distributed
@pytest.mark.subprocess
def test_sharded_strategy_on_cpu_matches_one_process(name, atol_w, sharded_script, tmp_path):
    """2 CPU processes (gloo), decoder layers sharded and checkpointed, frozen reference sharded too: the loss
    of every step and the gathered export equal one process with the same global batch. FSDP1 keeps the
    chunked LM head (its root unit is gathered for the whole step); FSDP2 switches to the model's forward."""
    script, single_dir, single = sharded_script
    res = _run_sharded(script, tmp_path / name, f"strategy={name}", "trainer.devices=2", "data.batch_size=4",
                       "trainer.max_steps=4", "eval_before=true")
    assert res["strategy"] == {"fsdp": "FSDPStrategy", "fsdp2": "ModelParallelStrategy"}[name]
    assert res["full_logits"] == (name == "fsdp2")
    assert res["steps"] == single["steps"] == 4
    one, two = _losses(single_dir), _losses(tmp_path / name)
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), (one, two)
    assert res["val"] == pytest.approx(single["val"], abs=1e-4)
    w1, w2 = _weights(single_dir), _weights(tmp_path / name)
    assert w1.keys() == w2.keys()
    for k in w1:
        diff = (w2[k] - w1[k]).abs().max().item()
        assert diff <= atol_w, f"{k}: {name} and one process differ by {diff}"


@pytest.mark.distributed
@pytest.mark.subprocess
def test_fsdp_sharded_checkpoint_resumes_exactly_without_the_reference(sharded_script, tmp_path):
    """Sharded checkpoints leave the frozen reference out; resuming loads the rest and matches a straight run."""
    script, _, _ = sharded_script
    ck = ["strategy=fsdp", "trainer.devices=2", "data.batch_size=4", "callbacks=default", "eval_before=false",
          "~callbacks.progress_bar", "~callbacks.throughput"]
    # the straight run saves its step-3 checkpoint at the validation of step 3; the resumed run starts from it
    _run_sharded(script, tmp_path / "c", *ck, "trainer.max_steps=5", "trainer.val_check_interval=3")
    at_3 = tmp_path / "c" / "checkpoints" / "best-step3.ckpt"
    assert at_3.is_dir()  # sharded: one file per rank
    _run_sharded(script, tmp_path / "b", *ck, "trainer.max_steps=5", f"+ckpt_path={at_3}")
    wb, wc = _weights(tmp_path / "b"), _weights(tmp_path / "c")
    for k in wc:
        diff = (wb[k] - wc[k]).abs().max().item()
        assert diff <= 1e-5, f"{k}: resumed and straight runs differ by {diff}"


@pytest.mark.distributed
@pytest.mark.subprocess
def test_fsdp_with_lora_matches_one_process(sharded_script, tmp_path):
    """LoRA under FSDP: mixed frozen/trainable units, the reference = the sharded policy with adapters
    disabled; losses and the gathered adapter export equal one process."""
    from safetensors.torch import load_file

    script, _, _ = sharded_script
    lora = ["peft=lora", "peft.dropout=0.0", "trainer.max_steps=3", "eval_before=true"]
    _run_sharded(script, tmp_path / "single", *lora, "trainer.devices=1", "data.batch_size=8")
    _run_sharded(script, tmp_path / "fsdp", *lora, "strategy=fsdp", "trainer.devices=2", "data.batch_size=4")
    one, two = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp")
    assert sorted(one) == sorted(two) == [0, 1, 2]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), (one, two)
    a1 = load_file(str(tmp_path / "single" / "export" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "fsdp" / "export" / "adapter_model.safetensors"))
    assert a1.keys() == a2.keys() and all("lora_" in k for k in a1)
    for k in a1:
        assert (a1[k] - a2[k]).abs().max().item() <= 1e-4, k
