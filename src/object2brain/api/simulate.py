"""The edge of the stage behind ``o2b.simulate``: open the store, compute the simulated data in
memory (:func:`object2brain.simulate.compute_simulation`), write it
(:func:`object2brain.simulate.write_simulation`). The stage draws no figures, so the whole edge is
:func:`object2brain.simulate.simulate`, re-exported here."""

from __future__ import annotations

from object2brain.simulate import simulate

__all__ = ["simulate"]
