"""Activations: the HDF5 activation store (:mod:`.store`), extraction into it (:mod:`.extract`)
and sparse random projections (:mod:`.projection`)."""
