"""Run several scripts of this folder one after the other in this one process (one interpreter start for all):
``run_in_one_process.py SCRIPT ARG... [-- SCRIPT ARG...]...``. Each runs as ``__main__`` with its own argv; the
first failure stops the rest with its traceback and a non-zero exit."""

import runpy
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
args, runs = sys.argv[1:], [[]]
for a in args:
    if a == "--":
        runs.append([])
    else:
        runs[-1].append(a)
for script, *argv in runs:
    sys.argv = [str(here / script), *argv]
    runpy.run_path(str(here / script), run_name="__main__")
    sys.stdout.flush()
