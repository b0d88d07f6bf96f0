"""Valence heads: a one-unit linear layer in place of a frozen backbone's output layer.

- :mod:`.io`: head files (``head.safetensors`` + ``head.json``): save, load, attach to a model;
- :mod:`.loss`: level weights and the weighted MSE;
- :mod:`.features`: the penultimate features (backbone on demand, or an activation store);
- :mod:`.fit`: fitting a head, predictions, cross-fitted predictions, metrics;
- :mod:`.train`: resolve the inputs and compute the heads of a run (pure);
- :mod:`.write`: the run's files and manifest.

The public entry point is :func:`object2brain.api.train_head.train_head`. Nothing is imported
here, so that :mod:`object2brain.models.zoo` can read head files through :mod:`.io` without
importing the training code.
"""
