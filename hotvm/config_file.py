"""Reading hotvm.yaml: strict YAML (a key given twice is refused), then validation into hotvm.config.

Config errors become one message that names the file, the key path and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from hotvm.child_env import register_config
from hotvm.config import CONFIG_ENV, DEFAULT_CONFIG, Config
from hotvm.errors import ConfigError


def config_path(path: Path | str | None = None) -> Path:
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key (check the spelling; see docs/config.md)")
        elif err["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def parse_config(data: object, source: Path | None = None) -> Config:
    where = source or "configuration"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with 'hosts:' and 'targets:'", "see docs/config.md")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where} is invalid: {_describe_validation_error(exc)}", "fix the file") from None
    config.source = source
    register_config(config)  # its *_env variables are withheld from every child process from now on
    return config


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML silently keeps the last one,
    so a second `hosts:` or `password_env:` would quietly replace the first. Merge keys (<<) still work."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _DuplicateKey(f"duplicate key '{key}' (first given at line {first[key]})", line)
                first[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                pass
        return super().construct_mapping(node, deep)


def load_config(path: Config | Path | str | None = None) -> Config:
    """The configuration from `path` (default: $HOTVM_CONFIG, ./hotvm.yaml); a Config is returned as is, so
    every plain function can take either a path or an already loaded Config."""
    if isinstance(path, Config):
        return path
    source = config_path(path)
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {source} not found",
            f"create it (see docs/config.md) or pass --config / set {CONFIG_ENV}",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {source}: {exc.strerror}", "check its permissions"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{source}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})", "save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKey as exc:
        raise ConfigError(f"{source}:{exc.line}: {exc}", "keep only one of them") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source} is not valid YAML{at}", "fix the indentation or quoting there") from None
    return parse_config(data, source)
