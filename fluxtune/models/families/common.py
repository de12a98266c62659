"""Loading pieces of a diffusers checkpoint (local folder or hub id), shared by the families."""

from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch


from fluxtune.errors import ModelError  # noqa: F401  (re-exported for the families)
from fluxtune.models.quantize import (
    text_encoder_load_kwargs,
    transformer_load_kwargs,
    unpackable_transformer_linears,
    warn_unpackable,
)


def _fetch_json(path: str, filename: str, revision: str | None) -> dict:
    local = Path(path)
    if local.is_dir():
        file = local / filename
        if not file.is_file():
            raise ModelError(f"{file}: not found; model.path must be a diffusers pipeline folder (save_pretrained)")
    elif local.exists():
        raise ModelError(f"{path}: is a file; model.path must be a diffusers pipeline folder or a hub id")
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(path, filename, revision=revision))
        except Exception as e:  # hub errors come in many classes; all mean "cannot get it"
            raise ModelError(
                f"{path}: not a local folder, and {filename} could not be fetched from the hub "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the path, "
                "your network, `huggingface-cli login` for gated models, or HF_HUB_OFFLINE."
            ) from None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelError(f"{file}: not valid JSON ({e})") from None


def read_model_index(path: str, revision: str | None = None) -> dict:
    return _fetch_json(path, "model_index.json", revision)


def read_component_config(path: str, subfolder: str, revision: str | None = None) -> dict:
    return _fetch_json(path, f"{subfolder}/config.json", revision)


def weights_fingerprint(path: str, subfolders: tuple[str, ...]) -> str | None:
    """Sizes and times of a local checkpoint's encoder weights, so re-saved weights at the same path
    never hit stale cache entries. Hub ids are pinned by `revision` instead."""
    root = Path(path)
    if not root.is_dir():
        return None
    stats = sorted(
        (str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
        for sub in subfolders if (root / sub).is_dir() for f in (root / sub).iterdir() if f.is_file()
    )
    return json.dumps(stats)


@dataclass(frozen=True)
class SamplingDefaults:
    """How a kind of checkpoint is meant to be sampled (its model card's settings)."""

    kind: str
    why: str  # what in the checkpoint's configs says it is this kind
    steps: int
    guidance: float | None  # None: the model takes no guidance value
    cfg: bool  # guidance > 1 runs real classifier-free guidance against a negative prompt


def block_regex(double: list[str], single: list[str]) -> str:
    """peft regex (full match on the module name) for projections in double and single blocks."""
    parts = []
    if double:
        parts.append(r"transformer_blocks\.\d+\.(" + "|".join(re.escape(n) for n in double) + ")")
    if single:
        parts.append(r"single_transformer_blocks\.\d+\.(" + "|".join(re.escape(n) for n in single) + ")")
    return "^(" + "|".join(parts) + ")$"


# Weights only ever come from safetensors: a checkpoint offering only pickled .bin files is refused
# rather than unpickled (unpickling can run code from the file).
SAFE = {"use_safetensors": True}


class CheckpointParts:
    """Loads a pipeline's parts on demand and drops the encoders when asked.

    Text encoders are loaded as a pipeline with transformer and VAE set to None, so prompts are
    encoded by the pipeline's own `encode_prompt`: exactly what inference will see.

    Quantization (`fluxtune.models.quantize`): `quantize` for the transformer, all but the top-level
    modules in `keep_unquantized`; `quantize_text_encoders` for the pipeline components named in
    `quantizable_text_encoders`.
    """

    def __init__(self, pipeline_cls, transformer_cls, path: str, revision: str | None, dtype: torch.dtype, *,
                 quantize: str = "none", keep_unquantized: tuple[str, ...] = (),
                 quantize_text_encoders: str = "none", quantizable_text_encoders: tuple[str, ...] = ()):
        self.pipeline_cls, self.transformer_cls = pipeline_cls, transformer_cls
        self.path, self.revision, self.dtype = path, revision, dtype
        self.quantize, self.keep_unquantized = quantize, keep_unquantized
        self.quantize_text_encoders, self.quantizable_text_encoders = quantize_text_encoders, quantizable_text_encoders
        self._text_pipe = None
        self._vae = None

    def text_identity(self) -> dict:
        """Cache-key fields for quantized text encoders, whose embeddings differ from full precision."""
        return {} if self.quantize_text_encoders == "none" else {"quantize": self.quantize_text_encoders}

    def text_pipe(self, device: torch.device):
        if self._text_pipe is None:
            quantized = text_encoder_load_kwargs(self.quantize_text_encoders, self.dtype, self.quantizable_text_encoders,
                                                  self.path)
            self._text_pipe = self.pipeline_cls.from_pretrained(
                self.path, revision=self.revision, transformer=None, vae=None, dtype=self.dtype, **SAFE, **quantized
            ).to(device)
        return self._text_pipe

    def vae(self, device: torch.device):
        if self._vae is None:
            index = read_model_index(self.path, self.revision)
            vae_cls = _diffusers_class(index["vae"][1])
            self._vae = vae_cls.from_pretrained(self.path, subfolder="vae", revision=self.revision, dtype=self.dtype, **SAFE)
            self._vae.to(device).requires_grad_(False).eval()
        return self._vae

    def free(self) -> None:
        self._text_pipe = self._vae = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def transformer(self, dtype: torch.dtype) -> torch.nn.Module:
        keep = self.keep_unquantized
        if self.quantize == "nf4":
            unpackable = [n for n in unpackable_transformer_linears(self.transformer_cls, self.path, self.revision)
                          if n.split(".")[0] not in keep]
            warn_unpackable("model.quantize", "the transformer", unpackable)
            keep = (*keep, *unpackable)
        quantized = transformer_load_kwargs(self.quantize, dtype, keep)
        try:
            model = self.transformer_cls.from_pretrained(
                self.path, subfolder="transformer", revision=self.revision, dtype=dtype, **SAFE, **quantized
            )
        except OSError as e:  # diffusers' "no file named ..." when only pickled weights exist
            raise ModelError(
                f"{self.path}: cannot load the transformer ({' '.join(str(e).split())[:300]}). fluxtune loads "
                "weights only from .safetensors files; convert pickled .bin weights first"
            ) from None
        return model.requires_grad_(False)

    def pipeline(self, dtype: torch.dtype, **components):
        return self.pipeline_cls.from_pretrained(self.path, revision=self.revision, dtype=dtype, **SAFE, **components)

    def pipeline_without_text_encoders(self, transformer: torch.nn.Module, dtype: torch.dtype):
        """The pipeline around a live transformer, for prompts given as embeddings."""
        index = read_model_index(self.path, self.revision)
        text_parts = {k: None for k in index if k.startswith(("text_encoder", "tokenizer"))}
        return self.pipeline(dtype, transformer=transformer, **text_parts)


def _diffusers_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelError(f"diffusers has no class {name!r}; upgrade diffusers (pip install -U diffusers)")
    return cls
