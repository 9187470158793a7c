"""A CSV logger that continues the metrics file of the run it resumes.

    ContinuingCSVLogger(save_dir, name="csv", version="")                   # a fresh run: Lightning's CSVLogger
    ContinuingCSVLogger(save_dir, name="csv", version="", resume_step=12)   # resumed: rows before step 12 kept

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when its writer starts, so a resumed run loses
the interrupted run's rows; a writer that merely kept the file would start with no known columns, rewrite the
header with the new rows' columns only, and stop on the old rows ("dict contains fields not in fieldnames").
Here the writer keeps the rows logged before ``resume_step`` (later ones are the interrupted run's, redone by
the resumed run), takes the columns from the file's header, and appends.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from dpo_lightning.files.atomic import atomic_write_text


class ContinuingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps the rows of an existing ``metrics.csv`` logged before ``resume_step``."""

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self.resume_step = int(resume_step)
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's: warn and delete the metrics file
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if _step(r) < self.resume_step]
        self.metrics_keys = fields  # the writer appends with these columns; new ones rewrite the header
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        if "://" in str(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "w", newline="") as fh:
                fh.write(out.getvalue())
        else:
            atomic_write_text(self.metrics_file_path, out.getvalue())


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class ContinuingCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``; with ``resume_step`` (a resumed run) the existing ``metrics.csv`` continues:
    rows before that step stay, the resumed run's rows follow."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.resume_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingExperimentWriter(self.log_dir, self.resume_step)
        return super().experiment
