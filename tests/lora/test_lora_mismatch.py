"""`fluxtune generate` with a LoRA that does not fit the model, or that is not a safetensors file:
exit status 1 and one message naming the file, the base it was trained for and the one it meets."""

import json
import pathlib
import pickle
import shutil

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from safetensors import safe_open

from fluxtune.cli import main
from fluxtune.models.families import load_family
from fluxtune.lora.adapter import add_file_metadata, add_lora, describe_base, resolve_targets, save_lora


def make_lora(model: pathlib.Path, out: pathlib.Path, header: bool = True) -> pathlib.Path:
    family = load_family(str(model))
    transformer = family.load_transformer(torch.float32)
    add_lora(transformer, rank=2, alpha=2, targets=resolve_targets(family, "attention"))
    file = save_lora(family.pipeline_cls, transformer, out)
    if header:
        add_file_metadata(file, describe_base(transformer) | {"fluxtune.base_model": str(model)})
    return file


@pytest.fixture(scope="module")
def klein(tiny_models):
    return tiny_models("flux2-klein")


@pytest.fixture(scope="module")
def wide_klein(klein, tmp_path_factory):
    """The tiny klein pipeline with 2 heads of 64 instead of 2 heads of 32: every attention layer is
    twice as wide, as between two sizes of a real model."""
    path = tmp_path_factory.mktemp("wide") / "klein-wide"
    shutil.copytree(klein, path)
    shutil.rmtree(path / "transformer")
    config = {k: v for k, v in Flux2Transformer2DModel.load_config(klein / "transformer").items()
              if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wide = Flux2Transformer2DModel(**config | {"attention_head_dim": 64, "axes_dims_rope": (16, 16, 16, 16)})
    wide.save_pretrained(path / "transformer")
    return path


@pytest.fixture(scope="module")
def klein_lora(klein, tmp_path_factory):
    return make_lora(klein, tmp_path_factory.mktemp("lora") / "klein")


def generate(model, lora, out: pathlib.Path, capsys) -> tuple[int, str]:
    code = main(["generate", "--model", str(model), "--lora", str(lora), "--prompt", "a photo of sks",
                 "--out", str(out), "--steps", "1", "--width", "64", "--height", "64"])
    return code, capsys.readouterr().err


def test_describe_base_names_class_and_shape(klein_lora, klein):
    with safe_open(str(klein_lora), "pt") as f:
        header = f.metadata()
    assert header["fluxtune.base_class"] == "Flux2Transformer2DModel"
    assert header["fluxtune.base_model"] == str(klein)
    assert json.loads(header["fluxtune.base_shape"]) == {
        "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 32,
        "joint_attention_dim": 192, "in_channels": 128,
    }
    assert " " not in header["fluxtune.base_shape"]  # compact
    assert "lora_adapter_metadata" in header  # diffusers' own field is kept


def test_lora_on_its_own_base_generates(klein, klein_lora, tmp_path, capsys):
    for lora in (klein_lora, klein_lora.parent):  # the file, or the folder save_lora wrote
        code, err = generate(klein, lora, tmp_path / "ok.png", capsys)
        assert code == 0, err
        assert (tmp_path / "ok.png").is_file()


def test_lora_for_other_shapes_names_both_bases(wide_klein, klein, klein_lora, tmp_path, capsys):
    code, err = generate(wide_klein, klein_lora, tmp_path / "x.png", capsys)
    assert code == 1
    assert not (tmp_path / "x.png").exists()
    # One message (beside the progress bars of loading the pipeline): no traceback, no diffusers dump.
    assert "Traceback" not in err and "size mismatch for" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("fluxtune:")]
    assert line.startswith("fluxtune: error: ")
    assert f"LoRA {klein_lora} does not fit this model" in line
    trained_for, _, loaded_into = line.partition("is being loaded into")
    assert "trained for Flux2Transformer2DModel " in trained_for and '"attention_head_dim":32' in trained_for
    assert f"({klein})" in trained_for
    assert '"attention_head_dim":64' in loaded_into and f"({wide_klein})" in loaded_into
    assert "first mismatch: transformer_blocks.0.attn.to_q (lora_A) is [2, 64] in the LoRA, [2, 128] in the model" in loaded_into


def test_lora_without_header_still_names_the_file_and_the_model(wide_klein, klein, tmp_path, capsys):
    lora = make_lora(klein, tmp_path / "plain", header=False)
    code, err = generate(wide_klein, lora, tmp_path / "x.png", capsys)
    assert code == 1
    assert f"LoRA {lora} does not fit this model" in err
    assert "a base it does not record" in err
    assert '"attention_head_dim":64' in err and str(wide_klein) in err


def test_lora_of_another_architecture_is_refused_before_loading(tiny_models, klein, tmp_path, capsys):
    """A FLUX.1 LoRA on FLUX.2 shares some layer names (tiny models even share their widths, so
    diffusers would load part of it and ignore the rest): the header says it cannot fit."""
    lora = make_lora(tiny_models("flux1"), tmp_path / "flux1")
    code, err = generate(klein, lora, tmp_path / "x.png", capsys)
    assert code == 1
    assert "trained for FluxTransformer2DModel" in err and "loaded into Flux2Transformer2DModel" in err


class _Payload:
    """Unpickling this creates a file: the proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_pickle_lora_file_is_refused(klein, tmp_path, capsys, suffix):
    marker = tmp_path / "unpickled"
    lora = tmp_path / f"lora{suffix}"
    lora.write_bytes(pickle.dumps({"transformer.x.lora_A.weight": _Payload(marker)}))
    code, err = generate(klein, lora, tmp_path / "x.png", capsys)
    assert code == 1
    assert str(lora) in err and "only .safetensors files are loaded; no pickle" in err
    assert not marker.exists()


def test_folder_with_only_a_pickle_is_refused(klein, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "pytorch_lora_weights.bin").write_bytes(pickle.dumps(_Payload(marker)))
    code, err = generate(klein, folder, tmp_path / "x.png", capsys)
    assert code == 1
    assert "pytorch_lora_weights.bin" in err and "no pickle" in err
    assert not marker.exists()


def test_missing_lora_is_named(klein, tmp_path, capsys):
    code, err = generate(klein, tmp_path / "nope" / "lora.safetensors", tmp_path / "x.png", capsys)
    assert code == 1
    assert "no such file or folder" in err
