"""Trainers built on ``transformers.Trainer``."""

from hf_fisher.trainers.fisher import FisherPenalty, FisherTrainer, FisherTrainingArguments
from hf_fisher.trainers.unlearning import UnlearningArguments, UnlearningTrainer

__all__ = ["FisherPenalty", "FisherTrainer", "FisherTrainingArguments", "UnlearningArguments", "UnlearningTrainer"]
