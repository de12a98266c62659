"""Run configuration: a closed pydantic schema, loaded from YAML with `a.b=value` overrides.

    from fluxtune.config import load_config
    cfg = load_config("configs/tiny-demo.yaml", ["train.max_steps=10"])

Every problem in a config is reported at once, one line per problem, with the dotted key path and
a did-you-mean for misspelt keys, before any model is loaded (`ConfigError`; the text side is `fluxtune.config_input`).
"""

from __future__ import annotations

import difflib
import logging
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from fluxtune.config_input import ConfigError, apply_overrides, problems, safe_load, string_keys

log = logging.getLogger("fluxtune")


class _Section(BaseModel):
    # NaN passes every `gt`/`ge` bound (all comparisons are false) and inf passes `gt=0`: neither
    # is a usable learning rate, shift or guidance, so no float field takes them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# torch generators take seeds below 2**64, and the data order multiplies the seed: keep it small.
SEED_LIMIT = 2**32


# Weight formats for model.quantize and model.quantize_text_encoders.
Quantization = Literal["none", "nf4", "int8", "fp8"]
QUANTIZATIONS = typing.get_args(Quantization)


class ModelConfig(_Section):
    path: str = Field(description="local folder or hub id of a diffusers pipeline")
    family: Literal["auto", "flux1", "flux2"] = "auto"
    revision: str | None = None
    # FLUX.2 only: which hidden layers of the text encoder form the prompt embedding.
    # None: (10, 20, 30) for FLUX.2-dev, (9, 18, 27) for klein, derived for other encoder depths.
    text_encoder_out_layers: tuple[int, ...] | None = None
    # Flex.1/Flex.2 are FLUX.1-architecture checkpoints trained without their guidance embedder.
    bypass_guidance: bool = False
    max_sequence_length: int | None = Field(None, gt=0, description="text tokens; None = family default")
    # QLoRA: store the transformer blocks' weights quantized (the LoRA itself stays fp32): nf4 or
    # int8 with bitsandbytes (CUDA GPU only), fp8 weight-only with torchao. See fluxtune/quantize.py.
    quantize: Quantization = "none"
    # The same for the large text encoder (T5, Mistral3, Qwen3) while captions are encoded.
    quantize_text_encoders: Quantization = "none"

    @field_validator("text_encoder_out_layers")
    @classmethod
    def _layers_positive(cls, v):
        if v is not None and (not v or any(i < 0 for i in v)):
            raise ValueError("must be a non-empty list of non-negative layer indices, e.g. [10, 20, 30]")
        return v

    @field_validator("quantize", "quantize_text_encoders", mode="before")
    @classmethod
    def _known_quantization(cls, v):
        """A did-you-mean for near misses (`NF4`, `int4`, `fp16`, `null`), which pydantic's own
        Literal message lacks."""
        if isinstance(v, str) and v in QUANTIZATIONS:
            return v
        guess = difflib.get_close_matches(str(v).lower(), QUANTIZATIONS, n=1, cutoff=0.5)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        raise ValueError(f"should be none, nf4 or int8 (bitsandbytes) or fp8 (torchao){hint}")


class SourceConfig(_Section):
    """One entry of data.sources: a folder (`path`) or a `datasets` dataset (`dataset`)."""

    path: str | None = Field(None, description="folder of images: metadata.jsonl captions, else .txt files")
    dataset: str | None = Field(None, description="local dataset folder (imagefolder, parquet, arrow, "
                                                  "save_to_disk) or a hub id; needs the datasets extra")
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    repeats: int = Field(1, ge=1, description="this source's images count this many times per epoch")
    default_caption: str | None = Field(None, description="None = data.default_caption")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give either path (a folder) or dataset (a datasets folder or hub id), not "
                             f"{'both' if self.path else 'neither'}")
        only_dataset = {"split", "image_column"} & self.model_fields_set
        if self.path is not None and only_dataset:
            raise ValueError(f"{' and '.join(sorted(only_dataset))}: only for a dataset source, not a path")
        return self


