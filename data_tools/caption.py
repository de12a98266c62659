"""Caption a folder of images with a vision-language model, one caption file beside each image.

    fluxtune data caption photos/ --model florence-community/Florence-2-large
    fluxtune data caption photos/ --model Qwen/Qwen2.5-VL-7B-Instruct --trigger sks --instruction subject
    accelerate launch -m fluxtune.cli data caption photos/ --model ...   # one shard per process

The kind of model is read from the checkpoint's config.json (`model_type`), never guessed from its
name: Florence-2 (a task token such as <MORE_DETAILED_CAPTION>), BLIP (unconditional captioning) and
chat VLMs (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL: an instruction through the processor's chat
template). Every model loads through transformers' `from_pretrained`, from a folder or a hub id.

Each caption is written atomically right after its batch, and images that already have a non-empty
caption are skipped, so a run that is killed resumes where it stopped. Unreadable images are skipped
with a warning and counted in the summary.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fluxtune.data.sources import IMAGE_EXTENSIONS
from fluxtune.errors import DataError, ModelError, UserError
from fluxtune.data.images import candidate_files, open_rgb

log = logging.getLogger("fluxtune")

FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
DEFAULT_TASK = "<MORE_DETAILED_CAPTION>"

# Named instructions for chat VLMs; anything else given to --instruction is used as written. In a
# LoRA dataset the caption should name what varies and leave out what the LoRA must learn, so the
# trigger-aware presets tell the model what not to describe. "{trigger}" becomes --trigger.
INSTRUCTIONS = {
    "detailed": "Describe this image in one detailed sentence.",
    "subject": ("Describe this image in one detailed sentence. The person in it is named {trigger}: call them "
                "{trigger} and do not describe their face, hair, body or identity; describe everything else: "
                "clothing, pose, expression, setting, lighting and composition."),
    "style": ("Describe the content of this image in one detailed sentence: subjects, setting and composition. "
              "Do not describe its artistic style, medium, colours or technique; that style is called {trigger}."),
}
DEFAULT_INSTRUCTION = "detailed"


@dataclass(frozen=True)
class Kind:
    """How one family of checkpoints is prompted. `echoes_prompt`: decoder-only models return the
    prompt tokens ahead of the new ones, so those are cut off before decoding."""
    name: str
    inputs: Callable  # (processor, images, prompt) -> BatchFeature
    prompt: str | None  # the option that sets the prompt: "task", "instruction" or None
    echoes_prompt: bool


def _florence_inputs(processor, images, task):
    return processor(text=[task] * len(images), images=images, return_tensors="pt")


def _blip_inputs(processor, images, _prompt):
    return processor(images=images, return_tensors="pt")


def _chat_inputs(processor, images, instruction):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt")


_CHAT = Kind("chat VLM", _chat_inputs, prompt="instruction", echoes_prompt=True)
KINDS = {
    "florence2": Kind("Florence-2", _florence_inputs, prompt="task", echoes_prompt=False),
    "blip": Kind("BLIP", _blip_inputs, prompt=None, echoes_prompt=False),
    "llava": _CHAT, "qwen2_vl": _CHAT, "qwen2_5_vl": _CHAT, "qwen3_vl": _CHAT, "qwen3_vl_moe": _CHAT,
}


@dataclass(frozen=True)
class Summary:
    captioned: int = 0
    skipped: int = 0  # already had a non-empty caption
    failed: int = 0  # unreadable images and empty model outputs
    seconds: float = 0.0  # captioning only, model loading excluded
    per_process: tuple[int, ...] = ()  # images captioned by each process, under accelerate launch

    def line(self) -> str:
        rate = self.captioned / self.seconds if self.seconds > 0 else 0.0
        split = ""
        if len(self.per_process) > 1:
            split = f" ({len(self.per_process)} processes: {' + '.join(map(str, self.per_process))})"
        failed = f"failed {self.failed}" + (" (see the warnings above)" if self.failed else "")
        return (f"captioned {self.captioned}{split}, skipped {self.skipped} existing, {failed} "
                f"in {self.seconds:.1f}s ({rate:.2f} images/s)")


def model_kind(model: str | Path) -> Kind:
    """The kind named by the checkpoint's config.json (`model_type`): no weights are read, so a
    wrong model fails in a second, before any download of weights."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(str(model))
    except OSError as e:
        raise ModelError(f"--model {model}: cannot read its config.json ({e})") from None
    model_type = config.get("model_type")
    if model_type not in KINDS:
        raise ModelError(f"--model {model}: model_type {model_type!r} is not a supported captioner; "
                         f"supported: {', '.join(KINDS)}")
    if model_type == "florence2" and "auto_map" in config:
        raise ModelError(f"--model {model}: this is the original remote-code Florence-2 checkpoint; use the "
                         "transformers-native conversion, e.g. florence-community/Florence-2-large")
    return KINDS[model_type]


