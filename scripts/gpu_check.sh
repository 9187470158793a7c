#!/usr/bin/env bash
# GPU checks on one CUDA machine, in under 8 minutes, offline after install:
#
#   0. bench    scripts/benchmark.py --device cuda: bf16, the ~0.4B benchmark shape, ours / ours precomputed /
#               all-off / TRL 1.16 / TRL precomputed on the same timed batches; prints every figure of the
#               side-by-side (pairs/s, non-pad tokens/s and their ratios, the timed token counts, peak GPU
#               memory, useful-FLOP utilisation and conventional MFU against the device's bf16 peak, padding)
#   1. bf16     full-weight DPO, bf16-mixed, policy + frozen copy reference        (strategy=auto)
#   2. qlora    4-bit NF4 base + LoRA, adapter-disabled reference, merged export   (quantization=bnb_4bit peft=lora)
#   3. fsdp     FSDP on 1 GPU: decoder layers wrapped + checkpointed, full export  (strategy=fsdp)
#   4. fsdp2    FSDP2 (ModelParallelStrategy) on 1 GPU                             (strategy=fsdp2)
#   5. zero2    DeepSpeed ZeRO-2, 6. zero3 DeepSpeed ZeRO-3   (if deepspeed is or can be installed; else SKIP)
#
# TRL for the bench: $TRL_PYTHON, else this python if it has trl 1.16, else trl 1.16 pip-installed into a
# folder of the work dir (no dependency changes; fails fast when offline: then no TRL rows).
# Data for the bench: ../shared/data or $DPO_BENCH_DATA (HH-RLHF + GPT-2 tokenizer), else the built-in pairs.
# Checks 1-6 are real `python -m dpo_lightning.train` runs on the built-in tiny Llama widened to a
# Qwen2.5-0.5B-like shape (~0.36B parameters; no hub access needed) and prints one line:
#   PASS|FAIL|SKIP <name>  peak=<GiB allocated>  steps=<n>  loss=<last>  <what was checked>  (<seconds>s)
# On a failure the end of that run's log is printed. Exit status: 0 if nothing failed, 1 otherwise.
#
#   bash scripts/gpu_check.sh                 # all checks
#   SMALL=1 bash scripts/gpu_check.sh         # the 100k-parameter tiny model instead (seconds)
#   CHECKS="bench bf16" bash scripts/gpu_check.sh
#   BENCH_ARGS="--batch-size 8 --max-length 512" bash scripts/gpu_check.sh   # benchmark options
#   ACCELERATOR=cpu SMALL=1 CHECKS="bench bf16 qlora" bash scripts/gpu_check.sh   # the plumbing, on a CPU
# A check that would start after BUDGET seconds (default 420) is skipped and none runs past LIMIT (470 s):
# the script stays under 8 minutes (raise both for a slow CPU dry run).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
CHECKS=${CHECKS:-"bench bf16 qlora fsdp fsdp2 zero2 zero3"}
BUDGET=${BUDGET:-420}   # no check starts after this many seconds
LIMIT=${LIMIT:-470}     # and none runs past this many (the whole script: under 8 minutes)
T0=$(date +%s)
left() {  # seconds a command may run: min($1, what LIMIT leaves), at least 30
  local rest=$(( T0 + LIMIT - $(date +%s) ))
  (( rest < $1 )) || rest=$1
  (( rest > 30 )) && echo "$rest" || echo 30
}
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
import lightning, peft, transformers
try:
    import bitsandbytes
    bnb = bitsandbytes.__version__
except ImportError:
    bnb = "not installed (the qlora check will fail)"
