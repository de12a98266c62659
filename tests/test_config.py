"""Config schema, YAML loading, overrides, error reporting and `fluxtune validate`."""

from pathlib import Path

import pytest
import yaml

from fluxtune.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"output_dir": "out", "model": {"path": "some/model"}, "data": {"path": "images"}}


def write(tmp_path: Path, data, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def with_(**sections) -> dict:
    """MINIMAL plus extra keys; a section given as a dict is merged into MINIMAL's."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in MINIMAL.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


def problems(path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value.problems


# ------------------------------------------------------------------ defaults


def test_minimal_config_gets_documented_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, Config)
    assert (cfg.output_dir, cfg.model.path, cfg.data.path) == ("out", "some/model", "images")
    assert cfg.model.family == "auto"
    assert cfg.model.text_encoder_out_layers is None
    assert cfg.model.bypass_guidance is False
    assert cfg.data.resolution == 512
    assert cfg.data.caption_extension == ".txt"
    assert cfg.data.repeats == 1
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (16, None, 0.0, "attention")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.scheduler, cfg.optim.warmup_steps) == ("adamw", 1e-4, "constant", 0)
    assert cfg.optim.max_grad_norm == 1.0
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum) == (1000, 1, 1)
    assert cfg.train.mixed_precision == "auto"
    assert cfg.train.guidance is None
    assert cfg.train.sigma.sampling == "logit_normal"
    assert cfg.train.sigma.shift == "auto"


@pytest.mark.parametrize("missing", ["output_dir", "model", "data"])
def test_required_keys(tmp_path, missing):
    data = {k: v for k, v in MINIMAL.items() if k != missing}
    assert problems(write(tmp_path, data)) == [f"{missing}: required key is missing"]


def test_config_is_frozen(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        cfg.lora.rank = 4


# ------------------------------------------------------------------ misspelt keys


@pytest.mark.parametrize(
    "data, key, guess",
    [
        (with_(lora={"rnak": 4}), "lora.rnak", "lora.rank"),
        (with_(train={"max_stepz": 10}), "train.max_stepz", "train.max_steps"),
        (with_(train={"sigma": {"shfit": 3.0}}), "train.sigma.shfit", "train.sigma.shift"),
        ({**MINIMAL, "outptu_dir": "x"}, "outptu_dir", "output_dir"),
    ],
)
def test_misspelt_key_names_key_and_suggestion(tmp_path, data, key, guess):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    (line,) = [p for p in info.value.problems if p.startswith(key)]
    assert line.startswith(f"{key}: unknown key")
    assert f"did you mean '{guess}'" in line
    assert f"did you mean '{guess}'" in str(info.value)


def test_unrelated_unknown_key_has_no_guess(tmp_path):
    (line,) = problems(write(tmp_path, with_(lora={"zzzzzz": 1})))
    assert line.startswith("lora.zzzzzz: unknown key")
    assert "did you mean" not in line


def test_all_problems_reported_at_once(tmp_path):
    data = with_(
        lora={"rnak": 4},
        train={"max_stepz": 10},
        data={"resolution": 500},
        optim={"lr": -1},
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    lines = str(info.value).splitlines()
    assert len(lines) == 5  # header + 4 problems
    assert "(4 problems)" in lines[0]
    assert sorted(line.split(":")[0].strip(" -") for line in lines[1:]) == [
        "data.resolution", "lora.rnak", "optim.lr", "train.max_stepz",
    ]


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    "override, key, text",
    [
        ("data.resolution=500", "data.resolution", "multiple of 16"),
        ("optim.lr=-1e-4", "optim.lr", "greater than 0"),
        ("train.mixed_precision=fp8", "train.mixed_precision", "'bf16'"),
        ("lora.rank=0", "lora.rank", "greater than or equal to 1"),
        ("model.text_encoder_out_layers=[]", "model.text_encoder_out_layers", "non-empty"),
        ("train.sigma.shift=-2", "train.sigma.shift", "> 0"),
    ],
)
def test_bad_value_line_names_its_key(tmp_path, override, key, text):
    (line,) = problems(write(tmp_path, MINIMAL), [override])
    assert line.startswith(f"{key}: ")
    assert text in line


@pytest.mark.parametrize("warmup, max_steps", [(10, 10), (11, 10)])
def test_warmup_must_be_below_max_steps(tmp_path, warmup, max_steps):
    overrides = [f"optim.warmup_steps={warmup}", f"train.max_steps={max_steps}"]
    (line,) = problems(write(tmp_path, MINIMAL), overrides)
    assert "optim.warmup_steps" in line and "train.max_steps" in line


def test_warmup_just_below_max_steps_is_fine(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["optim.warmup_steps=9", "train.max_steps=10"])
    assert cfg.optim.warmup_steps == 9


# ------------------------------------------------------------------ overrides


def test_overrides(tmp_path):
    path = write(tmp_path, with_(lora={"rank": 8}, train={"guidance": 3.5}))
    cfg = load_config(
        path,
        [
            "train.max_steps=7",
            "lora.rank=4",
            "lora.targets=[a, b]",
            "model.text_encoder_out_layers=[1,2,3]",
            "train.guidance=null",
        ],
    )
    assert cfg.train.max_steps == 7
    assert cfg.lora.rank == 4  # the override beats the file
    assert cfg.lora.targets == ["a", "b"]
    assert cfg.model.text_encoder_out_layers == (1, 2, 3)
    assert cfg.train.guidance is None  # was 3.5 in the file


def test_override_creates_missing_sections(tmp_path):
    path = write(tmp_path, MINIMAL)  # no train section at all
    cfg = load_config(path, ["train.sigma.sampling=uniform"])
    assert cfg.train.sigma.sampling == "uniform"
    assert cfg.train.max_steps == 1000  # the rest of the new section keeps its defaults


def test_overrides_without_file():
    cfg = load_config(None, ["output_dir=o", "model.path=m", "data.path=d", "data.resolution=1024"])
    assert (cfg.output_dir, cfg.data.resolution) == ("o", 1024)


@pytest.mark.parametrize("bad", ["foo", "=3"])
def test_malformed_override(tmp_path, bad):
    (line,) = problems(write(tmp_path, MINIMAL), [bad])
    assert repr(bad) in line and "key.path=value" in line


def test_override_inside_a_scalar(tmp_path):
    (line,) = problems(write(tmp_path, MINIMAL), ["output_dir.x=1"])
    assert line.startswith("output_dir: is a value")


def test_misspelt_override_key(tmp_path):
    (line,) = problems(write(tmp_path, MINIMAL), ["lora.rnak=4"])
    assert "lora.rnak" in line and "did you mean 'lora.rank'" in line


# ------------------------------------------------------------------ files


def test_yaml_error_names_file(tmp_path):
    path = write(tmp_path, "output_dir: out\nmodel: [unclosed\n", "broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not valid YAML" in str(info.value)


def test_missing_file_names_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_top_level_must_be_mapping(tmp_path):
    (line,) = problems(write(tmp_path, "- a\n- b\n"))
    assert "mapping" in line


def test_validation_error_names_file(tmp_path):
    path = write(tmp_path, with_(lora={"rnak": 4}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value).splitlines()[0]


# ------------------------------------------------------------------ CLI


def test_cli_validate_bad_override(tmp_path, capsys):
    from fluxtune.cli import main

    assert main(["validate", str(write(tmp_path, MINIMAL)), "lora.rnak=4"]) == 2
    captured = capsys.readouterr()
    assert "lora.rnak" in captured.err
    assert "did you mean 'lora.rank'" in captured.err
    assert captured.out == ""


def test_cli_validate_prints_round_trippable_yaml(tmp_path, capsys):
    from fluxtune.cli import main

    data = with_(
        lora={"targets": ["to_q", "to_k"], "alpha": 8},
        model={"text_encoder_out_layers": [1, 2, 3], "family": "flux2"},
        optim={"betas": [0.9, 0.99], "eps": 1e-6, "scheduler": "cosine", "warmup_steps": 5},
        train={"guidance": 4.0, "sigma": {"sampling": "shift", "shift": 3.0}},
    )
    path = write(tmp_path, data)
    assert main(["validate", str(path), "train.max_steps=50"]) == 0
    printed = capsys.readouterr().out
    expected = load_config(path, ["train.max_steps=50"])
    again = load_config(write(tmp_path, printed, "printed.yaml"))
    assert again == expected
    assert again.train.max_steps == 50


# ------------------------------------------------------------------ shipped configs

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_shipped_configs_present():
    assert len(SHIPPED) >= 7, [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.output_dir and cfg.model.path and cfg.data.path
