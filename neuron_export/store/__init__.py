"""The store: the component cache, the remote cache and its trust, per-key locks, safe writes. Serves the build and the `cache` commands."""
