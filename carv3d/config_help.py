"""What every config key means: ``carv3d train --help-config`` and ``carv3d config show --describe``.

Each key's description is stated once, next to its default in :mod:`carv3d.config` (field metadata
``help``, see :mod:`carv3d.config_ranges`); a section's is the first line of its dataclass's
docstring. This module adds the valid range (numeric keys) or the choices, and prints a resolved
config as YAML with one comment per key, itself a valid config file.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from carv3d.config import CHOICES, SEAMS, Config, _numeric_specs, _types, load_config
from carv3d.config_ranges import walk_help


def key_help(cfg: Optional[DictConfig] = None) -> dict[str, str]:
    """Dotted key → one line: its description, then its range or choices, for the seam types of
    ``cfg`` (the defaults when None). Sections are keys too (``train`` → "The training loop: …")."""
    cfg = load_config() if cfg is None else cfg
    types = _types(**{seam: str(cfg[seam].type) for seam in SEAMS})
    chosen = dict(types)

    def choose(key: str, declared: type) -> type:
        return SEAMS[key][chosen[key]] if key in SEAMS else declared

    ranges = {item.key: item.spec.describe() for item in _numeric_specs(types)}
    lines: dict[str, str] = {}
    for key, text in walk_help(Config, choose=choose):
        text = text.replace("``", "")
        extra = ranges.get(key) or (f"one of: {', '.join(CHOICES[key])}" if key in CHOICES else "")
        if " | " in text:  # the description lists the choices itself
            extra = ""
        if key.endswith(".type") and key.split(".")[0] in SEAMS:
            extra = f"one of: {', '.join(SEAMS[key.split('.')[0]])}"
        lines[key] = f"{text} ({extra})" if text and extra else text or extra
    return lines


def _flow(value: Any) -> str:
    """One value as YAML on one line (``[0.9, 0.99]``, ``auto``, ``''``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=True).strip()
    return text[:-3].strip() if text.endswith("...") else text


def commented_yaml(cfg: DictConfig, descriptions: Optional[dict[str, str]] = None) -> str:
    """``cfg`` as YAML, each key followed by ``# its description`` (sections: a comment line above)."""
    descriptions = key_help(cfg) if descriptions is None else descriptions
    data = OmegaConf.to_container(cfg, resolve=True)
    out: list[str] = []

    def walk(node: dict, prefix: str, indent: str) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            text = descriptions.get(key, "")
            if isinstance(value, dict):
                if text:
                    out.append(f"{indent}# {text}")
                out.append(f"{indent}{name}:")
                walk(value, key + ".", indent + "  ")
            else:
                out.append(f"{indent}{name}: {_flow(value)}" + (f"  # {text}" if text else ""))

    walk(data, "", "")
    return "\n".join(out) + "\n"
