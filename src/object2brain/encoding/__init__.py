"""Encoding models: cross-validated ridge from layer features to voxel responses.

- :mod:`~object2brain.encoding.folds`: seeded outer folds over stimuli and inner folds;
- :mod:`~object2brain.encoding.ridge`: cross-validated (banded) ridge with himalaya;
- :mod:`~object2brain.encoding.smoother`: the cross-validated ridge as precomputed maps of the
  responses (torch, CPU or CUDA), the engine of the exact ``refit`` permutation null;
- :mod:`~object2brain.encoding.scores`: r, R^2, noise ceiling, permutation test;
- :mod:`~object2brain.encoding.compute`: the tables of the ``encode`` stage.
"""

from object2brain.encoding.compute import (
    ENCODING_BAND_COLUMNS,
    ENCODING_COLUMNS,
    ENCODING_VOXEL_COLUMNS,
    EncodingResult,
    LayerFit,
    compute_encoding,
    predict_with_filters,
)

__all__ = [
    "ENCODING_BAND_COLUMNS",
    "ENCODING_COLUMNS",
    "ENCODING_VOXEL_COLUMNS",
    "EncodingResult",
    "LayerFit",
    "compute_encoding",
    "predict_with_filters",
]
