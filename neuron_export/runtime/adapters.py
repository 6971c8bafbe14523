"""What the diffusers pipelines see: each traced component behind a small torch.nn.Module that looks
enough like the diffusers / transformers model (config, dtype, device, output objects), calling the artifact
only at its compiled batch (a larger batch is split into chunks, a smaller one padded).

Imports torch at the top: only loading.py imports this module, inside the function that assembles a pipeline.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from diffusers.configuration_utils import FrozenDict

try:
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
except ImportError:  # diffusers < 0.27
    from diffusers.models.vae import DecoderOutput, DiagonalGaussianDistribution
try:
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
except ImportError:
    from diffusers.models.autoencoder_kl import AutoencoderKLOutput
try:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
except ImportError:
    from diffusers.models.unet_2d_condition import UNet2DConditionOutput
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPTextModelOutput


def _merge(parts: list[Any], count: int) -> Any:
    """Outputs of several chunk calls (tensors, tuples, dicts, nested) -> one output of `count` rows."""
    import torch

    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)[:count] if len(parts) > 1 or first.shape[0] != count else first
    if isinstance(first, dict):
        return {key: _merge([part[key] for part in parts], count) for key in first}
    if isinstance(first, (tuple, list)):
        return tuple(_merge([part[index] for part in parts], count) for index in range(len(first)))
    return first


def _pad_rows(tensor: Any, rows: int) -> Any:
    """`tensor` with its last row repeated until it has `rows` rows."""
    import torch

    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])], dim=0)


class StaticRunner:
    """Calls one compiled artifact only at its compiled shape, whatever batch the pipeline hands over.

    Single-device artifacts run chunk by chunk (what DataParallel over two NeuronCores does on a device);
    a data-parallel artifact gets the whole batch, padded to a multiple of the compiled batch, at once.
    """

    def __init__(
        self,
        name: str,
        module: Any,
        input_names: Sequence[str],
        input_shapes: Sequence[Sequence[int]],
        data_parallel: bool = False,
        unbatched: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.unbatched = frozenset(unbatched)  # inputs passed whole to every call (a ControlNet's conditioning_scale)
        self.module = module
        self.input_names = tuple(input_names)
        self.batch = int(input_shapes[0][0])
        self.sample_shapes = tuple(tuple(int(size) for size in shape[1:]) for shape in input_shapes)
        self.data_parallel = data_parallel
        self.calls: list[tuple[tuple[int, ...], ...]] = []  # input shapes of every artifact call, for tests and logs

    def __call__(self, *inputs: Any) -> Any:
        count = int(inputs[0].shape[0])
        for name, tensor, expected in zip(self.input_names, inputs, self.sample_shapes):
            if name in self.unbatched:
                continue
            if tensor.shape[0] != count:
                raise ValueError(f"{self.name}: input {name} has batch {tensor.shape[0]}, the other inputs {count}.")
            if tuple(tensor.shape[1:]) != expected:
                raise ValueError(
                    f"{self.name}: input {name} has per-sample shape {tuple(tensor.shape[1:])}; "
                    f"the artifact was compiled for {expected}."
                )
        if self.data_parallel:
            rows = math.ceil(count / self.batch) * self.batch
            padded = [
                tensor if name in self.unbatched else _pad_rows(tensor, rows)
                for name, tensor in zip(self.input_names, inputs)
            ]
            self.calls.append(tuple(tuple(tensor.shape) for tensor in padded))
            return _merge([self.module(*padded)], count)
        parts = []
        for start in range(0, count, self.batch):
            chunk = [
                tensor if name in self.unbatched else _pad_rows(tensor[start : start + self.batch], self.batch)
                for name, tensor in zip(self.input_names, inputs)
            ]
            self.calls.append(tuple(tuple(tensor.shape) for tensor in chunk))
            parts.append(self.module(*chunk))
        return _merge(parts, count)


# --- adapters: what the diffusers pipelines see -------------------------------------------------------

_TORCH_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class CompiledComponent(torch.nn.Module):
    """Common ground: a config read from the component's config.json, a fixed dtype and device."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        # Kept where ConfigMixin keeps it, so pipelines that patch `_internal_dict` see their change.
        self._internal_dict = FrozenDict(config)
        neuron = config.get("neuron") or {}
        self._dtype = getattr(torch, _TORCH_DTYPES.get(str(neuron.get("float_dtype", "fp32")), "float32"))

    @property
    def config(self) -> Any:
        return self._internal_dict

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # Neuron artifacts take host tensors too

    def to(self, *args: Any, **kwargs: Any) -> CompiledComponent:
        return self  # compiled artifacts have a fixed dtype and placement

    def _float(self, tensor: Any) -> Any:
        return tensor.to(self._dtype) if tensor.is_floating_point() else tensor


