"""Flux's diffusion transformer: (hidden_states, encoder_hidden_states, pooled_projections, timestep[, guidance],
image_rotary_emb) -> `out_hidden_states`, the packed velocity prediction.

The rotary embedding is an input, computed on the host from the text and image position ids ([S + N,
sum(axes_dims_rope), 2]: cosines then sines, no batch dimension), as optimum-neuron traces it. optimum-neuron builds
it through neuronx-distributed's ModelBuilder with tensor parallelism, its weights beside the module in
`weights/tp{rank}_sharded_checkpoint.safetensors` for every rank; `write_weights` writes those shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.roles import t5
from neuron_export.roles.spec import ComponentSpec, Shapes, TensorSpec

if TYPE_CHECKING:
    from neuron_export.planning.source import ModelFacts

MODEL_TYPE = "flux-transformer-2d"


def describe(name: str, facts: ModelFacts, shapes: Shapes) -> ComponentSpec:
    config = facts.transformer
    assert config is not None and facts.text_encoder is not None, name
    batch, scale = shapes.image_batch, facts.vae_scale_factor
    latent_h, latent_w = shapes.height // scale, shapes.width // scale
    tokens = (latent_h // 2) * (latent_w // 2)  # latents are packed 2x2 into tokens
    channels = int(config.get("in_channels", 64))
    length = t5.sequence_length(facts, shapes)
    axes = sum(int(a) for a in config.get("axes_dims_rope", (16, 56, 56)))
    guidance = bool(config.get("guidance_embeds", False))
    inputs = (
        TensorSpec("hidden_states", (batch, tokens, channels)),
        TensorSpec("encoder_hidden_states", (batch, length, int(config.get("joint_attention_dim", 4096)))),
        TensorSpec("pooled_projections", (batch, int(config.get("pooled_projection_dim", 768)))),
        TensorSpec("timestep", (batch,)),
        *((TensorSpec("guidance", (batch,)),) if guidance else ()),
        TensorSpec("image_rotary_emb", (length + tokens, axes, 2)),
    )
    return ComponentSpec(
        name=name,
        model_type=MODEL_TYPE,
        task="semantic-segmentation",
        inputs=inputs,
        outputs=("out_hidden_states",),
        static_shapes={
            "batch_size": batch,
            "sequence_length": length,
            "num_channels": channels,
            "height": latent_h,
            "width": latent_w,
            "vae_scale_factor": scale,
            # optimum-neuron records the CLIP encoder's hidden size here (its exporter reads text_encoder's)
            "encoder_hidden_size": int(facts.text_encoder["hidden_size"]),
            "rotary_axes_dim": axes,
        },
        traced={"tensor_parallel_size": shapes.tensor_parallel_size},
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder).eval()


def _call(model: Any, spec: ComponentSpec, inputs: list[Any] | tuple[Any, ...]) -> Any:
    """The transformer on the contract's inputs: its own position embedder stood in for by the given rotary
    embedding (the ids it would read are placeholders of the right length)."""
    import torch

    named = dict(zip((t.name for t in spec.inputs), inputs, strict=True))
    rotary = named["image_rotary_emb"]
    tokens = named["hidden_states"].shape[1]
    length = rotary.shape[0] - tokens

    def given(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary[..., 0], rotary[..., 1]

    model.pos_embed.forward = given  # this call only: the instance attribute shadows the class's forward
    try:
        return model(
            hidden_states=named["hidden_states"],
            encoder_hidden_states=named["encoder_hidden_states"],
            pooled_projections=named["pooled_projections"],
            timestep=named["timestep"],
            guidance=named.get("guidance"),
            txt_ids=torch.zeros(length, 3),
            img_ids=torch.zeros(tokens, 3),
            return_dict=False,
        )[0]
    finally:
        del model.pos_embed.forward


def wrap(model: Any, spec: ComponentSpec) -> Any:
    """The contract's positional inputs -> a one-item tuple."""
    import torch

    class FluxTransformerForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> tuple:
            return (_call(self.model, spec, inputs),)

    return FluxTransformerForTrace().eval()


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    return [_call(model, spec, inputs)]


def write_weights(model: Any, spec: ComponentSpec, directory: Path) -> list[str]:
    return t5.write_weights(model, spec, directory)
