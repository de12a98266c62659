"""Family detection and checkpoint errors: every failure names the path or key and says what to do."""

import json

import pytest

from fluxtune.cli import main
from fluxtune.errors import ModelError
from fluxtune.models.families import detect_family, load_family


@pytest.mark.parametrize("kind,family,pipeline", [
    ("flux1", "flux1", "FluxPipeline"), ("flux1-schnell", "flux1", "FluxPipeline"),
    ("flux2", "flux2", "Flux2Pipeline"), ("flux2-klein", "flux2", "Flux2KleinPipeline"),
])
def test_detected_from_model_index(kind, family, pipeline, tiny_models):
    path = str(tiny_models(kind))
    assert detect_family(path) == family
    assert load_family(path).pipeline_cls.__name__ == pipeline


def test_guidance_and_sequence_defaults(tiny_models):
    dev, schnell = load_family(str(tiny_models("flux1"))), load_family(str(tiny_models("flux1-schnell")))
    assert (dev.has_guidance, dev.default_guidance, dev.max_sequence_length) == (True, 1.0, 512)
    assert (schnell.has_guidance, schnell.max_sequence_length) == (False, 256)
    assert not load_family(str(tiny_models("flux1")), bypass_guidance=True).has_guidance
    assert load_family(str(tiny_models("flux2"))).has_guidance
    assert not load_family(str(tiny_models("flux2-klein"))).has_guidance


def test_unknown_pipeline_class_says_how_to_force(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelError, match="StableDiffusionPipeline.*model.family"):
        detect_family(str(tmp_path))


def test_missing_model_is_one_clear_line(tmp_path, photos, capsys):
    missing = tmp_path / "no-such-model"
    args = [f"output_dir={tmp_path / 'out'}", f"model.path={missing}", f"data.path={photos}"]
    assert main(["train", "/dev/null", *args]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ModelError, match="model_index.json: not found"):
        detect_family(str(tmp_path))


def test_family_specific_keys_are_refused_on_the_other_family(tiny_models):
    with pytest.raises(ModelError, match="FLUX.2 only"):
        load_family(str(tiny_models("flux1")), text_encoder_out_layers=(1, 2, 3))
    with pytest.raises(ModelError, match="FLUX.1/Flex"):
        load_family(str(tiny_models("flux2-klein")), bypass_guidance=True)


class _Marker:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_are_refused_not_unpickled(tmp_path, photos, capsys):
    import pickle

    from fluxtune.models.tiny import make_tiny

    model = make_tiny("flux2-klein", tmp_path / "model")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    marker = tmp_path / "unpickled"
    (model / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    args = [f"output_dir={tmp_path / 'out'}", f"model.path={model}", f"data.path={photos}", "data.resolution=64",
            "train.max_steps=1"]
    assert main(["train", "/dev/null", *args]) == 1
    assert ".safetensors" in capsys.readouterr().err
    assert not marker.exists()
