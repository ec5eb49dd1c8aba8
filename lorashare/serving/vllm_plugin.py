"""vLLM plugin: a LoRA resolver that serves the adapters of SHARE checkpoints.

vLLM loads it as the ``lorashare`` entry point of ``vllm.general_plugins``
(``VLLM_PLUGINS=lorashare``).  When a request's ``model`` names an adapter that is not loaded,
as ``ALIAS/ADAPTER``, the resolver rebuilds it through :class:`lorashare.serving.cache.AdapterCache`
and hands vLLM the folder.  Configuration is read from the environment:

* ``LORASHARE_VLLM_CHECKPOINTS``: ``alias=checkpoint`` pairs, comma-separated; a checkpoint is a
  Hub repo id with an optional ``@revision``, or a folder.
* ``LORASHARE_VLLM_CACHE``: the folder for rebuilt adapters (default
  ``$XDG_CACHE_HOME/lorashare/vllm``, else ``~/.cache/lorashare/vllm``).
* ``LORASHARE_VLLM_DTYPE``: ``float32`` (default), ``float16`` or ``bfloat16``, the dtype of the
  rebuilt factors on disk (vLLM casts them to the model's dtype when it loads them).
* ``LORASHARE_VLLM_REFRESH``: seconds before a Hub branch or tag is looked up again (default 60).
* ``HF_TOKEN``, ``HF_ENDPOINT``, ``LORASHARE_HUB_TIMEOUT``: as everywhere in lorashare.

vLLM asks resolvers only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``, and only in its OpenAI
server.  A name the resolver does not know gives vLLM's 404; a checkpoint that cannot be read
is logged on one line and gives a 404 too, while the other adapters keep being served.

Example (a shell)::

    VLLM_PLUGINS=lorashare VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 \\
    LORASHARE_VLLM_CHECKPOINTS="support=acme/support-share@v3" \\
    python -m vllm.entrypoints.openai.api_server --model meta-llama/Llama-3.1-8B --enable-lora
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Mapping, Optional

from ..errors import ConfigError, LoraShareError
from .cache import AdapterCache, parse_checkpoints

logger = logging.getLogger(__name__)

__all__ = ["ENV_CHECKPOINTS", "ENV_CACHE", "ENV_DTYPE", "ENV_REFRESH", "cache_from_env", "SHAREResolver", "register"]

ENV_CHECKPOINTS = "LORASHARE_VLLM_CHECKPOINTS"
ENV_CACHE = "LORASHARE_VLLM_CACHE"
ENV_DTYPE = "LORASHARE_VLLM_DTYPE"
ENV_REFRESH = "LORASHARE_VLLM_REFRESH"
RESOLVER_NAME = "lorashare"

try:  # vLLM is there when vLLM loads this plugin; without it, the resolver is a plain class (for tests, docs)
    from vllm.lora.resolver import LoRAResolver as _Resolver
except ImportError:  # pragma: no cover - depends on the environment
    _Resolver = object  # type: ignore[assignment,misc]


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/lorashare/vllm``, else ``~/.cache/lorashare/vllm``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lorashare", "vllm")


def cache_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[AdapterCache]:
    """The cache the environment configures, or None when ``LORASHARE_VLLM_CHECKPOINTS`` is unset or empty.

    Example:
        >>> cache_from_env({"LORASHARE_VLLM_CHECKPOINTS": "support=acme/support-share@v3"}).checkpoints["support"].location
        'acme/support-share'
    """
    env = os.environ if environ is None else environ
    refs = parse_checkpoints(env.get(ENV_CHECKPOINTS, ""))
    if not refs:
        return None
    refresh = env.get(ENV_REFRESH, "60")
    try:
        seconds = float(refresh)
        if not seconds >= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{ENV_REFRESH}={refresh!r} is not a number of seconds (0 or more).") from None
    dtype = env.get(ENV_DTYPE) or None
    try:
        return AdapterCache(refs, env.get(ENV_CACHE) or default_cache_dir(), dtype=dtype, refresh=seconds)
    except ConfigError as exc:
        raise ConfigError(f"{ENV_DTYPE}: {exc}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class SHAREResolver(_Resolver):  # type: ignore[misc,valid-type]
    """vLLM's ``LoRAResolver`` for ``ALIAS/ADAPTER`` names, backed by an :class:`~lorashare.serving.cache.AdapterCache`."""

    def __init__(self, cache: AdapterCache) -> None:
        self.cache = cache

    def folder(self, base_model_name: str, lora_name: str) -> Optional[str]:
        """The adapter's folder, or None (logged on one line) when it is unknown or cannot be had."""
        try:
            return self.cache.folder_for(lora_name, base_model=base_model_name)
        except LoraShareError as exc:
            logger.error("lorashare: cannot resolve %s: %s", lora_name, _one_line(exc))
        except Exception as exc:  # noqa: BLE001 - a resolver must never take the server down
            logger.error("lorashare: cannot resolve %s: %s: %s", lora_name, type(exc).__name__, _one_line(exc))
        return None

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        """vLLM's hook: a ``LoRARequest`` for the rebuilt folder, or None ("not found")."""
        if self.cache.split(lora_name) is None:  # not ours: no thread, no log
            return None
        folder = await asyncio.to_thread(self.folder, base_model_name, lora_name)  # downloads must not block serving
        if folder is None:
            return None
        from vllm.lora.request import LoRARequest

        # vLLM replaces the id with its own counter; it must only be positive here.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=folder)


def _log_like_vllm() -> None:
    """Show this package's log in the server's log, at vLLM's level, unless the application set up logging."""
    root, ours = logging.getLogger(), logging.getLogger("lorashare")
    if root.handlers or ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
    ours.addHandler(handler)
    ours.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())


def register() -> None:
    """The entry point: register the resolver if ``LORASHARE_VLLM_CHECKPOINTS`` names any checkpoint.

    vLLM calls it in each of its processes; it only reads the environment (no download).  A
    malformed configuration fails the server's start, naming the variable.
    """
    _log_like_vllm()
    cache = cache_from_env()
    if cache is None:
        logger.info("lorashare: %s is not set; no resolver registered", ENV_CHECKPOINTS)
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() not in ("1", "true"):
        logger.warning("lorashare: VLLM_ALLOW_RUNTIME_LORA_UPDATING is not set to 1, so vLLM will not ask resolvers "
                       "for adapters; set it to serve the checkpoints in %s", ENV_CHECKPOINTS)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, SHAREResolver(cache))
    logger.info("lorashare: resolving %s into %s", ", ".join(f"{a}/… from {r}" for a, r in cache.checkpoints.items()),
                cache.root)
