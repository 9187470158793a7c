"""dpo_lightning: DPO and its family (IPO, KTO, ORPO, SimPO, CPO, ...) for PyTorch Lightning."""

from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.evaluation.generation import GenerationSettings
from dpo_lightning.losses import LOSSES, get_loss
from dpo_lightning.models.hf import ModelSpec
from dpo_lightning.reference.spec import ReferenceSpec
from dpo_lightning.training.module import PreferenceLitModule

__all__ = ["LOSSES", "GenerationSettings", "ModelSpec", "PreferenceDataModule", "PreferenceLitModule", "ReferenceSpec", "get_loss"]
__version__ = "0.1.0"
