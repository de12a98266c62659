"""Model families: everything that differs between FLUX.1 and FLUX.2 lives behind `Family`.

    family = load_family("black-forest-labs/FLUX.1-dev")         # detected from model_index.json
    family = load_family("./tiny-klein", family="flux2", text_encoder_out_layers=(1, 2, 3))

The trainer picks a family once, here, and never asks which one it has.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fluxtune.models.families.common import ModelError, read_model_index

# `_class_name` in model_index.json -> family name
PIPELINE_FAMILIES = {
    "FluxPipeline": "flux1",
    "FluxImg2ImgPipeline": "flux1",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2",
}


class Family(Protocol):
    name: str  # "flux1" | "flux2"
    pipeline_cls: type  # the diffusers pipeline that loads the checkpoint and our LoRA
    path: str
    has_guidance: bool  # whether the transformer consumes a guidance value
    default_guidance: float  # value fed to it during training when the config says none

    def identity(self, part: str) -> dict:
        """What makes this model's cached "latents" or "text" unique (part of their cache keys):
        changing the text settings must not re-encode latents, and the reverse."""

    def encode_prompts(self, captions: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        """One dict of per-sample text tensors (no batch dim) per caption; loads encoders on first use."""

    def encode_images(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> normalised latents (B,C,h,w) ready to pack."""

    def free_encoders(self) -> None:
        """Drop the text encoders and the VAE (the cache holds what they produced)."""

    def load_transformer(self, dtype: torch.dtype) -> torch.nn.Module: ...

    def lora_targets(self, preset: str) -> str:
        """A peft target regex for "attention", "attention+mlp" or "all-linear"."""

    def predict(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        noisy_tokens: torch.Tensor,
        sigmas: torch.Tensor,
        text: dict[str, torch.Tensor],
        guidance: float | None,
    ) -> torch.Tensor:
        """Velocity prediction for packed noisy tokens of `latents`' shape."""

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B,C,h,w) -> transformer tokens (B,L,D)."""

    def load_pipeline(self, dtype: torch.dtype, **components): ...

    def sampling_pipeline(self, transformer: torch.nn.Module, dtype: torch.dtype):
        """The family's pipeline around a live transformer, without text encoders."""

    def sample_kwargs(self, embeds: dict, negative: dict, device) -> dict:
        """Pipeline arguments for one prompt's cached embeddings (and the empty prompt's, for CFG)."""

    def pipeline_kwargs(self) -> dict:
        """Arguments the family's pipeline call needs to match training (sequence length, text layers)."""

    def sampling_defaults(self):
        """Steps, guidance and CFG the checkpoint is meant to be sampled with, read from its
        configs rather than its name (local folders and fine-tunes have any name)."""


def detect_family(path: str, revision: str | None = None) -> str:
    index = read_model_index(path, revision)
    cls = index.get("_class_name")
    if cls not in PIPELINE_FAMILIES:
        known = ", ".join(sorted(PIPELINE_FAMILIES))
        raise ModelError(
            f"{path}: model_index.json names pipeline {cls!r}, which fluxtune does not train. "
            f"Known pipelines: {known}. If this is a FLUX-architecture checkpoint, set model.family."
        )
    return PIPELINE_FAMILIES[cls]


def load_family(
    path: str,
    family: str = "auto",
    revision: str | None = None,
    text_encoder_out_layers: tuple[int, ...] | None = None,
    bypass_guidance: bool = False,
    max_sequence_length: int | None = None,
    dtype: torch.dtype = torch.float32,
    quantize: str = "none",
    quantize_text_encoders: str = "none",
) -> Family:
    """Choose and build the family for a checkpoint; checks its configs, loads no weights."""
    name = detect_family(path, revision) if family == "auto" else family
    quantization = {"quantize": quantize, "quantize_text_encoders": quantize_text_encoders}
    if name == "flux1":
        from fluxtune.models.families.flux1 import Flux1

        if text_encoder_out_layers is not None:
            raise ModelError("model.text_encoder_out_layers applies to FLUX.2 only; remove it for FLUX.1")
        return Flux1(path, revision, bypass_guidance=bypass_guidance, max_sequence_length=max_sequence_length, dtype=dtype,
                     **quantization)
    if name == "flux2":
        from fluxtune.models.families.flux2 import Flux2

        if bypass_guidance:
            raise ModelError("model.bypass_guidance applies to FLUX.1/Flex checkpoints only")
        return Flux2(
            path, revision, text_encoder_out_layers=text_encoder_out_layers, max_sequence_length=max_sequence_length, dtype=dtype,
            **quantization,
        )
    raise ModelError(f"unknown model.family {name!r}; use auto, flux1 or flux2")
