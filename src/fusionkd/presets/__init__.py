"""Named run settings for the papers' larger experiments, shipped as YAML files beside this module.

A preset is a config file (the schema of ``--config``) whose first comment lines give a one-line
``description:`` and a ``source:``. ``--config NAME`` (CLI, ``fusionkd compare``) and ``config="NAME"``
(API) accept a preset's name wherever they accept a file; ``fusionkd list`` lists them. Options given on
the command line or as keyword arguments override the preset's, so ``data_dir=``, ``weights=`` and a
shorter ``epochs=`` go on top.
"""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).parent
#: the published tables of ``fusionkd compare --table NAME`` (see :mod:`fusionkd.compare.tables`)
TABLE_DIR = PRESET_DIR / "tables"


def preset_path(name: str) -> Path | None:
    """The YAML file of preset ``name``, or None when there is none."""
    if not name or "/" in name or "\\" in name or name.endswith((".yaml", ".yml")):
        return None
    p = PRESET_DIR / f"{name}.yaml"
    return p if p.is_file() else None


def _header(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.lower().startswith(key + ":"):
            return text.split(":", 1)[1].strip()
    return ""


def list_presets() -> list[dict[str, str]]:
    """``[{name, description, source}]`` of every shipped preset, sorted by name."""
    return [{"name": p.stem, "description": _header(p, "description"), "source": _header(p, "source")}
            for p in sorted(PRESET_DIR.glob("*.yaml"))]


def list_tables() -> list[dict[str, str]]:
    """``[{name, title, source}]`` of every shipped table (``fusionkd compare --table NAME``), sorted by name."""
    import yaml

    out = []
    for p in sorted(TABLE_DIR.glob("*.yaml")):
        data = yaml.safe_load(p.read_text()) or {}
        out.append({"name": p.stem, "title": " ".join(str(data.get("title", "")).split()),
                    "source": " ".join(str(data.get("source", "")).split())})
    return out
