"""FLUX.2 family: FLUX.2-dev (Flux2Pipeline, Mistral3 text encoder, guidance embedded) and
FLUX.2-klein 4B/9B (Flux2KleinPipeline, Qwen3 text encoder, no guidance embedder).

The prompt embedding is the concatenation of a few hidden layers of the text encoder; AutoencoderKLFlux2
latents are patchified 2x2 to 128 channels, normalised with the VAE's batch-norm statistics and
flattened to tokens with 4-axis (t, h, w, l) position ids.
"""

from __future__ import annotations

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

from fluxtune.models.families.common import (
    CheckpointParts,
    ModelError,
    SamplingDefaults,
    block_regex,
    read_component_config,
    read_model_index,
    weights_fingerprint,
)

# Layers of the text encoder used by the official pipelines (10/20/30 of Mistral-Small's 40,
# 9/18/27 of Qwen3's 36): a quarter, half and three quarters of the depth.
DEFAULT_OUT_LAYERS = {"Flux2Pipeline": (10, 20, 30), "Flux2KleinPipeline": (9, 18, 27)}

_ATTN_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
# Single blocks fuse q, k, v and the MLP input into one projection, and attention-out with MLP-out:
# training their attention means training these two. (A bare "to_out" would also hit the double
# blocks' ModuleList, which peft rejects, hence regexes.)
_ATTN_SINGLE = ["attn.to_qkv_mlp_proj", "attn.to_out"]
_MLP_DOUBLE = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]

# Top-level modules a quantized transformer keeps in full precision (fluxtune.models.quantize): the
# embedders, the modulation shared by all blocks and the output layers.
KEEP_UNQUANTIZED = ("x_embedder", "context_embedder", "time_guidance_embed", "double_stream_modulation_img",
                    "double_stream_modulation_txt", "single_stream_modulation", "norm_out", "proj_out")
QUANTIZABLE_TEXT_ENCODERS = ("text_encoder",)  # Mistral3 (dev) or Qwen3 (klein)

PRESETS = {
    "attention": block_regex(_ATTN_DOUBLE, _ATTN_SINGLE),
    "attention+mlp": block_regex(_ATTN_DOUBLE + _MLP_DOUBLE, _ATTN_SINGLE),
    # FLUX.2 modulation layers are shared outside the blocks, so the blocks hold no other Linear.
    "all-linear": block_regex(_ATTN_DOUBLE + _MLP_DOUBLE, _ATTN_SINGLE),
}


def resolve_out_layers(pipeline_name: str, text_cfg: dict, joint_attention_dim: int, requested) -> tuple[int, ...]:
    """Check or choose the text-encoder layers whose hidden states form the prompt embedding."""
    depth, hidden = text_cfg["num_hidden_layers"], text_cfg["hidden_size"]
    n, rest = divmod(joint_attention_dim, hidden)
    if rest:
        raise ModelError(
            f"transformer joint_attention_dim {joint_attention_dim} is not a multiple of the text encoder's "
            f"hidden size {hidden}: this text encoder does not belong to this transformer"
        )
    if n > depth + 1:  # hidden_states holds the embeddings plus one entry per layer
        raise ModelError(
            f"the transformer expects {n} stacked text-encoder layers but the text encoder has only {depth}: "
            "this text encoder does not belong to this transformer"
        )
    if requested is not None:
        layers = tuple(requested)
        if len(layers) != n or max(layers) > depth or min(layers) < 0:
            raise ModelError(
                f"model.text_encoder_out_layers={list(layers)} does not fit this checkpoint: the transformer "
                f"expects {n} layers of a {depth}-layer text encoder (indices 0..{depth})"
            )
        return layers
    default = DEFAULT_OUT_LAYERS[pipeline_name]
    if len(default) == n and max(default) <= depth:
        return default
    # A shallower encoder than the official ones (tests, distilled encoders): its last n layers.
    return tuple(range(depth - n + 1, depth + 1))


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config", cfg)  # Mistral3 nests the language model's config


