"""A study from one YAML file: the config (:mod:`.config`) and the cached run (:mod:`.run`)."""
