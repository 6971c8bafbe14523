"""Flux's diffusion transformer: (hidden_states, encoder_hidden_states, pooled_projections, timestep[, guidance],
image_rotary_emb) -> `out_hidden_states`, the packed velocity prediction.

The rotary embedding is an input, computed on the host from the text and image position ids ([S + N,
sum(axes_dims_rope), 2]: cosines then sines, no batch dimension), as optimum-neuron traces it. optimum-neuron builds
it through neuronx-distributed's ModelBuilder with tensor parallelism, its weights beside the module in
`weights/tp{rank}_sharded_checkpoint.safetensors` for every rank (the backend writes them; Role.sharded). On Neuron, ModelBuilder builds `parallel_transformer` on each rank (diffusers' transformer with its
attention and feed-forward layers swapped for neuronx-distributed's parallel layers, roles/parallel.py) and cuts
`parallel_checkpoint` (the weights under that module's names) for each rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.roles import t5
from neuron_export.roles.registry import role_of
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
        traced={
            "tensor_parallel_size": shapes.tensor_parallel_size,
            # the reference compiles it with LOCAL_WORLD_SIZE set (the role's local_world_size)
            **(
                {"local_world_size": shapes.tensor_parallel_size}
                if role_of(name, facts.architecture).local_world_size
                else {}
            ),
        },
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

        def parallel_module(self) -> Any:
            return wrap(parallel_transformer(self.model), spec)

        def parallel_checkpoint(self) -> dict[str, Any]:
            return parallel_checkpoint(dict(self.state_dict()), self.model, prefix="model.")

    return FluxTransformerForTrace().eval()


def _split_attention(attention: Any, what: str) -> None:
    from neuron_export.roles import parallel

    attention.heads = parallel.per_rank(attention.heads, f"{what}'s attention heads")
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        if getattr(attention, name, None) is not None:
            setattr(attention, name, parallel.column(getattr(attention, name)))
    if getattr(attention, "to_out", None) is not None:
        attention.to_out[0] = parallel.row(attention.to_out[0])
    if getattr(attention, "to_add_out", None) is not None:
        attention.to_add_out = parallel.row(attention.to_add_out)


def _split_feed_forward(feed_forward: Any) -> None:
    from neuron_export.roles import parallel

    feed_forward.net[0].proj = parallel.column(feed_forward.net[0].proj)
    feed_forward.net[2] = parallel.row(feed_forward.net[2])


def single_block_projection(linear: Any, attention_width: int) -> Any:
    """A single block's proj_out for one rank. Its input is the concatenation [attention | MLP], and on a rank
    that is [this rank's heads | this rank's MLP slice]: not a contiguous slice of proj_out's input features, so
    one row-parallel layer would pair the wrong columns. Two row-parallel layers, one over each half (the bias
    once), summed: W_attn a + W_mlp m + b, which is proj_out of the whole concatenation."""
    import torch

    from neuron_export.roles import parallel

    class SplitProjection(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_width = parallel.per_rank(attention_width, "a single block's attention width")
            self.attn = parallel.row(linear, in_features=attention_width)
            self.mlp = parallel.row(linear, bias=False, in_features=linear.in_features - attention_width)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            attention, mlp = hidden_states.split(
                [self.attention_width, hidden_states.shape[-1] - self.attention_width], dim=-1
            )
            return self.attn(attention) + self.mlp(mlp)

    return SplitProjection()


def split_transformer(model: Any) -> None:
    """Swap a Flux transformer's attention and feed-forward layers for neuronx-distributed's parallel layers, in
    place: q, k, v (and the text stream's) split by heads, the output projections row-parallel; feed-forward
    first linear split by width, last row-parallel; a single block's MLP in split by width, its proj_out as
    single_block_projection. Embedders, norms and the final projection stay whole."""
    from neuron_export.roles import parallel

    for index, block in enumerate(model.transformer_blocks):
        _split_attention(block.attn, f"transformer block {index}")
        _split_feed_forward(block.ff)
        _split_feed_forward(block.ff_context)
    for index, block in enumerate(model.single_transformer_blocks):
        attention_width = block.attn.heads * block.attn.head_dim
        _split_attention(block.attn, f"single transformer block {index}")
        parallel.per_rank(block.proj_mlp.out_features, f"single transformer block {index}'s MLP width")
        block.proj_mlp = parallel.column(block.proj_mlp)
        block.proj_out = single_block_projection(block.proj_out, attention_width)


def parallel_transformer(model: Any) -> Any:
    """The Flux transformer one rank runs (roles/parallel.py)."""
    from neuron_export.roles import parallel

    return parallel.rebuild(model, split_transformer)


def parallel_checkpoint(state: dict[str, Any], model: Any, prefix: str = "") -> dict[str, Any]:
    """The model's state dict under the parallel module's names: each single block's proj_out weight cut at the
    attention width into `proj_out.attn` (with the bias) and `proj_out.mlp`; everything else as it is."""
    state = dict(state)
    for index, block in enumerate(model.single_transformer_blocks):
        name = f"{prefix}single_transformer_blocks.{index}.proj_out"
        width = block.attn.heads * block.attn.head_dim
        weight = state.pop(f"{name}.weight")
        state[f"{name}.attn.weight"] = weight[:, :width].contiguous()
        state[f"{name}.mlp.weight"] = weight[:, width:].contiguous()
        state[f"{name}.attn.bias"] = state.pop(f"{name}.bias")
    return state


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    return [_call(model, spec, inputs)]
