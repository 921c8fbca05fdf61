"""Trainers built on ``transformers.Trainer``."""

from hf_fisher.trainers.unlearning import UnlearningArguments, UnlearningTrainer

__all__ = ["UnlearningArguments", "UnlearningTrainer"]
