"""Materialize ``builtin:tiny-vlm`` and load it through ``load_causal_lm`` / ``load_tokenizer`` with torchvision
unimportable (as on a machine without the ``vision`` extra), then run a forward on a generated image.
Usage: tiny_vlm_without_torchvision.py (the cache is $DPO_LIGHTNING_CACHE). Prints, as its last line, a JSON
object: the processor's and image processor's classes, the image token count, whether the logits are finite."""

import importlib.util
import json
import os
import sys

# Hide torchvision where it lives in a folder of its own (scripts/torchvision_cpu.py installs it so): its folder
# leaves sys.path, so neither transformers nor torchmetrics finds the package or its metadata. Installed beside
# torch it cannot be hidden that way: the script says so and the test skips.
found = importlib.util.find_spec("torchvision")
if found is not None:
    own = os.path.dirname(os.path.dirname(found.origin or ""))
    if own == os.path.dirname(os.path.dirname(importlib.util.find_spec("torch").origin or "")):
        print(json.dumps({"skip": f"torchvision is installed beside torch in {own}"}))
        sys.exit(0)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p) != own]

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from dpo_lightning.models.hf import ModelSpec, load_causal_lm, load_tokenizer  # noqa: E402

spec = ModelSpec("builtin:tiny-vlm")
model, processor = load_causal_lm(spec), load_tokenizer(spec)
image = Image.new("RGB", (40, 40), "white")
ImageDraw.Draw(image).rectangle([8, 8, 32, 32], fill="blue")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the square ?"}]}]
batch = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)], images=[image],
                  return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
print(json.dumps({"processor": type(processor).__name__, "image_processor": type(processor.image_processor).__name__,
                  "image_tokens": int((batch["input_ids"] == model.config.image_token_id).sum()),
                  "finite": bool(torch.isfinite(logits).all()), "torchvision": "torchvision" in sys.modules}))
