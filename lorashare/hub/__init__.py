"""The Hugging Face Hub: every call to it, under one deadline (:mod:`.client`), and the model card
(:mod:`.card`).

``lorashare.hub`` re-exports the client's functions, which the fronts and the Space use.  Each Hub
operation runs under one deadline, retries included: ``LORASHARE_HUB_TIMEOUT`` seconds, 60 by default.

Example:
    >>> from lorashare import hub
    >>> hub.parse_adapter_id("acme/multi-lora/legal@v3").subfolder
    'legal'
"""

from .client import (
    DEFAULT_TIMEOUT,
    TIMEOUT_ENV,
    HubRef,
    cache_roots,
    check_repo_id,
    disable_progress_bars,
    endpoint,
    fetch_adapter,
    fetch_checkpoint,
    fetch_config,
    fetch_files,
    fetch_verified,
    hub_timeout,
    is_hub_id,
    is_local_path,
    parse_adapter_id,
    push_folder,
    push_saved,
    push_space,
    redact,
    remote_sizes,
    resolve_revision,
    snapshot_commit,
    trusted_publishing_token,
)

__all__ = [
    "DEFAULT_TIMEOUT", "TIMEOUT_ENV", "HubRef", "cache_roots", "check_repo_id", "disable_progress_bars", "endpoint",
    "fetch_adapter", "fetch_checkpoint", "fetch_config", "fetch_files", "fetch_verified", "hub_timeout", "is_hub_id",
    "is_local_path", "parse_adapter_id", "push_folder", "push_saved", "push_space", "redact", "remote_sizes", "resolve_revision", "snapshot_commit",
    "trusted_publishing_token",
]
