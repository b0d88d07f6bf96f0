"""Valence heads: head files (:mod:`.io`) and their training on frozen backbones (:mod:`.train`).

Nothing is imported here, so that :mod:`object2brain.models.zoo` can read head files through
:mod:`.io` without importing the training code.
"""
