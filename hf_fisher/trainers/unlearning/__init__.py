"""LLM unlearning: forget/retain data pairing, the standard objectives and :class:`UnlearningTrainer`."""

from hf_fisher.trainers.unlearning.data import ForgetRetainCollator, ForgetRetainDataset
from hf_fisher.trainers.unlearning.gu import GUProjector, project_update
from hf_fisher.trainers.unlearning.kfade import (
    KFADEArguments,
    KFADEOptimizer,
    KFADETrainer,
    apply_unlearning_update,
    load_unlearning_update,
    save_unlearning_update,
)
from hf_fisher.trainers.unlearning.losses import (
    NPO,
    UNLEARNING_LOSSES,
    GradAscent,
    GradDiff,
    SimNPO,
    UnlearningLoss,
    build_unlearning_loss,
)
from hf_fisher.trainers.unlearning.ssd import selective_synaptic_dampening
from hf_fisher.trainers.unlearning.trainer import UnlearningArguments, UnlearningTrainer

__all__ = [
    "KFADEArguments",
    "KFADEOptimizer",
    "KFADETrainer",
    "NPO",
    "UNLEARNING_LOSSES",
    "ForgetRetainCollator",
    "ForgetRetainDataset",
    "GUProjector",
    "GradAscent",
    "GradDiff",
    "SimNPO",
    "UnlearningArguments",
    "UnlearningLoss",
    "UnlearningTrainer",
    "apply_unlearning_update",
    "build_unlearning_loss",
    "load_unlearning_update",
    "project_update",
    "save_unlearning_update",
    "selective_synaptic_dampening",
]
