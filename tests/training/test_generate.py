"""`fluxtune generate` as a batch tool: several LoRAs with their own strengths, prompts from the
command line and a file, seed lists, batched rendering that does not change images, one PNG per
(prompt, seed) with its settings in the metadata, a contact sheet, per-model defaults, clear errors.

Tiny pipelines at 64x64 px with 2 steps, on CPU. Run: pytest -q tests/test_generate.py
"""

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fluxtune.cli import main
from fluxtune.errors import LoraError
from fluxtune.models.families import load_family
from fluxtune.lora.adapter import add_file_metadata, add_lora, describe_base, resolve_targets, save_lora
from fluxtune.training.sampling import parse_lora, read_prompts_file

SMALL = ["--steps", "2", "--width", "64", "--height", "64"]


def random_lora(model: pathlib.Path, out: pathlib.Path, seed: int) -> pathlib.Path:
    """A LoRA with random (not zero-initialised) weights, so it visibly changes the output."""
    family = load_family(str(model))
    transformer = family.load_transformer(torch.float32)
    add_lora(transformer, rank=2, alpha=2, targets=resolve_targets(family, "attention"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    file = save_lora(family.pipeline_cls, transformer, out)
    add_file_metadata(file, describe_base(transformer))
    return file


@pytest.fixture(scope="module")
def klein(tiny_models):
    return tiny_models("flux2-klein")


@pytest.fixture(scope="module")
def klein_distilled(klein, tmp_path_factory):
    """The tiny klein base pipeline saved as a step-distilled checkpoint: diffusers stores the
    pipeline's `is_distilled` in model_index.json, the only place base and distilled differ."""
    path = tmp_path_factory.mktemp("distilled") / "klein-distilled"
    shutil.copytree(klein, path)
    index = json.loads((path / "model_index.json").read_text())
    assert index["is_distilled"] is False
    (path / "model_index.json").write_text(json.dumps(index | {"is_distilled": True}, indent=2))
    return path


@pytest.fixture(scope="module")
def loras(klein, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return random_lora(klein, root / "a", seed=1), random_lora(klein, root / "b", seed=2)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def metadata(path) -> dict:
    return json.loads(Image.open(path).text["fluxtune"])


def test_lora_argument_takes_a_strength_only_when_it_is_a_number(tmp_path):
    assert parse_lora("style.safetensors:0.8", 1.0) == ("style.safetensors", 0.8)
    assert parse_lora("style.safetensors", 0.6) == ("style.safetensors", 0.6)
    assert parse_lora("user/repo:-1e-1") == ("user/repo", -0.1)
    with_colon = tmp_path / "run:2" / "lora"
    with_colon.mkdir(parents=True)
    assert parse_lora(str(with_colon), 0.5) == (str(with_colon), 0.5)  # no number after the last ':'
    assert parse_lora(f"{with_colon}:2", 0.5) == (str(with_colon), 2.0)
    with pytest.raises(LoraError, match="strength 'strong' is not a number"):
        parse_lora(f"{with_colon}:strong")
    for bad in ("nan", "inf"):
        with pytest.raises(LoraError, match="not a finite number"):
            parse_lora(f"{with_colon}:{bad}")
    with pytest.raises(LoraError, match="no LoRA path"):
        parse_lora(":0.5")


def test_each_lora_has_its_own_strength_and_zero_is_no_lora(klein, loras, tmp_path, capsys):
    a, b = loras

    def image(name, *lora_args):
        code, _, err = run(capsys, "--model", klein, "--prompt", "a photo of sks", *SMALL, "--seed", 5,
                           "--out", tmp_path / f"{name}.png", *lora_args)
        assert code == 0, err
        return pixels(tmp_path / f"{name}.png")

    base = image("base")
    assert np.array_equal(image("a0", "--lora", f"{a}:0"), base)
    assert np.array_equal(image("default0", "--scale", "0", "--lora", a, "--lora", b.parent), base)
    a_only = image("a_only", "--lora", f"{a}:1")
    assert np.abs(a_only - base).max() > 0
    assert np.array_equal(image("a1b0", "--lora", a, "--lora", f"{b}:0"), a_only)  # --scale 1 by default
    assert np.abs(image("a0b1", "--lora", f"{a}:0", "--lora", f"{b}:1") - a_only).max() > 0
    assert np.abs(image("a_half", "--lora", f"{a}:0.5") - a_only).max() > 0
    assert metadata(tmp_path / "a1b0.png")["loras"] == [{"path": str(a), "scale": 1.0}, {"path": str(b), "scale": 0.0}]


def test_batch_size_does_not_change_images(klein, tmp_path, capsys):
    for batch in (1, 4):  # 6 images: batches of 4 and 2, prompts and seeds mixed within a batch
        code, _, err = run(capsys, "--model", klein, "--prompt", "a cat", "--prompt", "a red rocket in space",
                           "--seed", 7, "--num-images", 3, "--batch-size", batch, *SMALL, "--out-dir", tmp_path / f"b{batch}")
        assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "b1").glob("p*.png"))
    assert names == [f"p{p:02d}-s{s:07d}.png" for p in (0, 1) for s in (7, 8, 9)]
    for name in names:
        one, four = pixels(tmp_path / "b1" / name), pixels(tmp_path / "b4" / name)
        assert np.abs(one - four).max() <= 1, name  # float rounding of batched matmuls, then to uint8
    assert np.abs(pixels(tmp_path / "b1" / names[0]) - pixels(tmp_path / "b1" / names[1])).max() > 0


def test_prompts_file_skips_comments_and_blank_lines(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("\ufeff# portraits\na photo of sks\n\n   \n  # indented comment\ncafé at night ☕\n", encoding="utf-8")
    assert read_prompts_file(file) == ["a photo of sks", "café at night ☕"]


def test_files_metadata_and_contact_sheet(klein, loras, tmp_path, capsys):
    file = tmp_path / "prompts.txt"
    file.write_text("# from a file\na red rocket\ncafé ☕\n", encoding="utf-8")
    out = tmp_path / "gen"
    code, stdout, err = run(capsys, "--model", klein, "--lora", f"{loras[0]}:0.7", "--prompt", "a cat",
                            "--prompts-file", file, "--seeds", "3,11", "--batch-size", 2, "--guidance", 2.5, *SMALL,
                            "--out-dir", out)
    assert code == 0, err
    sheet = out / "contact_sheet.png"
    assert stdout.strip().splitlines()[-1] == f"wrote 6 images to {out}, contact sheet {sheet}"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["contact_sheet.png", "p00-s0000003.png", "p00-s0000011.png", "p01-s0000003.png",
                     "p01-s0000011.png", "p02-s0000003.png", "p02-s0000011.png"]
    shared = {"model": str(klein), "family": "flux2", "pipeline": "Flux2KleinPipeline", "kind": "FLUX.2-klein base",
              "loras": [{"path": str(loras[0]), "scale": 0.7}], "steps": 2, "size": [64, 64], "guidance": 2.5,
              "negative_prompt": ""}
    assert metadata(out / "p02-s0000011.png") == shared | {"prompt": "café ☕", "seed": 11}
    assert metadata(out / "p00-s0000003.png") == shared | {"prompt": "a cat", "seed": 3}
    assert metadata(sheet) == shared | {"prompts": ["a cat", "a red rocket", "café ☕"], "seeds": [3, 11]}
    grid = Image.open(sheet)
    assert grid.size == (2 * 64, 3 * 64)  # columns: seeds, rows: prompts
    tile = np.asarray(grid)[64:128, 64:128]  # row 1 (second prompt), column 1 (second seed)
    assert np.array_equal(tile, np.asarray(Image.open(out / "p01-s0000011.png")))


def test_klein_base_and_distilled_defaults(klein, klein_distilled, tmp_path, capsys, caplog):
    base, distilled = load_family(str(klein)).sampling_defaults(), load_family(str(klein_distilled)).sampling_defaults()
    assert (base.kind, base.steps, base.guidance, base.cfg) == ("FLUX.2-klein base", 50, 4.0, True)
    assert (distilled.kind, distilled.steps, distilled.guidance, distilled.cfg) == ("FLUX.2-klein distilled", 4, 1.0, False)

    with caplog.at_level("INFO", logger="fluxtune"):
        code, _, err = run(capsys, "--model", klein_distilled, "--prompt", "a cat", "--width", 64, "--height", 64,
                           "--out", tmp_path / "distilled.png")
    assert code == 0, err
    assert "FLUX.2-klein distilled (Flux2KleinPipeline, is_distilled true): 4 steps, guidance 1.0" in caplog.text
    assert not (tmp_path / "contact_sheet.png").exists()
    info = metadata(tmp_path / "distilled.png")
    assert (info["steps"], info["guidance"], "negative_prompt" in info) == (4, 1.0, False)

    # Base klein runs CFG: the negative prompt changes the image.
    for name, extra in [("empty", []), ("negative", ["--negative-prompt", "blurry, low quality"])]:
        code, _, err = run(capsys, "--model", klein, "--prompt", "a cat", *SMALL, "--out", tmp_path / f"{name}.png", *extra)
        assert code == 0, err
    assert metadata(tmp_path / "negative.png")["negative_prompt"] == "blurry, low quality"
    assert np.abs(pixels(tmp_path / "negative.png") - pixels(tmp_path / "empty.png")).max() > 0


def test_flux1_dev_and_schnell_defaults(tiny_models):
    dev, schnell = (load_family(str(tiny_models(k))).sampling_defaults() for k in ("flux1", "flux1-schnell"))
    assert (dev.kind, dev.steps, dev.guidance) == ("FLUX.1-dev", 28, 3.5)
    assert (schnell.kind, schnell.steps, schnell.guidance) == ("FLUX.1-schnell", 4, None)


def test_errors_are_one_clear_line(klein, klein_distilled, loras, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --out-dir would be
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9\n".encode("latin-1"))
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing here\n\n")
    missing = tmp_path / "nope" / "lora.safetensors"
    cases = [
        (["--lora", missing, "--prompt", "x"], f"LoRA {missing}: no such file or folder"),
        (["--lora", f"{loras[0]}:strong", "--prompt", "x"], "strength 'strong' is not a number"),
        (["--lora", f"{loras[0]}:inf", "--prompt", "x"], "LoRA strength inf is not a finite number"),
        (["--scale", "nan", "--lora", loras[0], "--prompt", "x"], "LoRA strength nan is not a finite number"),
        ([], "no prompt given"),
        (["--prompts-file", tmp_path / "missing.txt"], f"prompts file {tmp_path / 'missing.txt'}: cannot read it"),
        (["--prompts-file", comments], f"prompts file {comments} holds no prompt"),
        (["--prompts-file", not_utf8], f"prompts file {not_utf8}: not UTF-8 text"),
        (["--prompt", "x", "--seeds", "1,x"], "--seeds '1,x': expected whole numbers"),
        (["--prompt", "x", "--seeds", "1,1"], "seed 1 is given twice"),
        (["--prompt", "x", "--seed", "-3"], "seeds must not be negative (got -3)"),
        (["--prompt", "x", "--seeds", "1", "--num-images", "2"], "drop --seed and --num-images"),
        (["--prompt", "x", "--num-images", "2", "--out", tmp_path / "x.png"], "--out writes one image"),
        (["--prompt", "x", "--batch-size", "0"], "--batch-size 0"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, "--model", klein, *SMALL, *args)
        assert code == 1, args
        assert err.startswith("fluxtune: error: ") and err.count("\n") == 1 and message in err, (args, err)
    code, _, err = run(capsys, "--model", klein_distilled, "--prompt", "x", "--negative-prompt", "blurry", *SMALL)
    assert code == 1 and "--negative-prompt needs classifier-free guidance" in err and "FLUX.2-klein distilled" in err
    assert not (tmp_path / "generated").exists()
