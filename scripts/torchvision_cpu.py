"""Make torchvision importable beside the CPU build of torch 2.13 in a test or benchmark environment.

The only torchvision for torch 2.13 on the package index (0.28.0) is built for CUDA: its compiled operators do not
load beside the CPU torch, and ``import torchvision`` then fails in ``torchvision/_autograd_registrations`` /
``_meta_registrations`` (they register kernels for operators that do not exist). transformers needs only
torchvision's pure-Python transforms (the processors of Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, SmolVLM, Mistral 3,
...), so this script installs the wheel with ``--no-deps`` into a folder of its own inside the environment and adds
a ``.pth`` hook that, only when the compiled operators are missing, replaces those two registration modules with
empty ones. A user's machine does not need this: torchvision comes matched to their torch (``pip install
dpo-lightning[vision]``).

    python scripts/torchvision_cpu.py            # into the running interpreter's environment
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

VERSION = "0.28.0"
HOOK = '''"""Installed by dpo_lightning's scripts/torchvision_cpu.py: empty kernel registrations for a torchvision whose
compiled operators do not load beside this torch (a CUDA wheel beside the CPU torch)."""
import importlib.abc
import importlib.machinery
import sys
import types

_SKIP = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in _SKIP:
            return None
        ext = sys.modules.get("torchvision.extension")
        if ext is None or ext._has_ops():
            return None  # a matched torchvision: its own modules
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
'''


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    folder = Path(sys.prefix) / "torchvision-cpu-shim"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target",
                    str(folder), f"torchvision=={VERSION}"], check=True)
    (folder / "torchvision_cpu_hook.py").write_text(HOOK)
    (site / "torchvision_cpu_shim.pth").write_text(f"{folder}\nimport torchvision_cpu_hook\n")
    probe = "import torchvision.transforms.v2.functional as F; print('torchvision', __import__('torchvision').__version__)"
    subprocess.run([sys.executable, "-c", probe], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
