"""Evaluation of frozen features (k-NN, linear probe, the registered protocols) and fine-tuning."""

from mimco.eval.features import extract_features
from mimco.eval.knn import knn_accuracy, knn_predict
from mimco.eval.linear import linear_probe

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "linear_probe"]
