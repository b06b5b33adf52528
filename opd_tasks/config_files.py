"""Config files: YAML loading with `--set a.b=c` overrides, the resolved config as YAML, and docs/config.md.

The model tree itself is opd_tasks/config.py. `python -m opd_tasks.config_files` prints docs/config.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from opd_tasks.config import RunConfig
from opd_tasks.errors import ConfigError

#: The embedded default config (`make run`): the repository's configs/testbed.yaml, found relative to this file
#: (so from any working directory of a source checkout or editable install). It is not packaged: an installed
#: wheel without the repository falls back to the defaults of opd_tasks/config.py.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "testbed.yaml"


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (value {e['input']!r})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e["input"]
            if path == "remote" and isinstance(got, str):  # never echo a password from a URI
                from storage.remote import redact

                got = redact(got)
            # a whole section as the bad value says nothing the message does not (e.g. a moved key)
            lines.append(f"  {path}: {msg}" if isinstance(got, dict) else f"  {path}: {msg} (got {got!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `--set a.b=c` override. The value is read as YAML (so `0.7`, `true`, `[1, 2]` work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a plain dict; unknown keys are caught later by validation."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain YAML keeps the last
    silently, so an edited config may not run what it seems to say)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 - PyYAML's signature
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"the key {key!r} is given twice (first on line "
                    f"{seen[key].line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory, expected a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (default: configs/testbed.yaml) and apply `--set` overrides."""
    source = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    data = read_yaml(source) if source.exists() or path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(source))) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_reference_markdown() -> str:
    """docs/config.md, generated from the model tree (a test checks the committed file is current)."""
    lines = [
        "# Config reference",
        "",
        "Generated from `opd_tasks/config.py` by `python -m opd_tasks.config_files > docs/config.md`; do not edit by "
        "hand.",
        "Set keys in a YAML file (`--config F`) or on the command line (`--set section.key=value`).",
        "Unknown keys, wrong types and out-of-range values are errors that name the key path.",
        "",
    ]

    def walk(model: BaseModel, prefix: str) -> None:
        rows = []
        subs = []
        for name, field in type(model).model_fields.items():
            ann = field.annotation
            default = getattr(model, name)
            if isinstance(default, BaseModel):
                subs.append((f"{prefix}{name}", default))
                continue
            typ = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            rows.append(f"| `{prefix}{name}` | `{typ}` | `{default!r}` | {field.description or ''} |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
            lines.extend([f"## {title}", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"])
            lines.extend(rows)
            lines.append("")
        for sub_prefix, sub in subs:
            walk(sub, sub_prefix + ".")

    walk(RunConfig(), "")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(config_reference_markdown())
