#!/usr/bin/env bash
# GPU smoke checks for the scale-out paths, on one CUDA machine, in a few minutes, offline:
#
#   1. bf16     full-weight DPO, bf16-mixed, policy + frozen copy reference        (strategy=auto)
#   2. qlora    4-bit NF4 base + LoRA, adapter-disabled reference, merged export   (quantization=bnb_4bit peft=lora)
#   3. fsdp     FSDP on 1 GPU: decoder layers wrapped + checkpointed, full export  (strategy=fsdp)
#   4. fsdp2    FSDP2 (ModelParallelStrategy) on 1 GPU                             (strategy=fsdp2)
#   5. zero2    DeepSpeed ZeRO-2, 6. zero3 DeepSpeed ZeRO-3   (if deepspeed is or can be installed; else SKIP)
#
# Every check is a real `python -m dpo_lightning.train` run on the built-in tiny Llama widened to a
# Qwen2.5-0.5B-like shape (~0.36B parameters; no hub access needed) and prints one line:
#   PASS|FAIL|SKIP <name>  peak=<GiB allocated>  steps=<n>  loss=<last>  <what was checked>  (<seconds>s)
# On a failure the end of that run's log is printed. Exit status: 0 if nothing failed, 1 otherwise.
#
#   bash scripts/gpu_check.sh                 # all checks
#   SMALL=1 bash scripts/gpu_check.sh         # the 100k-parameter tiny model instead (seconds)
#   CHECKS="bf16 fsdp" bash scripts/gpu_check.sh
#   ACCELERATOR=cpu SMALL=1 CHECKS="bf16 qlora" bash scripts/gpu_check.sh   # the script's own plumbing, on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
CHECKS=${CHECKS:-"bf16 qlora fsdp fsdp2 zero2 zero3"}
STEPS=${STEPS:-3}
ACCELERATOR=${ACCELERATOR:-gpu}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dpo-gpu-check.XXXXXX")
export DPO_LIGHTNING_CACHE=${DPO_LIGHTNING_CACHE:-$WORK/cache}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
FAILED=0

say() { printf '%s\n' "$*"; }
die() { say "FAIL setup  $*"; say "gpu_check: FAILED (setup)"; exit 1; }

# ---------------------------------------------------------------- preconditions: loud, not silent skips
"$PY" -c "import dpo_lightning" 2>/dev/null || {
  say "dpo_lightning is not importable with $PY; trying: $PY -m pip install -e ."
  "$PY" -m pip install -q -e . || die "cannot install the package (offline?): install it, or set PYTHON=/path/to/python"
}
[[ "$ACCELERATOR" == cpu ]] || "$PY" - <<'EOF' || die "no usable CUDA GPU for PyTorch (see the lines above)"
import sys, torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, available {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}, "
      f"{torch.cuda.device_count()} device(s)")
