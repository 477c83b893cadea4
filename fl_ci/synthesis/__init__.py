"""Class Impression synthesis: shared class means, BN-statistics matching, images."""

from fl_ci.synthesis.bn_stats import BNStatsRecorder, bn_matching_loss
from fl_ci.synthesis.impressions import (
    Impressions,
    SynthesisError,
    SynthesisReport,
    feature_mean_gap,
    image_l2,
    lr_at,
    synthesize,
    total_variation,
)
from fl_ci.synthesis.means import ClassMeans, MissingMeanError

__all__ = [
    "BNStatsRecorder",
    "ClassMeans",
    "Impressions",
    "MissingMeanError",
    "SynthesisError",
    "SynthesisReport",
    "bn_matching_loss",
    "feature_mean_gap",
    "image_l2",
    "lr_at",
    "synthesize",
    "total_variation",
]
