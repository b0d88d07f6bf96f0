"""EmoCAM++: per-filter Grad-CAM on the valence output x object detections (DESIGN.md section 4).

- :mod:`.filtercam`: all K per-filter Grad-CAM maps of a layer from one forward + one backward;
- :mod:`.detectors`: OpenCV, torchvision COCO detectors and given boxes behind one interface;
- :mod:`.groups`: YAML maps from detector classes to object groups;
- :mod:`.dissect`: box importance, enrichment, assignment -> the ``filter_objects`` table.

The entry point is :func:`object2brain.explain.dissect.dissect` (exported as ``o2b.dissect``);
it is deliberately not re-exported here, where the name would shadow the submodule ``dissect``.
"""

from __future__ import annotations

from object2brain.explain.dissect import DissectResult, box_importance
from object2brain.explain.filtercam import FilterCAMs, filter_cams

__all__ = ["DissectResult", "FilterCAMs", "box_importance", "filter_cams"]
