"""Property tests: whatever a config file or an override holds, loading it either gives a `Config`
or raises `ConfigError` with one line per problem, each starting with the key it is about.

Random nested data, a full valid config mutated (keys deleted, misspelt, values of the wrong type,
unknown sections), arbitrary override text, and pathological inputs (deep nesting, cyclic YAML
aliases, non-string keys, NaN). Never a TypeError, RecursionError or a YAML exception.
"""

import math
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxtune.config import Config, ConfigError, build_config, load_config

# Example counts keep the module within ~10 s on one core (YAML parsing is the slow part).
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOP_LEVEL = set(Config.model_fields)
# Lines that are about the whole input rather than one key.
WHOLE_INPUT = ("override ", "the top level", "not valid YAML", "cannot read config file")

# A config that uses every section, so mutations reach every kind of field.
FULL = {
    "output_dir": "runs/x",
    "model": {"path": "some/model", "family": "flux2", "revision": "main", "text_encoder_out_layers": [1, 2, 3],
              "bypass_guidance": False, "max_sequence_length": 256},
    "data": {"path": "images", "resolution": 512, "default_caption": "a photo", "caption_extension": ".txt",
             "repeats": 2, "cache_dir": "cache", "num_workers": 0},
    "lora": {"rank": 8, "alpha": 8.0, "dropout": 0.1, "targets": ["to_q", "to_k"]},
    "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.99], "eps": 1e-8,
              "max_grad_norm": 1.0, "scheduler": "cosine", "warmup_steps": 5},
    "train": {"max_steps": 100, "batch_size": 2, "grad_accum": 1, "seed": 3, "mixed_precision": "auto",
              "guidance": 3.5, "save_every": 50, "gradient_checkpointing": True, "ema_decay": 0.99,
              "sigma": {"sampling": "shift", "logit_mean": 0.0, "logit_std": 1.0, "shift": 3.0}},
    "log": {"backend": "none", "project": "p", "run_name": "r", "tags": ["a", "b"], "every": 5, "artifacts": False},
    "sample": {"every": 10, "prompts": ["a cat", {"prompt": "a dog", "seed": 2, "width": 512, "height": 512,
                                                   "steps": 4, "guidance": 1.0}],
               "steps": 4, "guidance": 2.0, "before_training": False},
    "eval": {"every": 10, "fraction": 0.2, "path": None, "sigmas": [0.25, 0.75], "seed": 7},
}


def test_full_config_is_valid():
    assert isinstance(build_config(FULL), Config)


# ------------------------------------------------------------------ strategies

weird_floats = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, -1e-308, 5e-324])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([-1, 0, 2**63, -(2**63), 10**40, -(10**40)]),
    st.floats(allow_nan=True, allow_infinity=True),
    weird_floats,
    st.text(max_size=20),
    st.sampled_from(["", " ", "auto", "\x00", "\n", "a\nb", "ünïcödé ✓", "🙂", "\u202e", "1e400", "null"]),
    st.binary(max_size=8),  # YAML's !!binary
    st.dates(),  # YAML's timestamps
)
# YAML allows any scalar as a mapping key (`1: x`, `null: x`, `true: x`, `1.5: x`).
keys = st.one_of(st.text(max_size=12), st.sampled_from(sorted(TOP_LEVEL) + ["path", "rank", "sigma"]),
                 st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False))
nested = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)


def _typo(name: str, draw) -> str:
    """A misspelling: drop, double, swap or change one character."""
    if not name:
        return "x"
    i = draw(st.integers(0, len(name) - 1))
    kind = draw(st.sampled_from(["drop", "double", "swap", "change", "case"]))
    if kind == "drop" and len(name) > 1:
        return name[:i] + name[i + 1:]
    if kind == "double":
        return name[:i] + name[i] + name[i:]
    if kind == "swap" and i + 1 < len(name):
        return name[:i] + name[i + 1] + name[i] + name[i + 2:]
    if kind == "case":
        return name.upper()
    return name[:i] + draw(st.sampled_from(string.ascii_lowercase + "_-. ")) + name[i + 1:]