class DataConfig(_Section):
    # The simple single-folder form; `sources` combines folders and datasets (one or the other).
    path: str | None = Field(None, description="folder of images with same-name .txt captions or a metadata.jsonl")
    sources: list[SourceConfig] | None = None
    resolution: int = Field(512, ge=64, le=4096)
    default_caption: str = ""
    caption_extension: str = ".txt"
    # Captions at train time (fluxtune.data.captions), chosen per (train.seed, epoch, sample) and all
    # encoded before training. A caption file with several lines holds one variant per line.
    trigger_word: str | None = Field(None, description="put first in every caption that lacks it")
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="chance of training with the empty caption")
    shuffle_tags: bool = False
    keep_tags: int = Field(1, ge=0, description="leading comma-separated tags that shuffle_tags leaves in place")
    repeats: int = Field(1, ge=1)
    # Aspect-ratio buckets: each image trains near its own shape (area <= resolution^2, sides a
    # multiple of bucket_step), never enlarged unless `upscale`; false: a centre-cropped square.
    buckets: bool = True
    bucket_step: Literal[16, 32, 64] = 16
    upscale: bool = False
    max_aspect: float = Field(4.0, ge=1.0, le=8.0, description="most elongated bucket, either way")
    # Where latents and text embeddings are stored; entries are keyed by a hash of their inputs,
    # so one folder can serve many runs and models. None: $FLUXTUNE_CACHE or ~/.cache/fluxtune.
    cache_dir: str | None = None
    num_workers: int = Field(0, ge=0)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_16(cls, v):
        if v % 16:
            raise ValueError(f"must be a multiple of 16; try {max(64, round(v / 16) * 16)}")
        return v

    @field_validator("trigger_word")
    @classmethod
    def _one_tag(cls, v):
        # It is inserted as a tag of its own: a comma or line break would split it.
        if v is not None and (not v.strip() or v != v.strip() or any(c in v for c in ",\n")):
            raise ValueError("must be a word or phrase without commas, line breaks or surrounding spaces, e.g. sks")
        return v

    def resolved_sources(self) -> dict[str, SourceConfig]:
        """{config key, for messages: source}: data.path as a one-folder source, or data.sources."""
        if self.path is not None:
            return {"data.path": SourceConfig(path=self.path)}
        return {f"data.sources.{i}": source for i, source in enumerate(self.sources or [])}


class LoraConfig(_Section):
    rank: int = Field(16, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, description="None = rank (scale 1.0)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # A preset ("attention", "attention+mlp", "all-linear"), a regex matched against whole module
    # names, or a list of module names (peft suffix matching).
    targets: str | list[str] = "attention"


# The settings each optimizer takes besides the common ones (lr, weight_decay, ...), with their
# defaults. A setting left out of the YAML takes the chosen optimizer's default; one that belongs
# to another optimizer is an error. Lion wants other betas than Adam, hence one default each.
OPTIMIZER_SETTINGS: dict[str, dict[str, Any]] = {
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8},
    "adamw8bit": {"betas": (0.9, 0.999), "eps": 1e-8},
    "paged_adamw8bit": {"betas": (0.9, 0.999), "eps": 1e-8},
    "lion8bit": {"betas": (0.9, 0.99)},
    "prodigy": {"betas": (0.9, 0.999), "eps": 1e-8, "d_coef": 1.0, "safeguard_warmup": False,
                "use_bias_correction": False},
    # beta1 null: no first moment (Adafactor's memory saving); scale_parameter false: the step is
    # lr itself, not lr times the weight's RMS, which is 0 for a fresh LoRA's B matrix.
    "adafactor": {"beta1": None, "decay_rate": -0.8, "clip_threshold": 1.0, "scale_parameter": False},
}
_OWN_SETTINGS = sorted({key for settings in OPTIMIZER_SETTINGS.values() for key in settings})
Beta = Annotated[float, Field(ge=0, lt=1)]


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


