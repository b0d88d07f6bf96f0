"""EmoCAM++: per-filter Grad-CAM on the valence output x object detections.

- :mod:`.filtercam`: all K per-filter Grad-CAM maps of a layer from one forward + one backward;
- :mod:`.detectors`: OpenCV, torchvision COCO detectors and given boxes behind one interface;
- :mod:`.groups`: YAML maps from detector classes to object groups;
- :mod:`.dissect`: box importance, enrichment, assignment -> the ``filter_objects`` table
  (:func:`~.dissect.compute_dissection`, :func:`~.dissect.write_dissection`).

The entry point with loading, figures and files is :func:`object2brain.api.dissect.dissect`
(exported as ``o2b.dissect``).
"""

from __future__ import annotations

from object2brain.explain.dissect import DissectResult, box_importance
from object2brain.explain.filtercam import FilterCAMs, filter_cams

__all__ = ["DissectResult", "FilterCAMs", "box_importance", "filter_cams"]
