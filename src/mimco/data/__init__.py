"""Datasets (in-memory arrays and image folders), view transforms and the training batch stream."""

from mimco.data.build import DATASETS, BatchStream, ImageArray, load_dataset
from mimco.data.files import FileImages
from mimco.data.procedural import make_shapes

__all__ = ["DATASETS", "BatchStream", "FileImages", "ImageArray", "load_dataset", "make_shapes"]
