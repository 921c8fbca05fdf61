"""The curvature engine: diagonal Fisher and K-FAC estimates that every hf_fisher method uses."""

from hf_fisher.curvature.collect import TargetLayer, find_target_layers
from hf_fisher.curvature.diagonal import DiagonalFisher, estimate_diagonal_fisher
from hf_fisher.curvature.kfac import KFACFactors, KFACLayer, estimate_kfac
from hf_fisher.curvature.online import OnlineDiagonalFisher
from hf_fisher.curvature.rank_one import RankOneFisher, estimate_rank_one_fisher
from hf_fisher.curvature.store import CurvatureMetadata

__all__ = [
    "CurvatureMetadata",
    "DiagonalFisher",
    "KFACFactors",
    "KFACLayer",
    "OnlineDiagonalFisher",
    "RankOneFisher",
    "TargetLayer",
    "estimate_diagonal_fisher",
    "estimate_kfac",
    "estimate_rank_one_fisher",
    "find_target_layers",
]
