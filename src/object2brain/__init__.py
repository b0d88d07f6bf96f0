"""object2brain: alignment of valence-appraising CNNs with human behaviour and fMRI.

The Python API mirrors the command line::

    import object2brain as o2b
    stimuli = o2b.load_stimuli("stimuli.csv")
    model = o2b.load_model("resnet18", weights="default")
    o2b.list_layers(model)
    o2b.extract(model, stimuli, layers="all", out="acts.h5")
    o2b.rsa(["acts.h5"], brain="brain.yaml", ratings="ratings.csv", out="rsa")
    o2b.lesion("acts.h5", "dissect/filter_objects.csv", brain="brain.yaml", out="lesion")
"""

from __future__ import annotations

from object2brain._version import __version__
from object2brain.activations.store import ActivationStore
from object2brain.api.dissect import dissect
from object2brain.api.extract import extract
from object2brain.data.images import load_image
from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.errors import Object2BrainError
from object2brain.heads.train import train_head
from object2brain.lesion.analysis import run_lesion as lesion
from object2brain.models.layers import list_layers
from object2brain.models.zoo import LoadedModel, list_models, load_model
from object2brain.pipeline.run import run_study
from object2brain.rsa.align import run_alignment as rsa
from object2brain.simulate import simulate

__all__ = [
    "ActivationStore",
    "LoadedModel",
    "Object2BrainError",
    "StimulusSet",
    "__version__",
    "dissect",
    "extract",
    "lesion",
    "list_layers",
    "list_models",
    "load_image",
    "load_model",
    "load_stimuli",
    "rsa",
    "run_study",
    "simulate",
    "train_head",
]
