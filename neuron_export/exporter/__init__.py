"""Turning a diffusers pipeline into an export: config -> source -> plan -> build (workers) -> layout."""