def _containers(node, path=()):
    """(path, container) for every dict and list in `node`, the root included."""
    if isinstance(node, (dict, list)):
        yield path, node
        children = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in children:
            yield from _containers(child, path + (key,))


def _copy(node):
    if isinstance(node, dict):
        return {k: _copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy(v) for v in node]
    return node


@st.composite
def mutated_configs(draw):
    data = _copy(FULL)
    for _ in range(draw(st.integers(1, 4))):
        containers = list(_containers(data))
        _, node = draw(st.sampled_from(containers))
        slots = list(node) if isinstance(node, dict) else list(range(len(node)))
        action = draw(st.sampled_from(["delete", "rename", "replace", "replace", "insert", "unknown_section"]))
        if action == "unknown_section":
            data[draw(st.text(min_size=1, max_size=10))] = draw(nested)
        elif action == "insert" or not slots:
            if isinstance(node, dict):
                node[draw(keys)] = draw(nested)
            else:
                node.append(draw(nested))
        else:
            slot = draw(st.sampled_from(slots))
            if action == "delete":
                del node[slot]
            elif action == "rename" and isinstance(node, dict):
                new = _typo(str(slot), draw)
                node[new] = node.pop(slot)
            else:
                node[slot] = draw(nested)
    return data


def key_text(key) -> str:
    """How YAML spells a non-string key (`null: x`, `true: x`, `1: x`)."""
    if key is None:
        return "null"
    return str(key).lower() if isinstance(key, bool) else str(key)


def check(outcome, data=None, extra_heads: set[str] = frozenset()):
    """`outcome` is a Config, or a ConfigError whose every line starts with a key of the input or
    the schema (or is about the input as a whole)."""
    if isinstance(outcome, Config):
        return
    assert isinstance(outcome, ConfigError), repr(outcome)
    assert outcome.problems, "a ConfigError with no problems"
    heads = TOP_LEVEL | set(extra_heads)
    if isinstance(data, dict):
        heads |= {key_text(k) for k in data}
    # A key part may be quoted, when it is empty or holds dots, spaces or unprintable characters.
    shown = heads | {repr(h) for h in heads}
    for line in outcome.problems:
        assert not any(c in line for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), f"a problem spans lines: {line!r}"
        if line.startswith(WHOLE_INPUT):
            continue
        head = next((h for h in shown if line.startswith(h + ": ") or line.startswith(h + ".")), None)
        assert head is not None, f"{line!r} does not start with a key of the input or the schema"
        key, sep, message = line.partition(": ") if line.startswith(head + ": ") else (line, "", "")
        if not sep:  # a longer path: the rest of it holds no empty part
            rest = line[len(head) + 1:]
            assert rest and not rest.startswith((".", ":")), f"empty key part in {line!r}"
            assert ": " in rest, f"no 'key: problem' in {line!r}"
        else:
            assert message, f"no problem after the key in {line!r}"
    str(outcome)  # the message itself renders


def outcome_of(fn, *args):
    try:
        return fn(*args)
    except ConfigError as e:
        return e


# ------------------------------------------------------------------ build_config


@FAST
@given(nested)
def test_random_data(data):
    check(outcome_of(build_config, data), data)


@FAST
@given(st.dictionaries(keys, nested, max_size=6))
def test_random_mappings(data):
    check(outcome_of(build_config, data), data)


@settings(FAST, max_examples=200)
@given(mutated_configs())
def test_mutated_valid_config(data):
    check(outcome_of(build_config, data), data)


@FAST
@given(st.sampled_from(sorted(TOP_LEVEL - {"output_dir"})), st.dictionaries(keys, nested, max_size=5))
def test_random_sections(section, content):
    data = _copy(FULL) | {section: content}
    check(outcome_of(build_config, data), data)


@pytest.mark.parametrize(
    "path",
    ["optim.lr", "optim.eps", "optim.max_grad_norm", "optim.weight_decay", "lora.alpha", "lora.dropout",
     "train.sigma.shift", "train.sigma.logit_mean", "train.sigma.logit_std", "train.guidance", "train.ema_decay",
     "sample.guidance", "eval.fraction"],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_rejected_by_key(path, value):
    data = _copy(FULL)
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError) as info:
        build_config(data)
    assert [line.split(":")[0] for line in info.value.problems] == [path]


