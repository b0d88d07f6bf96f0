"""object2brain: alignment of valence-appraising CNNs with human behaviour and fMRI.

The Python API mirrors the command line::

    import object2brain as o2b
    stimuli = o2b.load_stimuli("stimuli.csv")
    model = o2b.load_model("resnet18", weights="default")
    o2b.list_layers(model)
    o2b.extract(model, stimuli, layers="all", out="acts.h5")
    o2b.rsa(["acts.h5"], brain="brain.yaml", ratings="ratings.csv", out="rsa")
    o2b.encode(["acts.h5"], brain="brain.yaml", out="encode")
    o2b.lesion("acts.h5", "dissect/filter_objects.csv", brain="brain.yaml", out="lesion")

The names are imported on first use (a module-level ``__getattr__``), so ``import object2brain``
imports neither torch nor numpy: each stage function comes from its module of
:mod:`object2brain.api`.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from object2brain._version import __version__ as __version__
    from object2brain.activations.store import ActivationStore as ActivationStore
    from object2brain.api.dissect import dissect as dissect
    from object2brain.api.encode import encode as encode
    from object2brain.api.extract import extract as extract
    from object2brain.api.lesion import lesion as lesion
    from object2brain.api.rdms import export_rsatoolbox as export_rsatoolbox
    from object2brain.api.rdms import load_rdms as load_rdms
    from object2brain.api.rdms import to_rsatoolbox as to_rsatoolbox
    from object2brain.api.rsa import rsa as rsa
    from object2brain.api.simulate import simulate as simulate
    from object2brain.api.train_head import train_head as train_head
    from object2brain.data.images import load_image as load_image
    from object2brain.data.stimuli import StimulusSet as StimulusSet
    from object2brain.data.stimuli import load_stimuli as load_stimuli
    from object2brain.errors import Object2BrainError as Object2BrainError
    from object2brain.models.layers import list_layers as list_layers
    from object2brain.models.zoo import LoadedModel as LoadedModel
    from object2brain.models.zoo import list_models as list_models
    from object2brain.models.zoo import load_model as load_model
    from object2brain.pipeline.run import run_study as run_study

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "__version__": "object2brain._version",
    "ActivationStore": "object2brain.activations.store",
    "LoadedModel": "object2brain.models.zoo",
    "Object2BrainError": "object2brain.errors",
    "StimulusSet": "object2brain.data.stimuli",
    "dissect": "object2brain.api.dissect",
    "encode": "object2brain.api.encode",
    "extract": "object2brain.api.extract",
    "lesion": "object2brain.api.lesion",
    "list_layers": "object2brain.models.layers",
    "list_models": "object2brain.models.zoo",
    "load_image": "object2brain.data.images",
    "load_model": "object2brain.models.zoo",
    "load_stimuli": "object2brain.data.stimuli",
    "rsa": "object2brain.api.rsa",
    "run_study": "object2brain.pipeline.run",
    "simulate": "object2brain.api.simulate",
    "train_head": "object2brain.api.train_head",
    "to_rsatoolbox": "object2brain.api.rdms",
    "export_rsatoolbox": "object2brain.api.rdms",
    "load_rdms": "object2brain.api.rdms",
}

__all__ = sorted(_EXPORTS)


#: API functions named like a subpackage (``o2b.rsa`` vs ``object2brain.rsa``): importing the
#: subpackage must not replace the function in the package namespace.
_SHADOWED = frozenset({"lesion", "rsa", "simulate"})


class _Package(types.ModuleType):
    """The package module: the import system binds each imported submodule as an attribute of
    its package, except the subpackages named like an API function (still in ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    """Import a public name on first use and keep it in the package namespace."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'object2brain' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
