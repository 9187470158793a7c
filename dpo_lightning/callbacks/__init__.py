"""Lightning callbacks shipped with dpo_lightning."""

from dpo_lightning.callbacks.checkpoint import PreferenceCheckpoint, selection_metric
from dpo_lightning.callbacks.curves import TrainingCurves
from dpo_lightning.callbacks.generation import GenerationEvaluation
from dpo_lightning.callbacks.preemption import Preempted, PreemptionCheckpoint
from dpo_lightning.callbacks.progress import StepProgressBar
from dpo_lightning.callbacks.throughput import ThroughputMonitor

__all__ = ["GenerationEvaluation", "PreemptionCheckpoint", "Preempted", "PreferenceCheckpoint", "StepProgressBar",
           "ThroughputMonitor",
           "TrainingCurves", "selection_metric"]
