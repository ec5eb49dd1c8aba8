"""``lorashare sync``: a manifest of adapters (:mod:`.manifest`), the decision what to publish
(:mod:`.plan`, pure), fingerprints and the new checkpoint (:mod:`.apply`), the GitHub Actions
runner's I/O (:mod:`.github_actions`), and the driver (:mod:`.run`).

A front: it uses lorashare's public API only.

Example:
    >>> from lorashare.sync import run_sync  # doctest: +SKIP
    >>> run_sync("lorashare.yaml", dry_run=True).action  # doctest: +SKIP
    'create'
"""

from .apply import fingerprint_sources, read_published
from .manifest import (
    CARD_KEYS,
    COMPRESSION_KEYS,
    MAX_MANIFEST_BYTES,
    TOP_KEYS,
    AdapterSource,
    CardOptions,
    Compression,
    Manifest,
    ManifestError,
    load_manifest,
    parse_manifest,
    workspace_root,
)
from .plan import AdapterPlan, Plan, commit_message, plan_json, plan_sync
from .run import CheckResult, SyncResult, check_sync, run_sync

__all__ = [
    "ManifestError", "Compression", "CardOptions", "AdapterSource", "Manifest", "AdapterPlan", "Plan", "SyncResult",
    "CheckResult", "load_manifest", "parse_manifest", "workspace_root", "fingerprint_sources", "read_published",
    "plan_sync", "plan_json", "commit_message", "run_sync", "check_sync", "CARD_KEYS", "COMPRESSION_KEYS",
    "MAX_MANIFEST_BYTES", "TOP_KEYS",
]