class OptimConfig(_Section):
    """Common keys, then the chosen optimizer's own settings (see OPTIMIZER_SETTINGS)."""

    name: Literal["adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "prodigy", "adafactor"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="None disables clipping")
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    # Own settings: None where the chosen optimizer does not take them.
    betas: tuple[Beta, Beta] | None = None
    eps: float | None = Field(None, gt=0)
    d_coef: float | None = Field(None, gt=0, description="prodigy: multiplies its step-size estimate")
    safeguard_warmup: bool | None = None
    use_bias_correction: bool | None = None
    beta1: Beta | None = None
    decay_rate: float | None = Field(None, le=0)
    clip_threshold: float | None = Field(None, gt=0)
    scale_parameter: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data):
        """The chosen optimizer's defaults for what the YAML leaves out, so the resolved config
        (`fluxtune validate`, output_dir/config.yaml) shows every value the optimizer gets."""
        if isinstance(data, dict):
            name = data.get("name", "adamw")
            if isinstance(name, str) and name in OPTIMIZER_SETTINGS:
                unset = {k: v for k, v in OPTIMIZER_SETTINGS[name].items() if data.get(k) is None}
                return {**data, **unset}
        return data

    @field_validator(*_OWN_SETTINGS)
    @classmethod
    def _belongs_to_name(cls, value, info: ValidationInfo):
        name = info.data.get("name")  # absent when the name itself is invalid: reported there
        if value is None or name is None or info.field_name in OPTIMIZER_SETTINGS[name]:
            return value
        takers = [n for n, settings in OPTIMIZER_SETTINGS.items() if info.field_name in settings]
        raise ValueError(f"only applies to {_either(takers)}, not to optim.name {name}; remove it or change optim.name")

    @model_validator(mode="after")
    def _warn_unusual_lr(self):
        """lr is never changed behind the user's back, but a value that suits AdamW is a poor start
        for Lion or Prodigy: say so when the config loads (`fluxtune validate` shows it too)."""
        if self.name == "lion8bit" and self.lr >= 1e-4:
            log.warning("optim.lr %g with lion8bit: Lion's sign updates are larger than AdamW's; it "
                        "usually wants an lr 3-10x lower than AdamW would use (e.g. 3e-5 for 1e-4)", self.lr)
        if self.name == "prodigy" and not 0.1 <= self.lr <= 10:
            log.warning("optim.lr %g with prodigy: Prodigy estimates the step size itself and expects "
                        "optim.lr around 1.0 (lr multiplies its estimate)", self.lr)
        if self.name == "prodigy" and self.warmup_steps and not self.safeguard_warmup:
            log.warning("optim.safeguard_warmup: Prodigy's authors recommend true when warming up "
                        "(optim.warmup_steps %d)", self.warmup_steps)
        return self

    @model_serializer(mode="wrap")
    def _only_chosen_settings(self, handler):
        """The resolved config lists the chosen optimizer's settings, not every optimizer's."""
        return {k: v for k, v in handler(self).items()
                if k not in _OWN_SETTINGS or k in OPTIMIZER_SETTINGS[self.name]}

    def own_settings(self) -> dict[str, Any]:
        """The chosen optimizer's own settings as keyword arguments (for `make_optimizer`)."""
        return {key: getattr(self, key) for key in OPTIMIZER_SETTINGS[self.name]}


class SigmaConfig(_Section):
    sampling: Literal["uniform", "logit_normal", "shift"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    # For sampling == "shift": a fixed shift factor, or "auto" for FLUX's resolution-dependent shift.
    shift: float | Literal["auto"] = "auto"

    @field_validator("shift")
    @classmethod
    def _shift_positive(cls, v):
        if v != "auto" and v <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return v


class LogConfig(_Section):
    backend: Literal["wandb", "tensorboard", "none"] = "none"
    project: str = "fluxtune"
    run_name: str | None = None
    tags: list[str] = []
    every: int = Field(10, ge=1, description="log scalars every N optimizer steps")
    # Upload each saved LoRA as a W&B artifact (with its metadata).
    artifacts: bool = False


class SamplePrompt(_Section):
    prompt: str
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    width: int | None = Field(None, ge=64, le=4096, description="None = data.resolution")
    height: int | None = Field(None, ge=64, le=4096, description="None = data.resolution")
    steps: int | None = Field(None, ge=1, description="None = sample.steps")
    guidance: float | None = Field(None, ge=0, description="None = sample.guidance")


class SampleConfig(_Section):
    every: int = Field(0, ge=0, description="render samples every N steps; 0 = never")
    # Plain strings or {prompt, seed, width, height, steps, guidance}.
    prompts: list[SamplePrompt | str] = []
    steps: int = Field(20, ge=1)
    guidance: float | None = Field(None, ge=0, description="None = the pipeline's default")
    before_training: bool = True  # a step-0 sample shows the base model

    def resolved_prompts(self) -> list[SamplePrompt]:
        return [SamplePrompt(prompt=p) if isinstance(p, str) else p for p in self.prompts]


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="evaluation loss every N steps; 0 = never")
    # Held-out images: a fraction of data.path (chosen by file-name hash, stable across runs),
    # or a separate folder with the same layout.
    fraction: float = Field(0.0, ge=0.0, lt=1.0)
    path: str | None = None
    sigmas: list[float] = [0.1, 0.3, 0.5, 0.7, 0.9]
    seed: int = Field(1234, ge=0, lt=SEED_LIMIT)

    @field_validator("sigmas")
    @classmethod
    def _sigmas_in_range(cls, v):
        if not v or any(not 0 < s < 1 for s in v):
            raise ValueError("must be a non-empty list of values strictly between 0 and 1")
        return v


