"""A study from one YAML file: the config (:mod:`.config`), the registry of stages with their
cache keys (:mod:`.stages`) and the cached run (:mod:`.run`)."""
