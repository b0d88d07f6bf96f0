"""Object2Brain lesions: the vectorised engine (:mod:`.engine`), the analysis over object groups
(:mod:`.analysis`) and lesions inside the forward pass (:mod:`.propagate`)."""
