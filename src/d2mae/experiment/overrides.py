"""An experiment file's variables and overrides: ``${VAR}`` / ``${VAR:-default}`` from the environment, and
``--set key.sub=value`` (values parsed as YAML). Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import yaml

from d2mae.runtime.errors import D2maeError, shown

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, source: str, where: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in string values by environment variables (recursively)."""
    if isinstance(data, Mapping):
        return {k: expand_env(v, source, f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, source, where) for v in data]
    if isinstance(data, str) and "${" in data:
        def repl(m: re.Match) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                if m.group(2) is None:
                    raise D2maeError(f"option '{where}' in {source} uses ${{{m.group(1)}}} but the environment "
                                     f"variable {m.group(1)} is not set; set it or write ${{{m.group(1)}:-default}}")
                return m.group(2)
            return value
        return _ENV.sub(repl, data)
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set key.sub=value`` overrides (values parsed as YAML: numbers, lists, true/false)."""
    data = json.loads(json.dumps(data, default=str))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise D2maeError(f"{shown(item)}: use --set KEY=VALUE, e.g. "
                             "--set datasets.busbra.root=/data/bus-bra", option="set")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise D2maeError(f"{shown(item)}: the key is empty", option="set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) and not raw.strip().startswith("{"):
            value = raw  # "a: b" in free text is a string, not a mapping
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise D2maeError(f"{shown(item)}: '{'.'.join(parts[:i + 1])}' is a value, not a section", option="set")
            node = nxt
        node[parts[-1]] = value
    return data
