"""Counts of the reliability tests, merged into the JSON file named by ``LORASHARE_RELIABILITY_REPORT``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict


def report(section: str, data: Dict) -> None:
    """Merge ``{section: data}`` into the report file (no-op when the variable is unset)."""
    path = os.environ.get("LORASHARE_RELIABILITY_REPORT")
    if not path:
        return
    try:
        current = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        current = {}
    current[section] = data
    Path(path).write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