class CompiledTextEncoder(CompiledComponent):
    """CLIPTextModel / CLIPTextModelWithProjection: returns the transformers output object."""

    def __init__(self, name: str, runner: StaticRunner, config: dict[str, Any], outputs: Sequence[str]) -> None:
        super().__init__(config)
        self.component_name = name
        self.runner = runner
        self.output_names = tuple(outputs)

    def forward(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        **kwargs: Any,
    ) -> Any:
        if output_hidden_states and "hidden_states" not in self.output_names:
            raise ValueError(
                f"{self.component_name} was compiled without hidden states; this pipeline option "
                "(e.g. clip_skip) needs an export that returns them."
            )
        values = dict(zip(self.output_names, self.runner(input_ids.to(torch.long))))
        hidden = values.get("hidden_states")
        hidden = tuple(hidden) if hidden is not None else None
        if "text_embeds" in self.output_names:
            out = CLIPTextModelOutput(
                text_embeds=values["text_embeds"], last_hidden_state=values["last_hidden_state"], hidden_states=hidden
            )
        else:
            out = BaseModelOutputWithPooling(
                last_hidden_state=values["last_hidden_state"],
                pooler_output=values.get("pooler_output"),
                hidden_states=hidden,
            )
        return out if return_dict is not False else out.to_tuple()


