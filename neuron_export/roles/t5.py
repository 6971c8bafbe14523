"""T5 encoders (PixArt-α/-Σ's `text_encoder`, Flux's `text_encoder_2`): `input_ids` -> `last_hidden_state`.

optimum-neuron traces them through neuronx-distributed's ModelBuilder with the weights outside the NEFF, in
`weights/tp{rank}_sharded_checkpoint.safetensors` beside the module (the backend writes them; Role.sharded).
Above tensor parallelism 1 the Neuron backend has ModelBuilder build `parallel_encoder` on each rank:
the same encoder with q/k/v, the relative position bias and the feed-forward's first linears split by heads /
width and the output projections row-parallel (neuronx-distributed's parallel layers, roles/parallel.py).

The attention mask: optimum-neuron's loader never passes one to a `t5-encoder` (its text-encoder part drops it),
so a mask input would make the export unloadable there, and the reference runs the encoder unmasked, which drifts
from diffusers (PixArt's pipelines mask the padding). Where the pipeline masks (PixArt), our traced module takes
`input_ids` alone, as the loader calls it, and computes the mask inside from the padding id: the outputs equal
diffusers'. Flux's pipeline runs its T5 unmasked, so its encoder is traced unmasked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.roles.spec import ComponentSpec, Shapes, TensorSpec

if TYPE_CHECKING:
    from neuron_export.planning.source import ModelFacts

MODEL_TYPE = "t5-encoder"
DEFAULT_SEQUENCE_LENGTH = 120  # PixArt-α's max_sequence_length, used when the tokenizer states no limit


def sequence_length(facts: ModelFacts, shapes: Shapes) -> int:
    """--sequence-length, else the tokenizer's model_max_length (as optimum-neuron's exporter decides)."""
    return shapes.sequence_length or facts.tokenizer_max_length or DEFAULT_SEQUENCE_LENGTH


def describe(name: str, facts: ModelFacts, shapes: Shapes) -> ComponentSpec:
    config = facts.text_encoder if name == "text_encoder" else facts.text_encoder_2
    assert config is not None, name
    batch, length = shapes.batch_size, sequence_length(facts, shapes)
    # PixArt's pipelines pad to max_sequence_length and pass the padding mask
    traced = {"padding_mask_id": int(config.get("pad_token_id", 0) or 0)} if facts.is_pixart else {}
    return ComponentSpec(
        name=name,
        model_type=MODEL_TYPE,
        task="feature-extraction",
        inputs=(TensorSpec("input_ids", (batch, length), "int64", high=int(config["vocab_size"])),),
        outputs=("last_hidden_state",),
        static_shapes={"batch_size": batch, "sequence_length": length},
        traced=traced
        if shapes.tensor_parallel_size == 1
        else {**traced, "tensor_parallel_size": shapes.tensor_parallel_size},
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(folder).eval()


def _encode(model: Any, spec: ComponentSpec, input_ids: Any) -> Any:
    pad = spec.traced.get("padding_mask_id")
    mask = None if pad is None else (input_ids != pad).long()
    return model(input_ids=input_ids, attention_mask=mask, return_dict=True).last_hidden_state


def wrap(model: Any, spec: ComponentSpec) -> Any:
    """`input_ids` -> a one-item tuple (the last hidden state). `parallel_module()` builds what one rank of a
    tensor-parallel ModelBuilder trace runs, `parallel_checkpoint()` the weights under that module's names."""
    import torch

    class T5EncoderForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple:
            return (_encode(self.model, spec, input_ids),)

        def parallel_module(self) -> Any:
            return wrap(parallel_encoder(self.model), spec)

        def parallel_checkpoint(self) -> dict[str, Any]:
            return dict(self.state_dict())

    return T5EncoderForTrace().eval()


def split_encoder(encoder: Any) -> None:
    """Swap a T5 encoder's attention and feed-forward layers for neuronx-distributed's parallel layers, in place.
    Attention: q, k, v split by heads (each rank computes its heads), the relative position bias by heads too,
    the output projection row-parallel (the heads' contributions summed over the ranks). Feed-forward: wi (or
    wi_0 and wi_1, gated) split by width, wo row-parallel."""
    from neuron_export.roles import parallel

    for index, block in enumerate(encoder.encoder.block):
        attention, feed_forward = block.layer[0].SelfAttention, block.layer[1].DenseReluDense
        heads = parallel.per_rank(attention.n_heads, f"T5 block {index}'s attention heads")
        for name in ("q", "k", "v"):
            setattr(attention, name, parallel.column(getattr(attention, name)))
        attention.o = parallel.row(attention.o)
        attention.n_heads, attention.inner_dim = heads, heads * attention.key_value_proj_dim
        if attention.has_relative_attention_bias:
            attention.relative_attention_bias = parallel.head_embedding(attention.relative_attention_bias)
        for name in ("wi", "wi_0", "wi_1"):
            if hasattr(feed_forward, name):
                parallel.per_rank(getattr(feed_forward, name).out_features, f"T5 block {index}'s d_ff")
                setattr(feed_forward, name, parallel.column(getattr(feed_forward, name)))
        feed_forward.wo = parallel.row(feed_forward.wo)


def parallel_encoder(model: Any) -> Any:
    """The T5 encoder one rank runs (roles/parallel.py): the model's names, its split layers sized for the rank."""
    from neuron_export.roles import parallel

    return parallel.rebuild(model, split_encoder)


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    """The eager encoder called as the pipeline calls it: with the padding mask where the pipeline gives one."""
    return [_encode(model, spec, inputs[0])]
