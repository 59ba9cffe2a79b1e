"""Evaluation of frozen features (k-NN, linear probe) and fine-tuning."""

from mimco.eval.features import extract_features
from mimco.eval.knn import knn_accuracy, knn_predict
from mimco.eval.linear import linear_probe
from mimco.eval.probe import ProbeResult, probe_backbone

__all__ = ["ProbeResult", "extract_features", "knn_accuracy", "knn_predict", "linear_probe", "probe_backbone"]