def resolve_prompt(kind: Kind, task: str | None, instruction: str | None, trigger: str | None) -> str | None:
    """The task token (Florence-2), instruction (chat VLMs) or nothing (BLIP); an option the model
    cannot use is an error rather than silently ignored."""
    if task is not None and kind.prompt != "task":
        raise UserError(f"--task is for Florence-2 models; this is a {kind.name}")
    if instruction is not None and kind.prompt != "instruction":
        raise UserError(f"--instruction is for chat VLMs; this is a {kind.name}")
    if kind.prompt == "task":
        task = task or DEFAULT_TASK
        if task not in FLORENCE_TASKS:
            raise UserError(f"--task {task}: not a captioning task; choose one of {', '.join(FLORENCE_TASKS)}")
        return task
    if kind.prompt is None:
        return None
    text = INSTRUCTIONS.get(instruction or DEFAULT_INSTRUCTION, instruction)
    if "{trigger}" in text and not trigger:
        raise UserError("the instruction mentions {trigger}: pass --trigger WORD")
    return text.replace("{trigger}", trigger or "")


_NOISE = re.compile(r"<think>.*?</think>|</?s>|<pad>|<\|[^|>]*\|>|<[A-Z_]+>", re.DOTALL)
_ROLE = re.compile(r"^\s*assistant\s*[:\n]\s*", re.IGNORECASE)  # a role label, not "Assistant chef ..."


def clean_caption(text: str, prompt: str | None = None) -> str:
    """One line of caption: special and task tokens, reasoning blocks, a leading role label, an
    echo of the instruction and wrapping quotes removed, whitespace collapsed."""
    text = _ROLE.sub("", _NOISE.sub(" ", text))
    text = " ".join(text.split())
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt):].lstrip(" :")
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def with_trigger(caption: str, trigger: str | None) -> str:
    """`trigger, caption`, unless the model already wrote the trigger (a trigger-aware instruction)."""
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}"