@pytest.mark.parametrize("key", [1, None, True, 2.5])
@pytest.mark.parametrize("where", ["top", "lora", "train.sigma", "sample.prompts.1"])
def test_non_string_keys_are_unknown_keys(where, key):
    data = _copy(FULL)
    node = data
    if where != "top":
        for p in where.split("."):
            node = node[int(p)] if isinstance(node, list) else node[p]
    node[key] = "x"
    with pytest.raises(ConfigError) as info:
        build_config(data)
    (line,) = info.value.problems
    prefix = "" if where == "top" else where + "."
    shown = "'2.5'" if key == 2.5 else key_text(key)  # a key with a dot is quoted
    assert line.startswith(f"{prefix}{shown}: unknown key")


@pytest.mark.parametrize(
    "section, key, expected",
    [(None, "Lora", "Lora: unknown key; did you mean 'lora'?"), ("lora", "Rank", "lora.Rank: unknown key; did you mean 'lora.rank'?"),
     ("lora", "str", "lora.str: unknown key"), ("lora", "None", "lora.None: unknown key"),
     ("lora", "", "lora.'': unknown key"), ("lora", "a b", "lora.'a b': unknown key"), ("lora", "a.b", "lora.'a.b': unknown key")],
)
def test_key_names_that_look_like_type_names_or_are_odd(section, key, expected):
    """pydantic names the union member it tried in an error location (`str`, `SamplePrompt`); a
    key of the same shape is still the user's key."""
    data = _copy(FULL)
    (data[section] if section else data)[key] = 1
    with pytest.raises(ConfigError) as info:
        build_config(data)
    (line,) = info.value.problems
    assert line.startswith(expected)


def _deep(depth, leaf="x", kind="dict"):
    node = leaf
    for _ in range(depth):
        node = {"a": node} if kind == "dict" else [node]
    return node


@pytest.mark.parametrize("depth", [50, 3000])
@pytest.mark.parametrize("kind", ["dict", "list"])
@pytest.mark.parametrize("where", ["unknown", "lora.targets", "sample.prompts", "model"])
def test_deep_nesting(where, kind, depth):
    data = _copy(FULL)
    node, *rest = where.split(".")
    if where == "unknown":
        data["zzz"] = _deep(depth, kind=kind)
    elif rest:
        data[node][rest[0]] = _deep(depth, kind=kind)
    else:
        data[node] = _deep(depth, kind=kind)
    check(outcome_of(build_config, data), data)


@pytest.mark.parametrize("where", ["top", "lora", "lora.targets", "sample.prompts"])
def test_cyclic_data(where):
    """YAML anchors can build cycles (`a: &x [*x]`), which safe_load returns as they are."""
    data = _copy(FULL)
    loop: list = []
    loop.append(loop)
    ring: dict = {}
    ring["a"] = ring
    if where == "top":
        data["zzz"] = ring
    elif where == "lora":
        data["lora"]["targets"] = ring
        data["lora"]["zzz"] = loop
    else:
        section, key = where.split(".")
        data[section][key] = loop
    check(outcome_of(build_config, data), data)


# ------------------------------------------------------------------ YAML files and overrides

_tmp = Path(tempfile.mkdtemp(prefix="fluxtune-config-fuzz-"))
_file = _tmp / "run.yaml"

yaml_snippets = st.sampled_from([
    "", "~", "null", "[", "]", "{", "}", "{a: 1", "[1, [2]", "&x [*x]", "*x", "!!python/object:os.system x",
    "!!binary aGk=", "2001-01-01", "2001-01-01T00:00:00Z", ".nan", "-.inf", "0x10", "0o7", "1_000", "1e400",
    "'unterminated", '"\\x00"', "\x00", "\t", "%YAML 1.2\n---\n1", "--- 1\n--- 2", "? [1]\n: 2", "{? [1]: 2}",
    "{1: 2}", "{null: 1}", "{true: 1}", "[[[[[[[[[[[[1]]]]]]]]]]]]",
    "a: &x {b: *x}", "!!set {a, b}", "!!omap [a: 1]", "!!str", "!!int x", "!!float x", "!!bool x",
    # PyYAML raises plain ValueError / KeyError / AttributeError for these, not YAMLError:
    "2001-02-30", "2001-01-01 25:00:00", "!!timestamp x", "!!int 0x", "!!bool maybe", "\x1f",
])


