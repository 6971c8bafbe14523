"""Component roles: the registry (registry.py, no torch) and one module per role family (tracing, torch inside functions)."""
