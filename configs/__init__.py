"""Experiment configs (ml_collections ``get_config()``, each with a ``:tiny`` variant) and the
task factories they name (``configs.tasks``)."""
