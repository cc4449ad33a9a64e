"""Offline quality yardsticks for the tiny CIFAR-10 model: a shipped classifier and the metrics built on it."""

from .classifier import CifarNet, load_classifier
from .metrics import class_accuracy, feature_stats, features, frechet_distance, optional_metrics, reference_stats

__all__ = ["CifarNet", "load_classifier", "class_accuracy", "feature_stats", "features", "frechet_distance",
           "optional_metrics", "reference_stats"]
