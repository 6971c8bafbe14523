"""Run a finished export: load its artifacts into the matching diffusers pipeline and generate images.

reading (manifest, backend, required files) -> defaults and requests (checked against the compiled shapes
before anything loads) -> loading (artifacts behind the adapters in the diffusers pipeline) -> generation.
Nothing is imported here, and nothing heavy until a pipeline is loaded.
"""