class Captioner:
    """A loaded model and processor that turn a batch of PIL images into cleaned captions."""

    def __init__(self, model: str | Path, kind: Kind, prompt: str | None, max_new_tokens: int, device):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        # bf16 halves memory and doubles speed on a GPU; CPUs run fp32 (bf16 there is slow or missing).
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(str(model))
        if kind.echoes_prompt:
            # Decoder-only generation continues from the last position: pad batches on the left.
            self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(str(model), dtype=self.dtype).to(device).eval()
        self.kind, self.prompt, self.max_new_tokens, self.device = kind, prompt, max_new_tokens, device

    def __call__(self, images) -> list[str]:
        import torch

        inputs = self.kind.inputs(self.processor, images, self.prompt).to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if self.kind.echoes_prompt:
            out = out[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [clean_caption(t, self.prompt) for t in texts]


def has_caption(file: Path) -> bool:
    """A non-empty caption file (bytes, so a caption in another encoding still counts as written)."""
    return file.is_file() and bool(file.read_bytes().strip())


def write_atomic(file: Path, text: str) -> None:
    """Write, fsync, then rename over the target: after a kill at any moment the caption file is
    either absent or complete. The temporary name is fixed per caption, so a file left by a killed
    run is overwritten by the rerun that captions the same image."""
    tmp = file.with_name(f".{file.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _open_image(path: Path):
    """The picture training sees (EXIF rotation, RGB), or None after one warning line."""
    try:
        return open_rgb(path)
    except Exception as e:  # Pillow raises many types for broken data; any of them means unusable
        log.warning("skipping %s: cannot decode (%s)", path, e)
        return None


def list_images(folder: Path) -> tuple[list[Path], list]:
    """(images in name order, findings for links that loop or dangle): the files training reads."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    paths, problems = candidate_files(folder, IMAGE_EXTENSIONS)
    if not paths and not problems:
        raise DataError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths, problems


def check_extension(extension: str) -> None:
    if not extension.startswith(".") or len(extension) < 2:
        raise UserError(f"--extension {extension!r}: give a file extension with its dot, e.g. .txt")
    if extension.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"--extension {extension}: that is an image extension; captions would overwrite images")


def caption_shard(images: list[Path], captioner_factory: Callable[[], Captioner], *, batch_size: int,
                  trigger: str | None, extension: str, progress: bool) -> Summary:
    """Caption `images` in batches, writing each caption as soon as its batch is done. The model is
    loaded only when something is left to caption, so a finished run resumes in seconds."""
    from tqdm.auto import tqdm

    if not images:
        return Summary()
    captioner = captioner_factory()
    captioned = failed = 0
    start = time.perf_counter()
    # Images decode on threads (Pillow releases the GIL), so big JPEGs do not leave the GPU waiting.
    with ThreadPoolExecutor(max_workers=4) as pool, \
            tqdm(total=len(images), desc="captioning", unit="img", disable=not progress) as bar:
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            opened = [(p, img) for p, img in zip(batch, pool.map(_open_image, batch)) if img is not None]
            failed += len(batch) - len(opened)
            captions = captioner([img for _, img in opened]) if opened else []
            for (path, _), caption in zip(opened, captions):
                if not caption:
                    log.warning("skipping %s: the model returned an empty caption", path)
                    failed += 1
                    continue
                write_atomic(path.with_suffix(extension), with_trigger(caption, trigger))
                captioned += 1
            bar.update(len(batch))
    return Summary(captioned, 0, failed, time.perf_counter() - start)


def caption_folder(folder: str | Path, model: str | Path, *, batch_size: int = 8, trigger: str | None = None,
                   max_new_tokens: int = 256, extension: str = ".txt", overwrite: bool = False,
                   task: str | None = None, instruction: str | None = None,
                   progress: bool = True) -> Summary:
    """Caption every image of `folder` that has no caption yet (all of them with `overwrite`).

    Under `accelerate launch` each process takes every num_processes-th image of the sorted list
    (its shard is fixed before anything is written, so ranks never race for an image) and the
    counts are gathered: every process returns the summary over all of them."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    if batch_size < 1 or max_new_tokens < 1:
        raise UserError("--batch-size and --max-length must be at least 1")
    check_extension(extension)
    kind = model_kind(model)
    prompt = resolve_prompt(kind, task, instruction, trigger)
    images, bad_links = list_images(Path(folder))

    # Read ACCELERATE_USE_CPU as Accelerator does: without it, processes started on CPU by
    # `accelerate launch` would each caption the whole folder.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.is_main_process:  # every process finds them; one reports them
        for problem in bad_links:
            log.warning("skipping %s: %s", problem.path, problem.message)
    shard = images[state.process_index::state.num_processes]
    todo = [p for p in shard if overwrite or not has_caption(p.with_suffix(extension))]
    done = caption_shard(todo, lambda: Captioner(model, kind, prompt, max_new_tokens, state.device),
                         batch_size=batch_size, trigger=trigger, extension=extension,
                         progress=progress and state.is_local_main_process)
    mine = Summary(done.captioned, len(shard) - len(todo), done.failed, done.seconds)
    every = gather_object([mine])
    # Leaving with the gloo/NCCL group still up can abort the process at exit ("terminate called
    # without an active exception") after all the work is done; close it as training does.
    state.destroy_process_group()
    return Summary(sum(s.captioned for s in every), sum(s.skipped for s in every),
                   sum(s.failed for s in every) + len(bad_links), max(s.seconds for s in every),
                   tuple(s.captioned for s in every))