print(f"lightning {lightning.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"bitsandbytes {bnb}")
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
        self.ref0 = _checksum(module.reference.parameters())  # None without a frozen model of its own

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss = float(loss.detach().float().item()) if loss is not None else float("nan")

    def on_train_end(self, trainer, module):
        policy1 = _checksum(p for p in module.policy.parameters() if p.requires_grad)
        frozen1 = _checksum(p for p in module.policy.parameters() if not p.requires_grad)
        ref1 = _checksum(module.reference.parameters())
        out = {
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
            "steps": trainer.global_step,
            "loss": getattr(self, "loss", float("nan")),
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "reference_mode": module.reference.mode.value,
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
  PYTHONPATH="$WORK/cb${PYTHONPATH:+:$PYTHONPATH}" timeout "$(left "${CHECK_TIMEOUT:-420}")" \
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

want() {  # selected, and starting within the time budget
  [[ " $CHECKS " == *" $1 "* ]] || return 1
  if (( $(date +%s) - T0 > BUDGET )); then say "SKIP $1  the time budget of ${BUDGET}s is spent"; return 1; fi
}

# ---------------------------------------------------------------- 0. the benchmark (every side-by-side figure)
trl_python() {  # prints a python with TRL 1.16, or nothing
  local probe='import sys, trl; sys.exit(0 if trl.__version__.startswith("1.16") else 1)' extra=()
  if [[ -n "${TRL_PYTHON:-}" ]]; then echo "$TRL_PYTHON"; return; fi
  if "$PY" -c "$probe" >/dev/null 2>&1; then echo "$PY"; return; fi
  # TRL into a folder of its own (no dependency changes), run by this python through a wrapper
  "$PY" -c "import accelerate" >/dev/null 2>&1 || extra=(accelerate)
  timeout "$(left 240)" "$PY" -m pip install -q --retries 0 --timeout 10 --no-deps --target "$WORK/trl-site" \
    "trl==1.16.*" "${extra[@]}" >"$WORK/trl-install.log" 2>&1 || return 0
  printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec "%s" "$@"\n' "$WORK/trl-site" "$PY" \
    >"$WORK/trl-python"
  chmod +x "$WORK/trl-python"
  "$WORK/trl-python" -c "$probe" >/dev/null 2>&1 && echo "$WORK/trl-python"
}

run_bench() {
  local start end rc trl args=()
  start=$(date +%s)
  if [[ "$ACCELERATOR" == cpu ]]; then args+=(--device cpu); else args+=(--device cuda); fi
  if [[ -n "${SMALL:-}" ]]; then args+=(--shape tiny --steps 2 --warmup 1); else args+=(--steps 20 --warmup 3); fi
  trl=$(trl_python)
  if [[ -n "$trl" ]]; then args+=(--trl-python "$trl"); else say "(bench: no python with TRL 1.16, no TRL rows)"; fi
  # shellcheck disable=SC2086  # BENCH_ARGS: word-split on purpose
  timeout "$(left "${BENCH_TIMEOUT:-360}")" "$PY" scripts/benchmark.py "${args[@]}" ${BENCH_ARGS:-} \
    >"$WORK/bench.json" 2>"$WORK/bench.log"
  rc=$?
  end=$(date +%s)
  if [[ $rc -eq 0 ]] && grep -q '^== benchmark' "$WORK/bench.log"; then
    say "PASS bench  ($((end - start))s; JSON: $WORK/bench.json)"
    sed -n '/^== benchmark/,$p' "$WORK/bench.log"
  else
    FAILED=1
    say "FAIL bench  exit status $rc$([[ $rc -eq 124 ]] && echo ' (timeout)')  ($((end - start))s)"
    say "---- last 40 lines of $WORK/bench.log"
    tail -n 40 "$WORK/bench.log"
    say "----"
  fi
}

say "gpu_check: work folder $WORK"
want bench && run_bench
want bf16 && run_check bf16 model.safetensors "trainer.precision=bf16-mixed"
want qlora && run_check qlora model.safetensors "quantization=bnb_4bit" "peft=lora" "trainer.precision=bf16-mixed" \
  "optimizer.lr=1e-4" "export_merged=true"
want fsdp && run_check fsdp model.safetensors "strategy=fsdp" "trainer.precision=bf16-mixed"
want fsdp2 && run_check fsdp2 model.safetensors "strategy=fsdp2" "trainer.precision=bf16-mixed"

if want zero2 || want zero3; then
  if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    say "deepspeed is not installed; trying: $PY -m pip install deepspeed"
    timeout "$(left 180)" "$PY" -m pip install -q --retries 0 --timeout 10 deepspeed >"$WORK/deepspeed-install.log" 2>&1 \
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
