"""From text to the data a config is validated from, and pydantic's errors back to text.

    data = apply_overrides(safe_load(text), ["train.max_steps=10"])   # YAML, then a.b=value
    lines = problems(validation_error.errors(), data, Config)         # one line per key

YAML parsing that fails with one readable line whatever PyYAML raises, `a.b=value` overrides,
keys made strings, and pydantic's error locations turned into the dotted keys a user wrote, with a
did-you-mean for misspelt ones. The schema itself is `fluxtune.config`.
"""

from __future__ import annotations

import difflib
import re
import reprlib
import typing
from typing import Any

import yaml
from pydantic import BaseModel


class ConfigError(ValueError):
    """A config that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid config{f' {source}' if source else ''} ({len(problems)} problem{'s' * (len(problems) != 1)}):"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def safe_load(text: str) -> Any:
    """yaml.safe_load; every failure becomes a ValueError with a one-line reason.

    Besides YAMLError, PyYAML's constructors raise plain ValueError, KeyError or AttributeError for
    malformed scalars (`2001-02-30`, `!!bool x`, `!!timestamp x`), and its composer recurses once
    per nesting level (RecursionError on `[[[[...`).
    """
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(_one_line(f"{e.context + ': ' if e.context else ''}{e.problem or ''}") + where) from None
    except Exception as e:  # see the docstring: PyYAML raises many plain exception types
        raise ValueError(_one_line(f"{e}") or type(e).__name__) from None


def _show_key(part: str | int) -> str:
    """One part of a dotted key as the user can find it: quoted when it is empty or has dots,
    spaces or unprintable characters (a YAML key can be any string)."""
    if isinstance(part, int) or (re.fullmatch(r"[\w+\-@/~]+", part) and part.isprintable()):
        return str(part)
    return repr(part)


def _dotted(parts) -> str:
    return ".".join(_show_key(p) for p in parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (`3`, `true`, `[1,2]`, `null`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {item!r} is not of the form key.path=value"])
    path = [part.strip() for part in key.split(".")]
    if not all(path):
        raise ConfigError([f"override {item!r}: {key.strip()!r} has an empty key name; write key.path=value"])
    try:
        value = safe_load(raw) if raw.strip() else ""
    except ValueError as e:
        raise ConfigError([f"override {item!r}: the value is not valid YAML ({e})"]) from None
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError([f"{_dotted(path[: i + 1])}: is a value, cannot set {item!r} inside it"])
            node = child
        node[path[-1]] = value
    return data


def _key_text(key) -> str:
    if isinstance(key, str):
        return key
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def string_keys(node, depth: int = 6, memo: dict | None = None):
    """A copy of `node` whose mapping keys are all strings: YAML allows `1:`, `null:` or `true:`,
    which pydantic would report without naming the key. Sections sit at most 4 levels deep;
    deeper data is left as it is (it may be cyclic: YAML anchors can build loops)."""
    if depth == 0 or not isinstance(node, (dict, list)):
        return node
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, list):
        out = memo[id(node)] = []
        out.extend(string_keys(v, depth - 1, memo) for v in node)
        return out
    out = memo[id(node)] = {}
    for k, v in node.items():
        out[_key_text(k)] = string_keys(v, depth - 1, memo)
    return out


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `SamplePrompt`, `list[SamplePrompt | str]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if found := _model_in(arg):
            return found
    return None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section that contains `loc` (for did-you-mean)."""
    for part in loc[:-1]:
        if isinstance(part, int):  # a list index: same model
            continue
        model = _model_in(getattr(model.model_fields.get(str(part)), "annotation", None))
        if model is None:
            return []
    return list(model.model_fields)


# pydantic adds the union member it tried to the location (`lora.targets.list[str]`): not a key.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|(list|tuple|literal|dict)\[.*\]|function-.*|[A-Z]\w*)$")


def _key_path(loc: tuple, data) -> tuple:
    """The parts of an error location that are keys or list indices, found by walking the input:
    a union member's name is dropped unless the input has a key of that name (`Rank`, `None`)."""
    parts, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        elif isinstance(part, str) and _UNION_MEMBER.match(part):
            continue
        else:  # a missing key: nothing below it in the input
            node = None
        parts.append(part)
    return tuple(parts)


_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 3, 40, 40, 4, 4


def _format_error(err: dict, data, schema: type[BaseModel]) -> tuple[str, str]:
    """(dotted key, problem) for one pydantic error."""
    if not err["loc"]:  # a cross-field check: its message names its keys
        key, _, msg = err["msg"].removeprefix("Value error, ").partition(": ")
        return key, msg
    loc = _key_path(err["loc"], data)
    key = _dotted(loc) or "the top level"
    if err["type"] == "extra_forbidden":
        known = _fields_at(schema, loc)
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{_dotted(loc[:-1] + (guess[0],))}'?" if guess else ""
        return key, f"unknown key{hint} (known here: {', '.join(known)})"
    if err["type"] == "missing":
        return key, "required key is missing"
    return key, _one_line(err["msg"].removeprefix("Value error, ").replace("Input should be ", "should be ", 1))


def problems(errors: list[dict], data, schema: type[BaseModel]) -> list[str]:
    """One line per key; a value that fits no member of a union lists what each member wanted."""
    by_key: dict[str, list[str]] = {}
    inputs: dict[str, object] = {}
    for err in errors:
        key, msg = _format_error(err, data, schema)
        if msg not in by_key.setdefault(key, []):
            by_key[key].append(msg)
        if err["loc"]:  # cross-field checks get the whole config as input: not worth showing
            inputs.setdefault(key, err.get("input"))
    lines = []
    for key, msgs in by_key.items():
        # A union whose model branch reported problems inside the value: its "should be a valid
        # string" branch is noise.
        if any(k.startswith(key + ".") for k in by_key) and all(m.startswith("should be a valid") for m in msgs):
            continue
        line = f"{key}: {' or '.join(msgs)}"
        if key in inputs and not msgs[0].startswith(("unknown key", "required key")):
            shown = _short.repr(inputs[key])  # bounded depth and length: inputs can be deep or cyclic
            line += f" (got {shown[:57] + '...' if len(shown) > 60 else shown})"
        lines.append(line)
    return lines
