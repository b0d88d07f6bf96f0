"""The Python API of each stage, one module per stage: load the inputs (files or objects), run
the stage's pure ``compute`` step, write its tables and manifest, and have
:mod:`object2brain.report` draw its figures. ``import object2brain as o2b`` exposes these
functions lazily (``o2b.rsa``, ...).

This is the edge of the package: stage packages (``rsa``, ``lesion``, ``explain``, ...) never
import it, nor :mod:`object2brain.report`.
"""
