"""The new-run form's fields, read off textune's typed config (`textune.config.Config` and its section
dataclasses: every key with its default, choices and help text), so a key added to the config appears in the
form with no change here; and the shipped configs (configs/*.yaml) to start from."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


def _kind(tp: Any) -> tuple[str, list[str] | None, bool]:
    """(input kind, fixed choices or None, may be empty) of a key annotated `tp`. Kinds: bool, int, float, str,
    choice, list, mapping; a union of a fixed set with something open (train.compile: auto or a bool) is a
    `choice` whose choices the form offers beside free text."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    optional = type(None) in args
    args = tuple(a for a in args if a is not type(None))
    choices = [str(v).lower() if isinstance(v, bool) else str(v)
               for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)]
    if any(a is bool for a in args) and choices:
        choices += ["true", "false"]
    if choices:
        return "choice", choices, optional
    base = args[0] if args else str
    origin = typing.get_origin(base) or base
    kind = {bool: "bool", int: "int", float: "float", list: "list", dict: "mapping"}.get(origin, "str")
    return kind, (["true", "false"] if kind == "bool" else None), optional


def config_fields() -> list[dict]:
    """Sections in config order, each {section, about, fields: [{key, kind, default, choices, optional, help}]};
    the top-level keys (task, output_dir, seed) are the section "run"."""
    from textune.config import Config

    sections: list[dict] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        section = {"section": prefix.rstrip(".") or "run", "about": (cls.__doc__ or "").strip(), "fields": []}
        sections.append(section)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            kind, choices, optional = _kind(tp)
            choices = list(f.metadata.get("choices") or ()) or choices
            if f.metadata.get("choices"):
                kind = "choice"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            section["fields"].append({"key": prefix + f.name, "kind": kind, "default": default,
                                      "choices": choices, "optional": optional, "help": f.metadata.get("help", "")})

    walk(Config, "")
    return sections


def config_dirs() -> list[Path]:
    """Where shipped configs are: ./configs (the working directory's, as the CLI reads paths), and the
    configs/ folder beside an editable install's source tree."""
    here = Path(__file__).resolve().parents[3] / "configs"
    return [p for p in dict.fromkeys((Path.cwd() / "configs", here)) if p.is_dir()]


def shipped_configs() -> dict[str, Path]:
    """{file name: path} of the shipped configs, the first folder's winning on a clash."""
    out: dict[str, Path] = {}
    for folder in config_dirs():
        for path in sorted(folder.glob("*.yaml")):
            out.setdefault(path.name, path)
    return out


def read_shipped(name: str) -> dict | None:
    path = shipped_configs().get(name)
    if path is None:
        return None
    from textune.config import parse_yaml  # its loader reads 3e-5 as a number, as the CLI does

    data = parse_yaml(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def yaml_text(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