def _yaml_or_none(text):
    """The data a file holds, for naming the keys problems may start with."""
    try:
        return yaml.safe_load(text)
    except Exception:
        return None


@FAST
@given(st.one_of(st.text(max_size=60), yaml_snippets, nested.map(lambda d: yaml.safe_dump(d))))
def test_random_yaml_files(text):
    _file.write_text(text, encoding="utf-8")
    check(outcome_of(load_config, _file), _yaml_or_none(text))


@FAST
@given(st.binary(max_size=40))
def test_random_bytes_files(raw):
    _file.write_bytes(raw)
    check(outcome_of(load_config, _file), _yaml_or_none(raw))


@settings(FAST, max_examples=50)
@given(mutated_configs())
def test_mutated_yaml_files(data):
    text = yaml.safe_dump(data, allow_unicode=True)
    _file.write_text(text, encoding="utf-8")
    # Not `data`: PyYAML does not round-trip every key (it dumps "\x85" plain and reads back " ").
    check(outcome_of(load_config, _file), _yaml_or_none(text))


# PyYAML's composer recurses per level (RecursionError past ~330 levels) and its scanner is
# quadratic in open brackets, so these run once each rather than inside the properties above.
DEEP_YAML = {
    "list-500": "[" * 500 + "1" + "]" * 500,
    "open-500": "[" * 500,
    "map-500": "{a: " * 500 + "1" + "}" * 500,
    "block-500": "".join(" " * i + "a:\n" for i in range(500)) + " " * 500 + "1\n",
}


@pytest.mark.parametrize("text", DEEP_YAML.values(), ids=DEEP_YAML.keys())
def test_deeply_nested_yaml(text):
    _file.write_text(text, encoding="utf-8")
    check(outcome_of(load_config, _file))
    _file.write_text(yaml.safe_dump(FULL) + "zzz: " + text + "\n", encoding="utf-8")
    check(outcome_of(load_config, _file))
    for key in ("zzz", "lora.targets", "sample.prompts", "model"):
        check(outcome_of(load_config, None, ["output_dir=o", "model.path=m", "data.path=d", f"{key}={text}"]),
              None, {"zzz"})


def _paths(node, prefix=""):
    for key, value in node.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _paths(value, prefix + key + ".")


KNOWN_PATHS = sorted(_paths(FULL))
override_keys = st.one_of(
    st.sampled_from(KNOWN_PATHS),
    st.lists(st.one_of(st.sampled_from(sorted({p.split(".")[-1] for p in KNOWN_PATHS})), st.text(max_size=6)),
             min_size=1, max_size=4).map(".".join),
    st.text(max_size=20),
)
override_values = st.one_of(st.text(max_size=30), yaml_snippets, scalars.map(str),
                            nested.map(lambda d: yaml.safe_dump(d, default_flow_style=True).strip()))
overrides = st.lists(
    st.one_of(st.text(max_size=40), st.tuples(override_keys, override_values).map("=".join)), max_size=5
)


def _heads(items: list[str]) -> set[str]:
    """First key names of overrides (each part of a key path is stripped of spaces)."""
    return {item.partition("=")[0].split(".")[0].strip() for item in items}


@settings(FAST, max_examples=100)
@given(overrides)
def test_arbitrary_overrides_on_a_valid_file(items):
    _file.write_text(yaml.safe_dump(FULL), encoding="utf-8")
    check(outcome_of(load_config, _file, items), FULL, _heads(items))


@FAST
@given(overrides)
def test_arbitrary_overrides_without_a_file(items):
    check(outcome_of(load_config, None, items), None, _heads(items))


@pytest.mark.parametrize("item", ["a..b=1", ".=1", "lora.=4", ".lora=4", "lora..rank=4", " . =1"])
def test_override_with_an_empty_key_part(item):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["output_dir=o", "model.path=m", "data.path=d", item])
    (line,) = info.value.problems
    assert line.startswith("override ") and repr(item) in line
