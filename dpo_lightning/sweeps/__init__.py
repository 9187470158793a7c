"""Sweeps as a workflow: one W&B run per job, failures recorded, a report with plots, results in pandas.

    dpo-train -m loss=sigmoid,ipo loss.beta=0.1,0.5     # writes <sweep>/sweep_report.{csv,md} and sweep_*.png
    dpo-sweep-report <sweep folder>                     # rebuild the report (a running or interrupted sweep too)
    from dpo_lightning.sweeps import load               # load(<sweep folder>) -> pandas DataFrame, one row per job
"""

from dpo_lightning.sweeps.report import load, write_report

__all__ = ["load", "write_report"]