import bitsandbytes, lightning, peft, transformers
print(f"lightning {lightning.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"bitsandbytes {bitsandbytes.__version__}")
EOF
[[ "$ACCELERATOR" == cpu ]] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# ---------------------------------------------------------------- model shape
if [[ -n "${SMALL:-}" ]]; then
  MODEL=()
else  # Qwen2.5-0.5B's shape (vocabulary: the tiny tokenizer's)
  MODEL=("+model.tiny.hidden_size=896" "+model.tiny.intermediate_size=4864" "+model.tiny.num_hidden_layers=24"
         "+model.tiny.num_attention_heads=14" "+model.tiny.num_key_value_heads=2")
fi

# A callback (imported by the run from $WORK/cb) that reports peak memory and what changed, as one JSON line.
mkdir -p "$WORK/cb"
cat > "$WORK/cb/gpu_check_cb.py" <<'EOF'
import json, math
import lightning as L
import torch


def _local(p):
    if getattr(p, "ds_tensor", None) is not None:  # DeepSpeed ZeRO-3: this rank's partition
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor: this rank's shard


def _checksum(params):
    params = list(params)
    return float(sum(_local(p).detach().float().sum().item() for p in params)) if params else None


class GpuCheck(L.Callback):
    def on_train_start(self, trainer, module):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.policy0 = _checksum(p for p in module.policy.parameters() if p.requires_grad)
        self.frozen0 = _checksum(p for p in module.policy.parameters() if not p.requires_grad)
        self.ref0 = _checksum(module.reference.parameters()) if module.reference is not None else None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss = float(loss.detach().float().item()) if loss is not None else float("nan")

    def on_train_end(self, trainer, module):
        policy1 = _checksum(p for p in module.policy.parameters() if p.requires_grad)
        frozen1 = _checksum(p for p in module.policy.parameters() if not p.requires_grad)
        ref1 = _checksum(module.reference.parameters()) if module.reference is not None else None
        out = {
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
            "steps": trainer.global_step,
            "loss": getattr(self, "loss", float("nan")),
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "reference_mode": module.reference_mode,
            "full_logits": bool(module.full_logits),
            "policy_changed": policy1 != self.policy0,
            "frozen_unchanged": frozen1 == self.frozen0,
            "reference_unchanged": (ref1 == self.ref0) if self.ref0 is not None else None,
        }
        if trainer.is_global_zero:
            print("GPUCHECK " + json.dumps(out), flush=True)
EOF

COMMON=(
  "logger=csv" "callbacks=none" "print_config=false" "eval_before=true"
  "+callbacks.gpu_check._target_=gpu_check_cb.GpuCheck"
  "trainer.accelerator=$ACCELERATOR" "trainer.devices=1" "trainer.max_steps=$STEPS" "trainer.log_every_n_steps=1"
  "trainer.val_check_interval=1000" "data.val_fraction=0.02" "data.batch_size=8" "optimizer.lr=1e-5"
)

# run_check NAME EXPECT_EXPORT_FILE OVERRIDES...
run_check() {
  local name=$1 expect=$2; shift 2
  local out="$WORK/$name" log="$WORK/$name.log" start end line verdict detail
  start=$(date +%s)
  PYTHONPATH="$WORK/cb${PYTHONPATH:+:$PYTHONPATH}" timeout "${CHECK_TIMEOUT:-420}" \
    "$PY" -m dpo_lightning.train "${COMMON[@]}" ${MODEL[@]+"${MODEL[@]}"} "paths.output_dir=$out" "$@" >"$log" 2>&1
  local rc=$?
  end=$(date +%s)
  line=$(grep -a '^GPUCHECK ' "$log" | tail -1 | sed 's/^GPUCHECK //')
  detail=$("$PY" - "$line" "$rc" "$out/export/$expect" "$STEPS" <<'EOF'
import json, math, os, sys
line, rc, export, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
problems = []
if rc != 0:
    problems.append(f"exit status {rc}" + (" (timeout)" if rc == 124 else ""))
r = json.loads(line) if line else {}
if not r:
    problems.append("no GPUCHECK line (the run did not finish training)")
else:
    if r["steps"] != steps:
        problems.append(f"steps {r['steps']} != {steps}")
    if not math.isfinite(r["loss"]):
        problems.append(f"loss {r['loss']}")
    if not r["policy_changed"]:
        problems.append("trainable weights did not change")
    if r["frozen_unchanged"] is False:
        problems.append("frozen (base) weights changed")
    if r["reference_unchanged"] is False:
        problems.append("the reference changed")
if not os.path.exists(export):
    problems.append(f"no export file {os.path.basename(export)}")
desc = (f"peak={r.get('peak_gib', float('nan')):.2f}GiB steps={r.get('steps')} loss={r.get('loss', float('nan')):.4f} "
        f"{r.get('strategy')} {r.get('precision')} ref={r.get('reference_mode')} full_logits={r.get('full_logits')}")
print(("FAIL " if problems else "PASS ") + desc + ("  problems: " + "; ".join(problems) if problems else ""))
EOF
)
  verdict=${detail%% *}
  say "$verdict $name  ${detail#* }  ($((end - start))s)"
  if [[ "$verdict" != "PASS" ]]; then
    FAILED=1
    say "---- last 40 lines of $log"
    tail -n 40 "$log"
    say "----"
  fi
}

want() { [[ " $CHECKS " == *" $1 "* ]]; }

say "gpu_check: work folder $WORK"
want bf16 && run_check bf16 model.safetensors "trainer.precision=bf16-mixed"
want qlora && run_check qlora model.safetensors "quantization=bnb_4bit" "peft=lora" "trainer.precision=bf16-mixed" \
  "optimizer.lr=1e-4" "export_merged=true"
want fsdp && run_check fsdp model.safetensors "strategy=fsdp" "trainer.precision=bf16-mixed"
want fsdp2 && run_check fsdp2 model.safetensors "strategy=fsdp2" "trainer.precision=bf16-mixed"

if want zero2 || want zero3; then
  if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    say "deepspeed is not installed; trying: $PY -m pip install deepspeed"
    timeout 300 "$PY" -m pip install -q deepspeed >"$WORK/deepspeed-install.log" 2>&1 \
      || say "(pip install deepspeed failed: $(tail -n 1 "$WORK/deepspeed-install.log"))"
  fi
  if "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    want zero2 && run_check zero2 model.safetensors "strategy=deepspeed_zero2" "trainer.precision=bf16-mixed"
    want zero3 && run_check zero3 model.safetensors "strategy=deepspeed_zero3" "trainer.precision=bf16-mixed"
  else
    want zero2 && say "SKIP zero2  deepspeed could not be installed (offline?); see $WORK/deepspeed-install.log"
    want zero3 && say "SKIP zero3  deepspeed could not be installed (offline?)"
  fi
fi

if [[ $FAILED -ne 0 ]]; then
  say "gpu_check: FAILED (logs in $WORK)"
  exit 1
fi
say "gpu_check: all checks passed (logs in $WORK)"