class TrainConfig(_Section):
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    seed: int = Field(42, ge=0, lt=SEED_LIMIT)
    # auto: bf16 on a GPU, full fp32 on CPU (where bf16 autocast is slow and gains nothing).
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    # Guidance value fed to guidance-embedded transformers (FLUX.1-dev, FLUX.2-dev); ignored by
    # models without a guidance embedder. None: the family default.
    guidance: float | None = Field(None, ge=0)
    save_every: int = Field(250, ge=1)
    gradient_checkpointing: bool = False
    # Keep the frozen weights of the last N transformer blocks on the CPU and stream each to the GPU
    # only while it computes (fluxtune/models/offload.py): less GPU memory, slower steps. No effect on CPU.
    blocks_to_swap: int = Field(0, ge=0)
    # torch.compile each transformer block (regional compilation): faster steps after a warm-up.
    compile: bool = False
    # Split the frozen base across the launched processes (FSDP2, fluxtune/sharding.py), for a base
    # that does not fit one GPU; the LoRA stays whole on every process. none: plain data parallel.
    sharding: Literal["none", "fsdp"] = "none"
    # Exponential moving average of the LoRA weights, used for samples and saved as lora_ema/.
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    # Continue from a training-state checkpoint: "latest" (in output_dir/state; starts fresh when
    # there is none yet) or a checkpoint folder.
    resume: str | None = None
    keep_checkpoints: int = Field(3, ge=1, description="training-state checkpoints kept in output_dir/state")
    # Steps whose loss or gradient is NaN/Inf are skipped; this many in a row stop the run.
    max_bad_steps: int = Field(5, ge=1)
    sigma: SigmaConfig = SigmaConfig()


class Config(_Section):
    output_dir: str
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.data.path is not None and self.data.sources is not None:
            raise ValueError("data.sources: give data.path (one folder) or data.sources (a list), not both")
        if self.data.path is None and not self.data.sources:
            raise ValueError("data.path: required key is missing (or give data.sources, a list of folders and datasets)")
        if self.sample.every and not self.sample.prompts:
            raise ValueError("sample.prompts: sample.every is set but there are no prompts to render")
        if self.eval.every and not (self.eval.fraction or self.eval.path):
            raise ValueError("eval.every: set eval.fraction (held out from data.path) or eval.path")
        if self.train.blocks_to_swap:
            self._check_block_swap()
        if self.train.sharding != "none":
            self._check_sharding()
        if self.optim.warmup_steps >= self.train.max_steps and self.optim.warmup_steps > 0:
            raise ValueError(
                f"optim.warmup_steps: {self.optim.warmup_steps} must be below train.max_steps "
                f"({self.train.max_steps})"
            )
        return self

    def _check_block_swap(self):
        """What block swap cannot run with: each would bring the swapped weights back to the GPU
        or move weights the swap does not know how to move."""
        swap = f"train.blocks_to_swap ({self.train.blocks_to_swap})"
        if self.train.compile:
            raise ValueError(f"train.compile: cannot be combined with {swap}; set one of them")
        if self.model.quantize != "none":
            raise ValueError(f"model.quantize: {self.model.quantize} cannot be combined with {swap}, which moves "
                             "full-precision weights only; set model.quantize=none or train.blocks_to_swap=0")
        if self.sample.every:
            raise ValueError(f"sample.every: in-training samples would load the whole transformer onto the GPU, "
                             f"which {swap} is there to avoid; set sample.every=0 and render with fluxtune generate")

    def _check_sharding(self):
        """What sharding cannot run with: each moves or wraps the weights that sharding splits."""
        fsdp = f"train.sharding ({self.train.sharding})"
        if self.train.blocks_to_swap:
            raise ValueError(f"train.blocks_to_swap: cannot be combined with {fsdp}; sharding already spreads "
                             "the weights over the GPUs, so set train.blocks_to_swap=0")
        if self.model.quantize != "none":
            raise ValueError(f"model.quantize: {self.model.quantize} cannot be combined with {fsdp} yet; shard "
                             "the base (train.sharding=fsdp, model.quantize=none) or quantize it on each GPU "
                             "(train.sharding=none)")
        if self.train.compile:
            raise ValueError(f"train.compile: cannot be combined with {fsdp} yet; set train.compile=false")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS = ("model", "data", "lora", "optim", "train", "log", "sample", "eval")


def build_config(data: Any, source: str | None = None) -> Config:
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of keys, got {type(data).__name__}"], source)
    data = string_keys(data)
    # A section whose keys are all commented out loads as None: treat it as empty.
    data = {k: ({} if v is None and k in _SECTIONS else v) for k, v in data.items()}
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(problems(e.errors(), data, Config), source) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data: Any = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError([f"cannot read config file: {e.strerror or e}"], source) from None
        except UnicodeDecodeError as e:
            raise ConfigError([f"not valid YAML: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})"],
                              source) from None
        try:
            data = safe_load(text)
        except ValueError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if data is None:  # an empty file, or only comments
            data = {}
    if isinstance(data, dict):
        data = apply_overrides(data, list(overrides))
    return build_config(data, source)
