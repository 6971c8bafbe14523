"""Imported once by the worker fork server, so each component's worker starts with torch already loaded."""

import torch  # noqa: F401
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

import neuron_export.build  # noqa: F401
from neuron_export.components import text_encoder, unet, vae  # noqa: F401
