"""object2brain: alignment of valence-appraising CNNs with human behaviour and fMRI.

The Python API mirrors the command line::

    import object2brain as o2b
    stimuli = o2b.load_stimuli("stimuli.csv")
    model = o2b.load_model("resnet18", weights="default")
    o2b.list_layers(model)
    o2b.extract(model, stimuli, layers="all", out="acts.h5")
"""

from __future__ import annotations

from object2brain._version import __version__
from object2brain.data.images import load_image
from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.errors import Object2BrainError
from object2brain.extract import extract
from object2brain.models.layers import list_layers
from object2brain.models.zoo import LoadedModel, list_models, load_model
from object2brain.store import ActivationStore

__all__ = [
    "ActivationStore",
    "LoadedModel",
    "Object2BrainError",
    "StimulusSet",
    "__version__",
    "extract",
    "list_layers",
    "list_models",
    "load_image",
    "load_model",
    "load_stimuli",
]