class Flux2:
    name = "flux2"

    def __init__(self, path, revision=None, *, text_encoder_out_layers=None, max_sequence_length=None, dtype=torch.float32,
                 quantize="none", quantize_text_encoders="none"):
        self.path, self.revision = path, revision
        pipeline_name = read_model_index(path, revision)["_class_name"]
        tcfg = read_component_config(path, "transformer", revision)
        self.has_guidance = bool(tcfg.get("guidance_embeds", True))
        if pipeline_name not in DEFAULT_OUT_LAYERS:
            # model.family forced on a checkpoint of another pipeline class: guidance tells dev from klein.
            pipeline_name = "Flux2Pipeline" if self.has_guidance else "Flux2KleinPipeline"
        self.pipeline_cls = Flux2Pipeline if pipeline_name == "Flux2Pipeline" else Flux2KleinPipeline
        self.default_guidance = 4.0
        self.max_sequence_length = max_sequence_length or 512
        text_cfg = _text_config(read_component_config(path, "text_encoder", revision))
        self.out_layers = resolve_out_layers(pipeline_name, text_cfg, tcfg["joint_attention_dim"], text_encoder_out_layers)
        self.parts = CheckpointParts(
            self.pipeline_cls, Flux2Transformer2DModel, path, revision, dtype,
            quantize=quantize, keep_unquantized=KEEP_UNQUANTIZED,
            quantize_text_encoders=quantize_text_encoders, quantizable_text_encoders=QUANTIZABLE_TEXT_ENCODERS,
        )

    def identity(self, part: str) -> dict:
        base = {"family": self.name, "pipeline": self.pipeline_cls.__name__, "path": self.path,
                "revision": self.revision}
        if part == "latents":
            return base | {"weights": weights_fingerprint(self.path, ("vae",))}
        return base | {"out_layers": list(self.out_layers), "max_sequence_length": self.max_sequence_length,
                       "weights": weights_fingerprint(self.path, ("text_encoder",)), **self.parts.text_identity()}

    def encode_prompts(self, captions, device):
        pipe = self.parts.text_pipe(device)
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(
                prompt=captions, device=device, max_sequence_length=self.max_sequence_length,
                text_encoder_out_layers=self.out_layers,
            )
        return [{"prompt_embeds": e.cpu()} for e in embeds]

    def encode_images(self, pixels, device):
        vae = self.parts.vae(device)
        with torch.no_grad():
            z = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
            z = self.pipeline_cls._patchify_latents(z)
            mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z)
        return ((z - mean) / std).cpu()

    def free_encoders(self):
        self.parts.free()

    def load_transformer(self, dtype):
        return self.parts.transformer(dtype)

    def lora_targets(self, preset):
        return PRESETS[preset]

    def pack(self, latents):
        return self.pipeline_cls._pack_latents(latents)

    def predict(self, transformer, latents, noisy_tokens, sigmas, text, guidance):
        dtype, device = noisy_tokens.dtype, noisy_tokens.device
        prompt_embeds = text["prompt_embeds"]
        # The transformer reads ids of the first sample only: every sample in a batch has one size.
        img_ids = self.pipeline_cls._prepare_latent_ids(latents).to(device)
        txt_ids = self.pipeline_cls._prepare_text_ids(prompt_embeds).to(device)
        g = torch.full((latents.shape[0],), guidance, device=device, dtype=dtype) if self.has_guidance else None
        return transformer(
            hidden_states=noisy_tokens,
            encoder_hidden_states=prompt_embeds,
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
        kwargs = {"prompt_embeds": embeds["prompt_embeds"][None].to(device)}
        if self.pipeline_cls is Flux2KleinPipeline:  # base klein runs real CFG against the empty prompt
            kwargs["negative_prompt_embeds"] = negative["prompt_embeds"][None].to(device)
        return kwargs

    def pipeline_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length, "text_encoder_out_layers": self.out_layers}

    def sampling_defaults(self) -> SamplingDefaults:
        """klein's `is_distilled` in model_index.json (what Flux2KleinPipeline reads) tells the
        step-distilled checkpoints, whose CFG is baked in, from the base ones."""
        if self.pipeline_cls is Flux2Pipeline:
            return SamplingDefaults("FLUX.2-dev", "Flux2Pipeline", 50, 4.0, cfg=False)
        if read_model_index(self.path, self.revision).get("is_distilled", False):
            return SamplingDefaults("FLUX.2-klein distilled", "Flux2KleinPipeline, is_distilled true", 4, 1.0, cfg=False)
        return SamplingDefaults("FLUX.2-klein base", "Flux2KleinPipeline, is_distilled false", 50, 4.0, cfg=True)
