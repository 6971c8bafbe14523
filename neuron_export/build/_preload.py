"""Imported once by the worker fork server, so each component's worker starts with torch already loaded."""

import os
import signal
import traceback

# Ctrl-C reaches the whole process group: the fork server ignores it (as multiprocessing does once this import is
# done), so an interrupt during these seconds of imports prints no traceback; the exporter decides what it means.
signal.signal(signal.SIGINT, signal.SIG_IGN)

from neuron_export.build.lifetime import die_with_parent  # noqa: E402

# First: workers hold the fork server's "exporter alive" pipe open, so without this it outlives a killed exporter.
die_with_parent()
# Each worker too, from its first instruction: a worker stopped or killed before worker_main runs must not survive.
os.register_at_fork(after_in_child=die_with_parent)

# An import that fails here is kept, and each worker reports it (worker.preload_failure): left to multiprocessing,
# an ImportError would be swallowed and anything else would kill the fork server, which the exporter only sees
# as a lost connection.
failure: tuple[str, str, str] | None = None  # (the library, "Type: message", the traceback)
library = "torch"
try:
    import torch  # noqa: F401

    library = "diffusers"
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401

    library = "transformers"
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    library = "neuron_export"
    import neuron_export.build.worker  # noqa: F401
    from neuron_export.roles import text_encoder, unet, vae  # noqa: F401
except BaseException as exc:
    failure = (library, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}", traceback.format_exc())