class CompiledUNet(CompiledComponent):
    """UNet2DConditionModel: positional inputs in the compiled order, a [B] float32 timestep."""

    def __init__(self, runner: StaticRunner, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.runner = runner
        if config.get("addition_embed_type") == "text_time":
            # SDXL pipelines read the added-embedding width to check the time ids they build.
            width = int(config["projection_class_embeddings_input_dim"])
            self.add_embedding = _Namespace(linear_1=_Namespace(in_features=width))
        if "image_embeds" in runner.input_names:
            # diffusers asks the projection layers whether to feed image embeds or the encoder's hidden states:
            # not an ImageProjection means hidden states, which is what the compiled UNet takes.
            self.encoder_hid_proj = _Namespace(image_projection_layers=[_Namespace()])

    def forward(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any = None,
        class_labels: Any = None,
        timestep_cond: Any = None,
        attention_mask: Any = None,
        cross_attention_kwargs: Any = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        added = dict(added_cond_kwargs or {})
        if isinstance(added.get("image_embeds"), (list, tuple)):  # one tensor per IP-Adapter; exports hold one
            added["image_embeds"] = added["image_embeds"][0]
        for index, residual in enumerate(kwargs.pop("down_block_additional_residuals", None) or ()):
            added[f"down_block_additional_residuals_{index}"] = residual
        added["mid_block_additional_residual"] = kwargs.pop("mid_block_additional_residual", None)
        count = sample.shape[0]
        steps = torch.as_tensor(timestep).to(torch.float32)
        if steps.ndim == 0 or steps.numel() == 1:
            steps = steps.reshape(1).expand(count)
        named = {
            "sample": sample,
            "timestep": steps,
            "encoder_hidden_states": encoder_hidden_states,
            "timestep_cond": timestep_cond,
            **added,
        }
        given = {key for key, value in named.items() if value is not None}
        unexpected = given - set(self.runner.input_names)
        if unexpected:
            raise ValueError(
                f"unet: the pipeline passes {', '.join(sorted(unexpected))}, which the compiled UNet "
                "does not take; re-export with the pipeline that uses it."
            )
        inputs = []
        for name in self.runner.input_names:
            if named.get(name) is None:
                raise ValueError(f"unet: the pipeline passed no {name}, which the compiled UNet takes.")
            inputs.append(self._float(named[name]) if name != "timestep" else named[name])
        noise = self.runner(*inputs)[0]
        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)


class CompiledT5Encoder(CompiledComponent):
    """T5EncoderModel: `input_ids` -> its output object. The artifact takes no mask, as optimum-neuron's loader
    calls it; where the pipeline masks the padding (PixArt) the artifact computes that mask itself (roles/t5.py)."""

    def __init__(self, runner: StaticRunner, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.runner = runner

    def forward(
        self, input_ids: Any, attention_mask: Any = None, return_dict: bool | None = True, **kwargs: Any
    ) -> Any:
        (hidden,) = self.runner(input_ids.to(torch.long))
        out = BaseModelOutput(last_hidden_state=hidden)
        return out if return_dict is not False else out.to_tuple()


class CompiledPixArtTransformer(CompiledComponent):
    """PixArtTransformer2DModel: (sample, encoder_hidden_states, timestep [B] float, encoder_attention_mask int64);
    the resolution conditioning is fixed in the artifact."""

    def __init__(self, runner: StaticRunner, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.runner = runner

    def forward(
        self,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        timestep: Any = None,
        added_cond_kwargs: Any = None,
        cross_attention_kwargs: Any = None,
        attention_mask: Any = None,
        encoder_attention_mask: Any = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        count = hidden_states.shape[0]
        steps = torch.as_tensor(timestep).to(torch.float32)
        if steps.ndim == 0 or steps.numel() == 1:
            steps = steps.reshape(1).expand(count)
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.int64)
        (noise,) = self.runner(
            self._float(hidden_states),
            self._float(encoder_hidden_states),
            steps,
            encoder_attention_mask.to(torch.int64),
        )
        return Transformer2DModelOutput(sample=noise) if return_dict else (noise,)


class CompiledFluxTransformer(CompiledComponent):
    """FluxTransformer2DModel: the rotary embedding of the text and image position ids is computed here on the host
    (as optimum-neuron's runtime does) and passed with the other inputs; guidance only when the model embeds it."""

    def __init__(self, runner: StaticRunner, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.runner = runner
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed

        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(config.get("axes_dims_rope", (16, 56, 56))))
        self.guidance = "guidance" in runner.input_names

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """diffusers' cache hooks' scope (FluxPipeline enters it around each call); a compiled module caches nothing."""
        yield

    def forward(
        self,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        pooled_projections: Any = None,
        timestep: Any = None,
        img_ids: Any = None,
        txt_ids: Any = None,
        guidance: Any = None,
        joint_attention_kwargs: Any = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        count = hidden_states.shape[0]

        def per_sample(value: Any) -> Any:
            value = torch.as_tensor(value).to(torch.float32)
            return value.reshape(1).expand(count) if value.numel() == 1 else value

        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        cos, sin = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        inputs = [self._float(hidden_states), self._float(encoder_hidden_states), self._float(pooled_projections)]
        inputs.append(self._float(per_sample(timestep)))
        if self.guidance:
            inputs.append(self._float(per_sample(guidance)))
        inputs.append(self._float(torch.stack([cos, sin], dim=-1)))
        (noise,) = self.runner(*inputs)
        return Transformer2DModelOutput(sample=noise) if return_dict else (noise,)


class CompiledVae(CompiledComponent):
    """AutoencoderKL from the two halves: `encode(x).latent_dist` and `decode(z).sample`."""

    def __init__(self, encoder: StaticRunner | None, decoder: StaticRunner | None, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.encoder_runner = encoder
        self.decoder_runner = decoder

    def encode(self, x: Any, return_dict: bool = True) -> Any:
        if self.encoder_runner is None:
            raise ValueError("vae: this export has no vae_encoder; re-export it with image-to-image or inpainting.")
        parameters = self.encoder_runner(self._float(x))["latent_parameters"]
        distribution = DiagonalGaussianDistribution(parameters)
        return AutoencoderKLOutput(latent_dist=distribution) if return_dict else (distribution,)

    def decode(self, z: Any, return_dict: bool = True, generator: Any = None) -> Any:
        if self.decoder_runner is None:
            raise ValueError("vae: this export has no vae_decoder; re-export without --components.")
        image = self.decoder_runner(self._float(z))["sample"]
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(
        self, sample: Any, sample_posterior: bool = False, return_dict: bool = True, generator: Any = None
    ) -> Any:
        distribution = self.encode(sample).latent_dist
        latents = distribution.sample(generator) if sample_posterior else distribution.mode()
        return self.decode(latents, return_dict=return_dict)


class _Namespace:
    """Attribute bag (e.g. `unet.add_embedding.linear_1.in_features`)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


# --- ControlNet and IP-Adapter image encoder -----------------------------------------------------------


class _DtypeMarker(CompiledComponent):
    """diffusers reads these components' dtype from their first parameter: one empty one, of the compiled dtype."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._marker = torch.nn.Parameter(torch.empty(0, dtype=self._dtype), requires_grad=False)


class CompiledControlNet(_DtypeMarker):
    """ControlNetModel (diffusers' pipelines check the class): residuals for the UNet from a control image."""

    def __init__(self, runner: StaticRunner, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.runner = runner

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # the ControlNet pipelines accept only ControlNetModel (or a list of them)
        from diffusers import ControlNetModel

        return ControlNetModel

    def forward(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any,
        controlnet_cond: Any,
        conditioning_scale: Any = 1.0,
        class_labels: Any = None,
        timestep_cond: Any = None,
        attention_mask: Any = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        cross_attention_kwargs: Any = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> Any:
        if guess_mode:
            raise ValueError("controlnet: guess mode is not part of this export; call without guess_mode.")
        steps = torch.as_tensor(timestep).to(torch.float32)
        if steps.ndim == 0 or steps.numel() == 1:
            steps = steps.reshape(1).expand(sample.shape[0])
        named = {
            "sample": sample,
            "timestep": steps,
            "encoder_hidden_states": encoder_hidden_states,
            "controlnet_cond": controlnet_cond,
            "conditioning_scale": torch.as_tensor(conditioning_scale, dtype=torch.float32).reshape(1),
            **(added_cond_kwargs or {}),
        }
        inputs = [named[name] if name == "timestep" else self._float(named[name]) for name in self.runner.input_names]
        downs, mid = self.runner(*inputs)
        if not return_dict:
            return list(downs), mid
        try:
            from diffusers.models.controlnets.controlnet import ControlNetOutput
        except ImportError:  # diffusers < 0.31
            from diffusers.models.controlnet import ControlNetOutput

        return ControlNetOutput(down_block_res_samples=list(downs), mid_block_res_sample=mid)


class CompiledImageEncoder(_DtypeMarker):
    """CLIPVisionModelWithProjection: image embeds, last and all hidden states from the compiled encoder."""

    def __init__(self, runner: StaticRunner, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.runner = runner

    def forward(
        self,
        pixel_values: Any,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        **kwargs: Any,
    ) -> Any:
        from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

        image_embeds, last_hidden_state, hidden_states = self.runner(self._float(pixel_values))
        out = CLIPVisionModelOutput(
            image_embeds=image_embeds, last_hidden_state=last_hidden_state, hidden_states=tuple(hidden_states)
        )
        return out if return_dict is not False else out.to_tuple()


class LoadedPart(NamedTuple):
    """One loaded artifact of a pipeline slot: its component, runner, config.json and output names."""

    name: str
    runner: StaticRunner
    config: dict[str, Any]
    outputs: Sequence[str]


# Each role's adapter (Role.adapter): the loaded parts of one slot, in role order -> what the pipeline is given.
def text_encoder_slot(parts: Sequence[LoadedPart]) -> CompiledTextEncoder:
    (part,) = parts
    return CompiledTextEncoder(part.name, part.runner, part.config, part.outputs)


def t5_encoder_slot(parts: Sequence[LoadedPart]) -> CompiledT5Encoder:
    (part,) = parts
    return CompiledT5Encoder(part.runner, part.config)


def transformer_slot(parts: Sequence[LoadedPart]) -> CompiledPixArtTransformer:
    (part,) = parts
    return CompiledPixArtTransformer(part.runner, part.config)


def flux_transformer_slot(parts: Sequence[LoadedPart]) -> CompiledFluxTransformer:
    (part,) = parts
    return CompiledFluxTransformer(part.runner, part.config)


def unet_slot(parts: Sequence[LoadedPart]) -> CompiledUNet:
    (part,) = parts
    return CompiledUNet(part.runner, part.config)


def vae_slot(parts: Sequence[LoadedPart]) -> CompiledVae:
    """Both halves in one module, as diffusers expects; the config of the last half loaded (the decoder's)."""
    halves = {part.name: part.runner for part in parts}
    return CompiledVae(halves.get("vae_encoder"), halves.get("vae_decoder"), parts[-1].config)


def controlnet_slot(parts: Sequence[LoadedPart]) -> CompiledControlNet | list[CompiledControlNet]:
    """In --controlnet order; the pipeline wraps several in a MultiControlNetModel."""
    nets = [CompiledControlNet(part.runner, part.config) for part in parts]
    return nets if len(nets) > 1 else nets[0]


def image_encoder_slot(parts: Sequence[LoadedPart]) -> CompiledImageEncoder:
    (part,) = parts
    return CompiledImageEncoder(part.runner, part.config)
