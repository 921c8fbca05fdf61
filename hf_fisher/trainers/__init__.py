"""Trainers that make the Fisher part of training."""

from hf_fisher.trainers.fisher import FisherPenalty, FisherTrainer, FisherTrainingArguments

__all__ = ["FisherPenalty", "FisherTrainer", "FisherTrainingArguments"]
