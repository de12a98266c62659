"""FLUX.1 family: FLUX.1-dev, FLUX.1-schnell and Flex.1/Flex.2 (FluxPipeline checkpoints).

CLIP gives the pooled vector, T5 the token sequence; AutoencoderKL latents are normalised with
`(z - shift) * scale` and packed 2x2 into 64-channel tokens with 3-axis position ids.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from fluxtune.models.families.common import (
    CheckpointParts,
    SamplingDefaults,
    block_regex,
    read_component_config,
    weights_fingerprint,
)

_ATTN_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
# Single blocks have no attention output layer: `proj_out` projects attention and MLP together.
_ATTN_SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_out"]
_MLP_DOUBLE = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
_MLP_SINGLE = ["proj_mlp"]
_MODULATION_DOUBLE = ["norm1.linear", "norm1_context.linear"]
_MODULATION_SINGLE = ["norm.linear"]

# Top-level modules a quantized transformer keeps in full precision (fluxtune.models.quantize): the
# embedders and the output modulation. Not the final `proj_out` (3072 -> 64, 0.2M weights): diffusers
# matches skip names at any depth, and the single blocks' `proj_out` (1.8B weights in all) would
# stay unquantized with it.
KEEP_UNQUANTIZED = ("x_embedder", "context_embedder", "time_text_embed", "norm_out")
# Only T5 is worth quantizing (4.7B); see fluxtune.models.quantize for why CLIP is not.
QUANTIZABLE_TEXT_ENCODERS = ("text_encoder_2",)

PRESETS = {
    "attention": block_regex(_ATTN_DOUBLE, _ATTN_SINGLE),
    "attention+mlp": block_regex(_ATTN_DOUBLE + _MLP_DOUBLE, _ATTN_SINGLE + _MLP_SINGLE),
    "all-linear": block_regex(_ATTN_DOUBLE + _MLP_DOUBLE + _MODULATION_DOUBLE, _ATTN_SINGLE + _MLP_SINGLE + _MODULATION_SINGLE),
}


class _TimestepTextEmbedOnly(torch.nn.Module):
    """Flex checkpoints train with the guidance embedder bypassed: timestep + pooled text only."""

    def __init__(self, embed: torch.nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, timestep, pooled_projection):
        e = self.embed
        t_emb = e.timestep_embedder(e.time_proj(timestep).to(dtype=pooled_projection.dtype))
        return t_emb + e.text_embedder(pooled_projection)


class Flux1:
    name = "flux1"
    pipeline_cls = FluxPipeline

    def __init__(self, path, revision=None, *, bypass_guidance=False, max_sequence_length=None, dtype=torch.float32,
                 quantize="none", quantize_text_encoders="none"):
        self.path, self.revision = path, revision
        tcfg = read_component_config(path, "transformer", revision)
        self.bypass_guidance = bypass_guidance
        self.has_guidance = bool(tcfg.get("guidance_embeds", False)) and not bypass_guidance
        self.default_guidance = 1.0
        # FLUX.1-dev was trained on 512 T5 tokens, schnell (no guidance embedder) on 256.
        self.max_sequence_length = max_sequence_length or (512 if tcfg.get("guidance_embeds") else 256)
        self.parts = CheckpointParts(
            FluxPipeline, FluxTransformer2DModel, path, revision, dtype,
            quantize=quantize, keep_unquantized=KEEP_UNQUANTIZED,
            quantize_text_encoders=quantize_text_encoders, quantizable_text_encoders=QUANTIZABLE_TEXT_ENCODERS,
        )

    def identity(self, part: str) -> dict:
        base = {"family": self.name, "path": self.path, "revision": self.revision}
        if part == "latents":
            return base | {"weights": weights_fingerprint(self.path, ("vae",))}
        return base | {"max_sequence_length": self.max_sequence_length,
                       "weights": weights_fingerprint(self.path, ("text_encoder", "text_encoder_2")),
                       **self.parts.text_identity()}

    def encode_prompts(self, captions, device):
        pipe = self.parts.text_pipe(device)
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=captions, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
            )
        return [{"prompt_embeds": e.cpu(), "pooled_prompt_embeds": p.cpu()} for e, p in zip(embeds, pooled)]

    def encode_images(self, pixels, device):
        vae = self.parts.vae(device)
        with torch.no_grad():
            z = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
        shift = vae.config.shift_factor or 0.0
        return ((z - shift) * vae.config.scaling_factor).cpu()

    def free_encoders(self):
        self.parts.free()

    def load_transformer(self, dtype):
        model = self.parts.transformer(dtype)
        if self.bypass_guidance and model.config.guidance_embeds:
            model.time_text_embed = _TimestepTextEmbedOnly(model.time_text_embed)
        return model

    def lora_targets(self, preset):
        return PRESETS[preset]

    def pack(self, latents):
        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    def predict(self, transformer, latents, noisy_tokens, sigmas, text, guidance):
        b, _, h, w = latents.shape
        dtype, device = noisy_tokens.dtype, noisy_tokens.device
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        prompt_embeds = text["prompt_embeds"]
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        g = torch.full((b,), guidance, device=device, dtype=dtype) if self.has_guidance else None
        return transformer(
            hidden_states=noisy_tokens,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=text["pooled_prompt_embeds"],
            timestep=sigmas.to(dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            return_dict=False,
        )[0]

    def load_pipeline(self, dtype, **components):
        return self.parts.pipeline(dtype, **components)

    def sampling_pipeline(self, transformer, dtype):
        return self.parts.pipeline_without_text_encoders(transformer, dtype)

    def sample_kwargs(self, embeds, negative, device) -> dict:
        return {"prompt_embeds": embeds["prompt_embeds"][None].to(device),
                "pooled_prompt_embeds": embeds["pooled_prompt_embeds"][None].to(device)}

    def pipeline_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def sampling_defaults(self) -> SamplingDefaults:
        """The guidance embedder tells dev (guidance-distilled; Flex counts as this kind) from schnell."""
        if self.has_guidance:
            return SamplingDefaults("FLUX.1-dev", "FluxPipeline, transformer has a guidance embedder", 28, 3.5, cfg=False)
        return SamplingDefaults("FLUX.1-schnell", "FluxPipeline, transformer has no guidance embedder", 4, None, cfg=False)
