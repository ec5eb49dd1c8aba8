"""lorashare on a Hugging Face Space: compress Hub adapters into SHARE, explore SHARE checkpoints.

Run locally with ``python space/app.py`` (binds 127.0.0.1:7860; ``GRADIO_SERVER_NAME`` and
``GRADIO_SERVER_PORT`` change that).  On a Space, the platform sets them.

Everything the Space does goes through lorashare's public API (``SHAREModel``, ``lorashare.hub``,
``lorashare.hub.card``, ``lorashare.format.checkpoint``), including the size and access check before any
download (``lorashare.hub.remote_sizes``).  Deployed by ``space/deploy.py``, which puts the
lorashare package next to this file: the Space needs nothing of lorashare from the index.

Security rules this file keeps:

* Only the token the visitor gives (signed in with OAuth, or pasted) is ever used: ``HF_TOKEN``
  and the machine's stored token are ignored, so a Space secret can never act for a visitor.
  Tokens are never logged, stored in session state or written to disk.
* Inputs are Hub ids, never paths: an id that names a file or folder on this machine is refused
  before lorashare (which also opens local folders) sees it.
* Each request works in its own temporary folder, removed on success and on failure.
* The download cache (``HF_HOME``) is shared, so every request first checks with the visitor's
  token that they may download each repo: a private or gated file one visitor downloaded is never
  served to another.

Limits (environment variables, with safe defaults): ``LORASHARE_SPACE_MAX_ADAPTERS`` (64),
``LORASHARE_SPACE_MAX_BYTES`` (2e9, bytes downloaded per request, checked before downloading),
``LORASHARE_SPACE_QUEUE_SIZE`` (40), ``LORASHARE_SPACE_MAX_SESSIONS`` (32 compressed results kept in
memory), ``LORASHARE_SPACE_STATE_TTL`` (3600 s), ``LORASHARE_SPACE_TRY_MAX_PARAMS`` (2e8: the largest
base model, by its config.json, that "Try it" runs) and ``LORASHARE_SPACE_TRY_MAX_ADAPTERS`` (8 per run).
"""

import os

# Before gradio and huggingface_hub are imported: no telemetry, and no implicit token (a Space
# secret or a developer's login must never be used on a visitor's behalf).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(_name, None)  # lorashare.hub falls back to HF_TOKEN; a visitor must not get it

import contextlib  # noqa: E402
import html  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Dict, Iterator, List, Optional, Tuple  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

import lorashare  # noqa: E402
from lorashare import (  # noqa: E402
    LoraShareError,
    SHAREModel,
    errors,
    hub,  # noqa: E402
)
from lorashare.errors import HubError  # noqa: E402
from lorashare.format.checkpoint import CONFIG_FILE, checkpoint_files  # noqa: E402
from lorashare.format.jsonfile import loads as json_loads  # noqa: E402
from lorashare.format.schema import FIX  # noqa: E402
from lorashare.format.storage import NF4_BLOCK, SCHEMES  # noqa: E402
from lorashare.hub.card import (  # noqa: E402
    HUB_LICENSES,
    INSTALL,
    card_metadata,
    check_license,
    model_class,
)
from lorashare.peft.adapters import name_sources  # noqa: E402
from lorashare.utils.fmt import k_range, size  # noqa: E402
from lorashare.utils.names import check_name, split_group_key  # noqa: E402

logger = logging.getLogger("lorashare.space")

TMP_PREFIX = "lorashare-space-"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ID_FORMS = "owner/name, owner/name@revision or owner/name/subfolder"


# ----------------------------------------------------------------------------------- limits


def _env_number(name: str, default: float, minimum: float = 1) -> float:
    """A number from the environment; a missing, malformed or too small value gives ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        logger.warning("%s=%r is not a number; using %s", name, raw, default)
        return default
    if not value >= minimum:  # also catches NaN
        logger.warning("%s=%r is below %s; using %s", name, raw, minimum, default)
        return default
    return value


@dataclass(frozen=True)
class Limits:
    max_adapters: int
    max_bytes: int
    queue_size: int
    max_sessions: int
    state_ttl: float
    try_max_params: int
    try_max_adapters: int

    @classmethod
    def from_env(cls) -> "Limits":
        return cls(
            max_adapters=int(_env_number("LORASHARE_SPACE_MAX_ADAPTERS", 64, minimum=2)),
            max_bytes=int(_env_number("LORASHARE_SPACE_MAX_BYTES", 2e9)),
            queue_size=int(_env_number("LORASHARE_SPACE_QUEUE_SIZE", 40)),
            max_sessions=int(_env_number("LORASHARE_SPACE_MAX_SESSIONS", 32)),
            state_ttl=_env_number("LORASHARE_SPACE_STATE_TTL", 3600),
            try_max_params=int(_env_number("LORASHARE_SPACE_TRY_MAX_PARAMS", 200e6)),
            try_max_adapters=int(_env_number("LORASHARE_SPACE_TRY_MAX_ADAPTERS", 8)),
        )


LIMITS = Limits.from_env()


# ----------------------------------------------------------------------------------- errors


#: Advice only the Space's operator or a Python caller can follow (environment variables, command-line
#: flags, keyword arguments, the server's cache): no message a visitor sees may name any of it.
NOT_FOR_VISITORS = re.compile(
    r"HF_HUB_OFFLINE|HF_TOKEN|HF_ENDPOINT|HF_HOME|LORASHARE_|hf auth login|(?<![\w-])--[a-z]|"
    r"\b(?:token|overwrite|dtype|replace|strict|timeout|spec|base_model)=|\bname=\.\.\.|\bin Python\b|"
    r"\bpass a dict\b|delete it from the cache|set_base_model|from_adapters\("
)

_TOKEN_FIX = "sign in, or paste a token that can read it in the token field"
#: Fixes lorashare gives for a repo's broken files, written for whoever holds the files: each is cut,
#: and :data:`_BROKEN_FILES_FIX` said instead.
_FILE_FIXES = (FIX, "Re-save it with safetensors.torch.save_file, or re-download it.",
               "Re-download it (delete it from the cache) or re-save the checkpoint.", "Re-download it or re-save it.",
               "Re-save it.")
_BROKEN_FILES_FIX = ("This Space cannot use that repo's files: pick another repo, or, if it is yours, save it again "
                     "with lorashare and push it.")

#: lorashare.hub's messages carry no ``problem``: (pattern of the message, the message a visitor sees), where
#: ``{0}``, ``{1}``… are the pattern's groups: the problem is kept, its fix replaced by one a visitor can do here.
_HUB_MESSAGES: Tuple[Tuple[re.Pattern, str], ...] = tuple((re.compile(pattern, re.S), text) for pattern, text in (
    (r"^(.+?) is gated: ", "{0} is gated: accept its conditions on its Hub page, then " + _TOKEN_FIX
     + " (a token of the account that accepted them)."),
    (r"^repo not found: (.+?)\. Check the id",
     "repo not found: {0}. Check the id; for a private repo, " + _TOKEN_FIX + "."),
    (r"^(not authorised for .+? \(HTTP \d+\)): ", "{0}: " + _TOKEN_FIX + " (to push, a token with write access)."),
    (r"^(cannot reach the Hub at \S+ for .+?)\. Check the network",
     "{0}. The Hub may be down or unreachable from this Space for now: try again in a few minutes."),
    (r"^(.+?) is (not|only partly) in the local cache .*offline mode is on",
     "{0} is {1} in this Space's download cache, and this Space is set to work offline, so it cannot download "
     "it. Try again later, or run lorashare on your own machine."),
    (r"^cannot (?:push|deploy) to (\S+): offline mode is on",
     "cannot push to {0}: this Space is set to work offline. Download the checkpoint (.zip) and push it from your "
     "own machine."),
    (r"^cannot push to (\S+): no Hugging Face token",
     "cannot push to {0}: sign in, or paste a token with write access in the token field."),
))


def visitor_message(exc: LoraShareError) -> str:
    """What a visitor reads for a lorashare error: its problem, and a fix they can do in this Space.

    lorashare's fixes are for Python callers (``overwrite=True``, ``HF_TOKEN``, ``LORASHARE_HUB_TIMEOUT``); an
    error that carries ``problem`` (the message without its fix) gets this Space's fix after it, and
    lorashare.hub's errors, which carry none, get theirs from :data:`_HUB_MESSAGES`.  :func:`_public` then
    drops any advice left that a visitor cannot follow.
    """
    problem = exc.problem
    if isinstance(exc, errors.StorageRangeError) and problem:
        return f"{problem} Pick float32 or bfloat16 under Storage, which hold the range."
    if isinstance(exc, errors.InvalidNameError) and problem:
        return f"{problem} Pick another name."
    if isinstance(exc, errors.LocalBaseModelError) and problem:
        return (f"{problem} Compress adapters whose adapter_config.json names the base model's Hub id "
                "(base_model_name_or_path), or push from your own machine with lorashare.")
    if isinstance(exc, errors.DuplicateAdapterError):
        return (f"adapter {exc.adapter!r} is given twice. Give one of them another name: one per line as "
                "name=owner/name.")
    if isinstance(exc, errors.OutputPathError):  # this Space writes into its own temporary folders only
        return f"{problem or exc} This is the Space's fault, not yours: try again, and report it if it persists."
    if isinstance(exc, errors.SaveError):
        said = exc.message.split(" Nothing was changed there.")[0].rstrip(".")
        return f"{said}. The server could not store the result: try again later, or with fewer adapters."
    if isinstance(exc, errors.HubTimeoutError):
        return (f"the Hub did not answer in time for {exc.path or 'a request'}. It may be slow or busy: try again in a "
                "few minutes, or with fewer adapters at once.")
    message = str(exc)
    if isinstance(exc, HubError):
        for pattern, text in _HUB_MESSAGES:
            found = pattern.match(message)
            if found:
                return text.format(*found.groups())
    cut = message
    for fix in _FILE_FIXES:
        cut = cut.replace(" " + fix, "").replace(fix, "")
    cut = re.sub(r" \(set LORASHARE_MAX_TENSOR_BYTES to raise it\)", " per tensor", cut)
    if cut != message:
        return f"{cut.rstrip()} {_BROKEN_FILES_FIX}"
    return message


def _without_operator_advice(message: str) -> str:
    """``message`` less each sentence that names advice a visitor cannot follow (:data:`NOT_FOR_VISITORS`).

    A safety net under :func:`visitor_message`, for a message nobody taught this Space: the sentence at
    fault goes, and if that is the first one, the whole message is replaced (and logged for the operator).
    """
    if not NOT_FOR_VISITORS.search(message):
        return message
    lines = []
    for line in message.split("\n"):
        sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", line)
        kept = [s for s in sentences if not NOT_FOR_VISITORS.search(s)]
        if sentences and NOT_FOR_VISITORS.search(sentences[0]):
            logger.warning("a message for a visitor named operator-only advice: %s", hub.redact(message))
            return ("This Space cannot do that with its current settings; the details were logged for its owner. "
                    "Try again later, or run lorashare on your own machine.")
        lines.append(" ".join(kept))
    return "\n".join(lines)


def _public(message: str, token: Optional[str] = None) -> str:
    """A message fit for a visitor: no token, no server paths, no advice they cannot follow, no HTML."""
    if token:
        message = message.replace(token, "***")
    message = hub.redact(message)
    cache = hub.cache_roots()
    roots = {cache["HF_HUB_CACHE"]: "<hf-cache>", cache["HF_HOME"]: "<hf-home>",
             tempfile.gettempdir(): "<tmp>", os.getcwd(): "<app>"}
    for root in sorted(roots, key=len, reverse=True):
        if root and len(root) > 1:
            message = message.replace(os.path.realpath(root), roots[root]).replace(root, roots[root])
    # A file in the download cache, as the visitor knows it: the repo and its commit.
    message = _CACHED_REPO.sub(lambda m: f"{m['owner']}/{m['name']}" + (f"@{m['sha'][:10]}" if m["sha"] else ""),
                               message)
    return html.escape(_without_operator_advice(message), quote=False)


_CACHED_REPO = re.compile(r"<hf-cache>/(?:models|datasets|spaces)--(?P<owner>[^/\s]+?)--(?P<name>[^/\s]+?)"
                          r"(?:/snapshots/(?P<sha>[0-9a-f]{7,64})|/blobs/[0-9a-f]+|(?=[/\s]|$))")


class UserError(Exception):
    """A request the Space refuses, with the message the visitor sees."""


def _fail(message: str, token: Optional[str] = None) -> gr.Error:
    return gr.Error(_public(message, token), duration=None, print_exception=False)


@contextlib.contextmanager
def _readable_errors(token: Optional[str] = None) -> Iterator[None]:
    """Turn every failure into a ``gr.Error`` with a readable message (never a stack trace)."""
    try:
        yield
    except gr.Error:
        raise
    except UserError as exc:
        raise _fail(str(exc), token) from None
    except LoraShareError as exc:
        raise _fail(visitor_message(exc), token) from None
    except MemoryError:
        raise _fail("The server ran out of memory: compress fewer or smaller adapters, or choose a smaller k.") from None
    except Exception as exc:  # noqa: BLE001 - logged for the operator, summarised for the visitor
        logger.error("unexpected %s in a request", type(exc).__name__, exc_info=True)
        raise _fail(
            f"Unexpected server error ({type(exc).__name__}); it was logged. Try again, and report it if it persists."
        ) from None


@contextlib.contextmanager
def _workdir() -> Iterator[str]:
    """A per-request temporary folder, removed however the request ends."""
    folder = tempfile.mkdtemp(prefix=TMP_PREFIX)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _token(pasted: Optional[str], oauth_token: Optional[gr.OAuthToken]) -> Optional[str]:
    """The visitor's token: a pasted one wins over the signed-in session."""
    pasted = (pasted or "").strip()
    if pasted:
        return pasted
    if oauth_token is not None and getattr(oauth_token, "token", None):
        return oauth_token.token
    return None


# -------------------------------------------------------------------------------- validation


def _not_local(text: str, what: str = f"Hub id (expected {ID_FORMS})") -> None:
    """Refuse an id that names something on this machine: lorashare would open it as a folder."""
    body = text.split("@", 1)[0]
    if os.path.lexists(body) or os.path.lexists(text) or os.path.isabs(body) or body.startswith((".", "~")):
        raise UserError(f"`{text}` is not a {what}; this Space reads only from the Hub.")


def parse_ids(text: str) -> List[Tuple[Optional[str], str, hub.HubRef]]:
    """``[(name or None, id, HubRef)]`` from one id per line (``name=owner/repo`` names one).

    Blank lines and ``#`` comments are skipped.  Every bad line is reported at once.
    """
    out: List[Tuple[Optional[str], str, hub.HubRef]] = []
    problems: List[str] = []
    seen: Dict[str, int] = {}
    names: Dict[str, int] = {}
    for number, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name: Optional[str] = None
        if "=" in line:
            name, line = (part.strip() for part in line.split("=", 1))
            try:
                check_name(name)
            except errors.InvalidNameError as exc:
                problems.append(f"line {number}: {exc.problem or exc} Pick another name before the `=`.")
                continue
            if name in names:
                problems.append(f"line {number}: the name `{name}` is already given on line {names[name]}; "
                                "give each adapter its own name.")
                continue
            names[name] = number
        try:
            _not_local(line)
            ref = hub.parse_adapter_id(line)
        except UserError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        except HubError as exc:
            detail = str(exc)
            problems.append(
                f"line {number}: {detail}" if ": bad " in detail
                else f"line {number}: `{line}` is not a Hub id (expected {ID_FORMS})."
            )
            continue
        if line in seen:
            problems.append(f"line {number}: `{line}` is listed twice (first on line {seen[line]}); list each adapter once.")
            continue
        seen[line] = number
        out.append((name, line, ref))
    if problems:
        raise UserError("\n".join(problems[:10]) + (f"\n… and {len(problems) - 10} more" if len(problems) > 10 else ""))
    return out


def _repo_arg(repo_id: str, what: str = "checkpoint repo") -> str:
    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise UserError(f"Give a {what} id (owner/name).")
    _not_local(repo_id, "Hub repo id (expected owner/name)")
    try:
        return hub.check_repo_id(repo_id)
    except HubError:
        raise UserError(f"`{repo_id}` is not a Hub repo id (expected owner/name).") from None


def _adapter_name(name: str) -> str:
    """An adapter name the visitor picked, checked before any request."""
    try:
        return check_name(name)
    except errors.InvalidNameError as exc:
        raise UserError(f"{exc.problem or exc} Pick one of the checkpoint's adapters from the list.") from None


# ------------------------------------------------------------------------- Hub size checks


def _check_budget(total: int, what: str) -> None:
    if total > LIMITS.max_bytes:
        raise UserError(
            f"{what} {size(total)} to download; this Space downloads at most {size(LIMITS.max_bytes)} "
            "per request. Compress fewer adapters here, or run lorashare on your own machine."
        )


# --------------------------------------------------------------------------------- tables


RATIO_NOTE = (
    "**Compression ratio** counts the shared bases: it is what you store and ship. "
    "**Excluding bases** is the marginal cost of one more adapter once the bases exist (its "
    "loadings only); it is not the compression ratio."
)


def larger_note(st: Dict[str, Any]) -> str:
    """A note when the checkpoint is larger than the adapters it holds, with the k that would make it smaller."""
    ratio = st.get("compression_ratio")
    if not st.get("original_lora_bytes") or not ratio or ratio >= 1.0:
        return ""
    k = st.get("largest_saving_k")
    fix = (f"set Components per module to number with k = {k} or less, or compress more adapters together" if k else
           "with so few adapters no k saves space: compress more adapters together")
    return (f"\n\n**Note:** this checkpoint is {1 / ratio:.2f}× the size of the adapters' LoRA weights: the shared "
            f"bases cost more than they save. To make it smaller, {fix}.")


def stats_table(config: Any) -> pd.DataFrame:
    st = config.compression_stats or {}
    k_text = k_range(config.k_per_group or {}, config.num_components)

    def fmt(value: Any, spec: str = ".4f") -> str:
        return "–" if value is None else format(value, spec)

    rows = [
        ("adapters", str(len(config.adapters) or config.num_adapters), ""),
        ("base model", config.base_model_name_or_path or "?", ""),
        ("modules", str(len(config.layer_keys)), ", ".join(config.target_modules)),
        ("k per module and side", k_text, f"{config.component_selection}, {config.dtype}"),
        ("original LoRA weights", size(st.get("original_lora_bytes")), "the adapters' A and B factors"),
        ("SHARE checkpoint", size(st.get("compressed_bytes")),
         f"shared bases {size(st.get('shared_bytes'))} + loadings {size(st.get('loadings_bytes'))}"),
        ("classifier heads", size(st.get("heads_bytes")) if st.get("heads_bytes") else "none",
         "stored bit-exact, in neither size"),
        ("compression ratio", f"{st['compression_ratio']:.2f}×" if st.get("compression_ratio") else "?",
         "bases counted: what you store and ship"),
        ("compression ratio excluding bases",
         f"{st['compression_ratio_excluding_basis']:.2f}×" if st.get("compression_ratio_excluding_basis") else "?",
         "marginal cost of one more adapter, not the compression ratio"),
        ("ΔW relative error (mean / max)",
         f"{fmt(st.get('delta_w_rel_error_mean'))} / {fmt(st.get('delta_w_rel_error_max'))}",
         "‖ΔW − ΔŴ‖ / ‖ΔW‖ over every adapter and module"),
        ("explained variance (mean / min)",
         f"{fmt(st.get('mean_explained_variance'))} / {fmt(st.get('min_explained_variance'))}",
         "share of ΔW energy the bases keep, per module and side"),
    ]
    return pd.DataFrame(rows, columns=["statistic", "value", "meaning"])


def fidelity_table(share: SHAREModel) -> pd.DataFrame:
    explained = share.config.compression_stats.get("per_layer_explained_variance", {}) or {}
    rows = []
    for name in share.adapter_names:
        info = share.config.adapters.get(name, {})
        err = share.reconstruction_error(name)  # the errors measured at compression
        layers = [v for key, v in explained.items() if split_group_key(key)[0] in err["per_layer"]]
        rows.append({
            "adapter": name,
            "source": str(info.get("source") or ""),
            "revision": str(info.get("revision") or "")[:10],
            "rank": info.get("rank"),
            "ΔW error mean": round(err["mean"], 6),
            "ΔW error max": round(err["max"], 6),
            "explained variance of its layers (mean)": round(sum(layers) / len(layers), 6) if layers else None,
        })
    return pd.DataFrame(rows)


def adapters_table(config: Any) -> pd.DataFrame:
    rows = []
    for name in config.adapter_names or list(config.adapters):
        info = config.adapters.get(name, {})
        rows.append({
            "adapter": name,
            "source": str(info.get("source") or ""),
            "revision": str(info.get("revision") or "")[:10],
            "rank": info.get("rank", config.lora_rank),
            "lora_alpha": info.get("lora_alpha", config.lora_alpha),
            "original size": size(info.get("lora_bytes")) if info.get("lora_bytes") else "?",
        })
    return pd.DataFrame(rows, columns=["adapter", "source", "revision", "rank", "lora_alpha", "original size"])


def _natural(text: str) -> List[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def explained_frame(config: Any) -> pd.DataFrame:
    """One row per module and side; ``layer`` is the module path less the prefix all modules share."""
    explained = (config.compression_stats or {}).get("per_layer_explained_variance", {}) or {}
    modules = sorted({split_group_key(k)[0] for k in explained}, key=_natural)
    prefix = os.path.commonprefix(modules) if len(modules) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]  # cut at a dot
    while prefix and any(m[len(prefix):][:1].isdigit() for m in modules):  # "layer.0.query", not "0.query"
        prefix = prefix[: prefix[:-1].rfind(".") + 1]
    rows = [
        {"layer": split_group_key(k)[0][len(prefix):], "module": split_group_key(k)[0],
         "side": split_group_key(k)[1], "explained variance": float(v)}
        for k, v in sorted(explained.items(), key=lambda kv: _natural(kv[0]))
    ]
    return pd.DataFrame(rows, columns=["layer", "module", "side", "explained variance"])


def explained_plot(config: Any) -> gr.LinePlot:
    frame = explained_frame(config)
    order = list(dict.fromkeys(frame["layer"]))
    return gr.LinePlot(frame, sort=order, x_label_angle=-30 if len(order) > 2 else 0,
                       x_axis_labels_visible=len(order) <= 64)


def bytes_frame(config: Any) -> pd.DataFrame:
    st = config.compression_stats or {}
    rows = [
        {"checkpoint": "original LoRA", "part": "LoRA factors", "bytes": int(st.get("original_lora_bytes") or 0)},
        {"checkpoint": "SHARE", "part": "shared bases", "bytes": int(st.get("shared_bytes") or 0)},
        {"checkpoint": "SHARE", "part": "loadings", "bytes": int(st.get("loadings_bytes") or 0)},
    ]
    return pd.DataFrame(rows, columns=["checkpoint", "part", "bytes"])


# ------------------------------------------------------------------------------ endpoints


def compress(
    adapter_ids: str,
    k_mode: str,
    k: Optional[float],
    variance_threshold: Optional[float],
    token_text: str,
    storage: Optional[str],
    oauth_token: gr.OAuthToken | None,
    progress: gr.Progress = gr.Progress(),
):
    """Compress Hub adapters (one id per line) into a SHARE checkpoint, stored in ``storage`` (a dtype).

    Yields once, when done: the outputs are copied to Gradio's cache before the request's temporary
    folder is removed.
    """
    token = _token(token_text, oauth_token)
    with _readable_errors(token):
        items = parse_ids(adapter_ids)
        if len(items) < 2:
            raise UserError(f"Give at least 2 adapter ids, one per line ({ID_FORMS}); got {len(items)}.")
        if len(items) > LIMITS.max_adapters:
            raise UserError(
                f"{len(items)} adapters given; this Space compresses at most {LIMITS.max_adapters} at once. "
                f"List at most {LIMITS.max_adapters}, or run lorashare on your own machine."
            )
        if k_mode == "auto":
            num_components: Any = "auto"
        else:
            if k is None or float(k) != int(k) or int(k) < 1:
                raise UserError(f"k = {k!r}: give a whole number of components ≥ 1, or choose auto.")
            num_components = int(k)
        threshold = 0.95 if variance_threshold is None else float(variance_threshold)

        n = len(items)
        total = 0
        for i, (_name, text, ref) in enumerate(items):
            progress(i / n, desc=f"Checking {text} ({i + 1}/{n})")
            prefix = f"{ref.subfolder}/" if ref.subfolder else ""
            # The visitor's own access is checked every time: the download cache is shared.
            sizes = hub.remote_sizes(ref.repo_id, [prefix + f for f in ADAPTER_FILES], revision=ref.revision,
                                     token=token, probe=prefix + ADAPTER_FILES[-1])
            total += sum(sizes.values())
            _check_budget(total, f"These adapters are {'at least ' if i + 1 < n else ''}")
        for i, (_name, text, ref) in enumerate(items):
            progress(i / n, desc=f"Downloading {text} ({i + 1}/{n})")
            hub.fetch_adapter(ref, token=token)  # into the HF cache; from_adapters below reuses it

        progress(0.0, desc=f"Fitting shared bases for {n} adapters")
        if any(name for name, _t, _r in items):
            sources: Any = name_sources((name, text) for name, text, _r in items)
        else:
            sources = [text for _n, text, _r in items]
        share = SHAREModel.from_adapters(
            sources, num_components=num_components, variance_threshold=threshold, token=token, progress=True,
            dtype=storage or "float32",
        )

        with _workdir() as work:
            progress(0.9, desc="Writing the checkpoint")
            folder = os.path.join(work, "share_checkpoint")
            share.save_pretrained(folder)
            progress(0.95, desc="Zipping")
            archive = shutil.make_archive(
                os.path.join(work, f"share-checkpoint-{n}-adapters"), "zip", root_dir=work, base_dir="share_checkpoint"
            )
            cfg = share.config
            status = (
                f"Compressed **{n} adapters** of `{cfg.base_model_name_or_path or '?'}`: "
                f"{size(cfg.compression_stats.get('original_lora_bytes'))} → "
                f"{size(cfg.compression_stats.get('compressed_bytes'))} "
                f"(**{cfg.compression_stats.get('compression_ratio', 0):.2f}×**).\n\n{RATIO_NOTE}"
                + larger_note(cfg.compression_stats)
            )
            # Gradio copies the zip into its cache when it receives this; the folder goes after.
            yield (status, stats_table(cfg), fidelity_table(share), explained_plot(cfg), bytes_frame(cfg),
                   archive, share)


def push(
    share: Optional[SHAREModel],
    repo_id: str,
    private: bool,
    license_id: str,
    token_text: str,
    oauth_token: gr.OAuthToken | None,
    profile: gr.OAuthProfile | None,
    progress: gr.Progress = gr.Progress(),
) -> str:
    """Push the last compressed checkpoint of this session to a Hub repo, with its model card."""
    token = _token(token_text, oauth_token)
    with _readable_errors(token):
        if share is None:
            raise UserError("Nothing to push yet: compress adapters first (the result is kept for this session).")
        if not token:
            raise UserError("Sign in with Hugging Face, or paste a token with write access, to push.")
        repo_id = (repo_id or "").strip()
        if repo_id and "/" not in repo_id and profile is not None:
            repo_id = f"{profile.username}/{repo_id}"
        repo_id = _repo_arg(repo_id, "target repo")
        license_id = check_license(license_id) if (license_id or "").strip() else None  # before the push keeps it
        progress(0.1, desc=f"Pushing to {repo_id}")
        info = share.push_to_hub(repo_id, private=bool(private), token=token, license=license_id)
        base = hub.endpoint()
        repo_url = str(getattr(info, "repo_url", "") or f"{base}/{repo_id}")
        card_url = f"{base}/{repo_id}/blob/{info.oid}/README.md"
        return (
            f"Pushed {len(share.adapter_names)} adapters to **[{repo_id}]({repo_url})** "
            f"({'private' if private else 'public'}).\n\n"
            f"- repo and model card: {repo_url}\n- model card file: {card_url}\n"
            f"- commit: {getattr(info, 'commit_url', '') or info.oid}"
        )


def _checkpoint_config(repo_id: str, revision: Optional[str], token: Optional[str]) -> Tuple[Any, str]:
    """``(SHAREConfig, commit)`` of a Hub checkpoint; reads no bases and no adapter loadings."""
    sizes = hub.remote_sizes(repo_id, [CONFIG_FILE], revision=revision, token=token, probe=CONFIG_FILE)
    if CONFIG_FILE not in sizes:
        raise UserError(f"{repo_id}@{revision or 'main'} has no {CONFIG_FILE}: not a SHARE checkpoint.")
    config, sha = hub.fetch_config(repo_id, token=token, revision=revision)
    if config is None or sha is None:
        raise UserError(f"{repo_id}: no SHARE checkpoint there (or no access to it).")
    return config, sha


def explore(repo_id: str, revision: str, token_text: str, oauth_token: gr.OAuthToken | None,
            progress: gr.Progress = gr.Progress()):
    """A SHARE checkpoint's card data, adapters, ranks, stats and plots (no adapter loadings read)."""
    token = _token(token_text, oauth_token)
    with _readable_errors(token):
        repo_id = _repo_arg(repo_id)
        revision = (revision or "").strip() or None
        progress(0.2, desc=f"Reading {repo_id}")
        config, sha = _checkpoint_config(repo_id, revision, token)
        meta = card_metadata(config)  # the license is shown as published, so not re-validated
        meta["license"] = config.card.license or "not set"
        base = hub.endpoint()
        names = list(config.adapter_names or config.adapters)
        lines = [
            f"### [{repo_id}]({base}/{repo_id})" + (f" @ `{revision}`" if revision else ""),
            "",
            f"- commit: `{sha or '?'}`",
            f"- base model: `{config.base_model_name_or_path or '?'}`",
            f"- adapters: {len(names)}, LoRA rank {config.lora_rank}, target modules "
            f"{', '.join(config.target_modules) or '?'}",
            f"- storage: {config.dtype}, k {config.component_selection}",
            f"- card data: library `{meta.get('library_name')}`, license `{meta['license']}`, "
            f"tags {', '.join(meta.get('tags', []))}",
            f"- written by lorashare {config.lorashare_version or config.share_version or '?'} "
            f"(format v{config.format_version})",
            "",
            RATIO_NOTE,
        ]
        choice = names[0] if names else None
        return ("\n".join(lines), adapters_table(config), stats_table(config), explained_plot(config),
                bytes_frame(config), gr.Dropdown(choices=names, value=choice))


def reconstruct(repo_id: str, revision: str, adapter: str, token_text: str, oauth_token: gr.OAuthToken | None,
                progress: gr.Progress = gr.Progress()):
    """Rebuild one adapter of a Hub checkpoint as a standard PEFT adapter (.zip).

    Downloads the bases and that adapter's loadings only.
    """
    token = _token(token_text, oauth_token)
    with _readable_errors(token):
        repo_id = _repo_arg(repo_id)
        revision = (revision or "").strip() or None
        adapter = (adapter or "").strip()
        if not adapter:
            raise UserError("Pick an adapter to reconstruct (Explore the checkpoint first).")
        _adapter_name(adapter)
        progress(0.1, desc="Checking sizes")
        config, sha = _checkpoint_config(repo_id, revision, token)
        if adapter not in config.adapter_names:
            raise UserError(f"{repo_id} has no adapter {adapter!r}; it holds {', '.join(config.adapter_names)}.")
        wanted = checkpoint_files(config, [adapter])  # the config, the bases and this adapter's files
        sizes = hub.remote_sizes(repo_id, wanted, revision=sha, token=token)
        _check_budget(sum(sizes.values()), f"{adapter!r} and the shared bases are")
        progress(0.3, desc=f"Downloading {adapter}")
        share = SHAREModel.from_pretrained(repo_id, revision=sha, token=token, adapters=[adapter])  # what was checked
        with _workdir() as work:
            progress(0.7, desc=f"Reconstructing {adapter}")
            share.reconstruct(adapter, output_dir=os.path.join(work, adapter))
            archive = shutil.make_archive(os.path.join(work, f"{adapter}-peft-adapter"), "zip",
                                          root_dir=work, base_dir=adapter)
            err = share.reconstruction_error(adapter)
            peft_cfg = share.adapter_configs.get(adapter, {})
            auto = model_class(peft_cfg.get("task_type"))
            base_model = peft_cfg.get("base_model_name_or_path") or share.config.base_model_name_or_path or "BASE_MODEL"
            rev = f", revision={revision!r}" if revision else ""
            text = (
                f"Rebuilt **{adapter}** (ΔW relative error mean {err['mean']:.4f}, max {err['max']:.4f}). "
                "Unzip it and load it like any PEFT adapter:\n\n"
                "```python\n"
                f"from peft import PeftModel\nfrom transformers import {auto}\n\n"
                f"base = {auto}.from_pretrained({base_model!r})\n"
                f"model = PeftModel.from_pretrained(base, {adapter!r})  # the unzipped folder\n"
                "```\n\nOr straight from the Hub, without the zip (lorashare "
                f"{lorashare.__version__} is not on PyPI yet: `{INSTALL}`):\n\n"
                "```python\n"
                "from lorashare import SHAREModel\n\n"
                f"model = SHAREModel.from_pretrained({repo_id!r}{rev}, adapters=[{adapter!r}]).apply(base, {adapter!r})\n"
                "```"
            )
            yield archive, text


# ---------------------------------------------------------------------------------- try it

#: The base model's files "Try it" downloads: weights as one safetensors file, never a pickle.
BASE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "generation_config.json")
TRY_TASKS = ("SEQ_CLS", "CAUSAL_LM")
TRY_MAX_TEXT = 2000
TRY_NEW_TOKENS = 32
_GATED_MLP = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "smollm3")


def estimate_params(config: Dict[str, Any]) -> Optional[int]:
    """Parameters of a transformer from its ``config.json`` (embeddings + attention + MLP), or ``None``.

    An estimate (biases, norms and position tables left out), within a few percent for BERT, GPT-2
    and Llama-like models: enough to refuse a model that is too big before downloading any weight.
    """
    def first(*keys: str) -> Optional[int]:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    text = config.get("text_config")
    if isinstance(text, dict) and first("hidden_size", "n_embd", "d_model") is None:
        config = text
    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    vocab = first("vocab_size")
    if not (hidden and layers and vocab):
        return None
    inner = first("intermediate_size", "n_inner", "d_ff", "ffn_dim") or 4 * hidden
    mlp = (3 if config.get("model_type") in _GATED_MLP else 2) * hidden * inner
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return int(embeddings + layers * (4 * hidden * hidden + mlp))


#: A config.json asking for more layers (or experts) than this is refused before even its empty shell is built.
TRY_MAX_REPEATS = 1024
#: Labels of a classifier: transformers makes a name for each (``id2label``) as soon as the config is read.
TRY_MAX_LABELS = 100_000
_REPEATS = ("num_hidden_layers", "n_layer", "num_layers", "num_experts", "num_local_experts", "n_routed_experts")
_TRY_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM"}


def _count(n: int) -> str:
    """``1.56 G``, ``22.3 M`` or ``21,539``: a parameter count for a message."""
    if n >= 1e9:
        return f"{n / 1e9:,.2f} G"
    return f"{n / 1e6:,.1f} M" if n >= 1e5 else f"{n:,}"


def implied_params(folder: str, task: Optional[str] = None, labels: Optional[int] = None) -> Tuple[int, str]:
    """``(values, largest tensor)`` of the model transformers builds from ``folder``'s config.json.

    Built on torch's meta device (shapes, no memory), with the class "Try it" loads for ``task``
    (the bare model when it is not known yet): every parameter and buffer it will allocate,
    including those the weights file leaves out, which transformers then initialises in memory.

    Example:
        >>> implied_params("bert-folder")  # doctest: +SKIP
        (1558517378, 'embeddings.position_embeddings.weight 4000000 × 384')
    """
    import torch
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if task == "SEQ_CLS" and labels:
        cfg.num_labels = labels
    auto = getattr(transformers, _TRY_CLASSES.get(task or "", "AutoModel"))
    with torch.device("meta"):
        model = auto.from_config(cfg, trust_remote_code=False)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # tied weights counted once
    if not tensors:
        return 0, "no tensors"
    name, big = max(tensors.items(), key=lambda item: item[1].numel())
    return sum(t.numel() for t in tensors.values()), f"{name} {' × '.join(str(d) for d in big.shape)}"


def weights_params(path: str, who: str) -> Tuple[int, int]:
    """``(values, bytes)`` of every tensor in a safetensors file, from its header alone (no data is read)."""
    import math

    from lorashare.format.tensorfile import read_header

    infos, _ = read_header(path, error=HubError, who=who)
    return sum(math.prod(i.shape) for i in infos.values()), sum(i.nbytes for i in infos.values())


def _over_limit(base_id: str, what: str) -> UserError:
    return UserError(f"The base model {base_id}: {what}, over this Space's limit of {_count(LIMITS.try_max_params)} "
                     "parameters. Serve it on your own machine: "
                     "`SHAREModel.from_pretrained(...).serve(base_model)`.")


def _check_repeats(base_id: str, config: Dict[str, Any]) -> None:
    """Refuse a config.json whose layer or expert count would make even an empty model huge to build."""
    text = config.get("text_config")
    for part in (config, text if isinstance(text, dict) else {}):
        for key in _REPEATS:
            value = part.get(key)
            if isinstance(value, int) and value > TRY_MAX_REPEATS:
                raise UserError(f"The base model {base_id}: its config.json asks for {key} = {value:,}; this Space "
                                f"builds at most {TRY_MAX_REPEATS:,}.")
    _check_labels(base_id, config.get("num_labels"), "its config.json")


def _check_labels(base_id: str, labels: Any, where: str) -> None:
    if isinstance(labels, int) and labels > TRY_MAX_LABELS:
        raise UserError(f"The base model {base_id}: {where} asks for {labels:,} labels; this Space runs classifiers "
                        f"of at most {TRY_MAX_LABELS:,}.")


def _check_built_size(base_id: str, folder: str, task: Optional[str] = None, labels: Optional[int] = None) -> int:
    """What the model built from config.json holds, refused over the limit before anything is allocated."""
    _check_labels(base_id, labels, "the adapters' classifier head")
    try:
        total, largest = implied_params(folder, task, labels)
    except Exception as exc:  # noqa: BLE001 - whatever transformers makes of a config it cannot build, one message
        raise UserError(f"transformers cannot build the base model {base_id} from its config.json "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}).") from None
    if total > LIMITS.try_max_params:
        raise _over_limit(base_id, f"its config.json implies {_count(total)} parameters (largest: {largest})")
    return total


def _check_weights(base_id: str, folder: str) -> None:
    """The downloaded model.safetensors, by its header: refused over the limit before it is loaded."""
    count, nbytes = weights_params(os.path.join(folder, "model.safetensors"), base_id)
    if count > LIMITS.try_max_params:
        raise _over_limit(base_id, f"its model.safetensors holds {_count(count)} parameters ({size(nbytes)})")


def _head_labels(share: SHAREModel, names: List[str]) -> Optional[int]:
    """Rows of the adapters' classifier heads (their label count), if they have any."""
    for name in names:
        for key, tensor in share.all_classifier_heads.get(name, {}).items():
            if key.endswith(("classifier.weight", "score.weight", "out_proj.weight")) and tensor.dim() == 2:
                return int(tensor.shape[0])
    return None


def _base_of(config: Any) -> str:
    base_id = (config.base_model_name_or_path or "").strip()
    if not base_id:
        raise UserError("The checkpoint does not name its base model (base_model_name_or_path), so it cannot run here.")
    _not_local(base_id, "Hub model id")
    try:
        return hub.check_repo_id(base_id)
    except HubError:
        raise UserError(f"The checkpoint's base model `{base_id}` is not a Hub model id (owner/name).") from None


def _base_config(base_id: str, token: Optional[str]) -> Tuple[Dict[str, Any], Dict[str, int], int, str]:
    """``(config.json, {file: bytes}, parameters, folder of config.json)`` of a base model; refuses one too big.

    Reads the file sizes and the config.json only: no weight is downloaded before this passes.  The
    parameters are what the model built from config.json holds (``implied_params``), not only
    what its weights file holds: transformers allocates the missing ones too.
    """
    sizes = hub.remote_sizes(base_id, BASE_FILES, token=token, probe="config.json")
    if "config.json" not in sizes:
        raise UserError(f"The base model {base_id} has no config.json on the Hub (or no access to it).")
    if sizes["config.json"] > 1_000_000:
        raise UserError(f"The base model {base_id}'s config.json is over 1 MB; not a model config.")
    folder = hub.fetch_files(base_id, ["config.json"], token=token)
    with open(os.path.join(folder, "config.json"), "rb") as f:
        config = json_loads(f.read(1_000_001), path=f"{base_id}/config.json", what="model config", error=HubError)
    if not isinstance(config, dict):
        raise UserError(f"The base model {base_id}'s config.json is not a JSON object.")
    params = estimate_params(config)
    if params is None:
        raise UserError(f"Cannot tell the size of the base model {base_id} from its config.json (no hidden size, "
                        "layer count or vocabulary size), so this Space does not run it.")
    if params > LIMITS.try_max_params:
        raise UserError(
            f"The base model {base_id} has about {params / 1e6:,.0f} M parameters (from its config.json); this Space "
            f"runs base models of up to {LIMITS.try_max_params / 1e6:,.0f} M. "
            "Serve it on your own machine: `SHAREModel.from_pretrained(...).serve(base_model)`.")
    if "model.safetensors" not in sizes:
        raise UserError(f"The base model {base_id} has no model.safetensors (one file). This Space loads "
                        "safetensors weights only, never pickled ones (pytorch_model.bin), and not sharded models.")
    _check_repeats(base_id, config)
    return config, sizes, _check_built_size(base_id, folder), folder


def try_list(repo_id: str, revision: str, token_text: str, oauth_token: gr.OAuthToken | None):
    """The checkpoint's adapters to choose from, and whether its base model is small enough to run here."""
    token = _token(token_text, oauth_token)
    with _readable_errors(token):
        repo_id = _repo_arg(repo_id)
        config, sha = _checkpoint_config(repo_id, (revision or "").strip() or None, token)
        names = list(config.adapter_names or config.adapters)
        base_id = _base_of(config)
        _, _, params, _ = _base_config(base_id, token)
        text = (f"**{repo_id}** (commit `{sha[:10]}`): {len(names)} adapters on `{base_id}` "
                f"(about {_count(params)} parameters). Pick up to {LIMITS.try_max_adapters}, type a text, "
                "and run them all in one batch.")
        return text, gr.Dropdown(choices=names, value=names[: min(3, LIMITS.try_max_adapters)])


def try_adapters(repo_id: str, revision: str, adapters: Optional[List[str]], text: str, include_base: bool,
                 token_text: str, oauth_token: gr.OAuthToken | None, progress: gr.Progress = gr.Progress()):
    """Run one text through several adapters of a checkpoint, in ONE batch (``SHAREModel.serve``)."""
    token = _token(token_text, oauth_token)
    with _readable_errors(token):
        repo_id = _repo_arg(repo_id)
        revision = (revision or "").strip() or None
        text = (text or "").strip()
        if not text:
            raise UserError("Type a text to run through the adapters.")
        if len(text) > TRY_MAX_TEXT:
            raise UserError(f"The text has {len(text)} characters; this Space takes at most {TRY_MAX_TEXT}.")
        chosen = list(dict.fromkeys(a.strip() for a in (adapters or []) if a and a.strip()))
        if not chosen:
            raise UserError("Pick at least one adapter (List adapters first).")
        if len(chosen) > LIMITS.try_max_adapters:
            raise UserError(f"{len(chosen)} adapters picked; this Space runs at most {LIMITS.try_max_adapters} "
                            f"at once: pick at most {LIMITS.try_max_adapters}.")
        for name in chosen:
            _adapter_name(name)
        progress(0.05, desc="Checking the checkpoint and the base model")
        config, sha = _checkpoint_config(repo_id, revision, token)
        missing = [n for n in chosen if n not in config.adapter_names]
        if missing:
            raise UserError(f"{repo_id} has no adapter {missing[0]!r}; it holds {', '.join(config.adapter_names)}.")
        base_id = _base_of(config)
        base_config, base_sizes, params, config_folder = _base_config(base_id, token)  # before any weight download
        wanted = checkpoint_files(config, chosen)
        ckpt_sizes = hub.remote_sizes(repo_id, wanted, revision=sha, token=token)
        _check_budget(sum(ckpt_sizes.values()) + sum(base_sizes.values()), "The base model and the adapters are")
        progress(0.2, desc="Downloading the adapters")
        share = SHAREModel.from_pretrained(repo_id, revision=sha, token=token, adapters=chosen)
        tasks = {str(share.adapter_configs.get(n, {}).get("task_type") or "none") for n in chosen}
        if len(tasks) != 1 or not tasks <= set(TRY_TASKS):
            raise UserError(f"The adapters' task types are {', '.join(sorted(tasks))}; Try it runs adapters of one "
                            f"task type, {' or '.join(TRY_TASKS)} (set task_type when training them).")
        task = tasks.pop()
        labels = (_head_labels(share, chosen) or int(base_config.get("num_labels") or 2)) if task == "SEQ_CLS" else None
        params = _check_built_size(base_id, config_folder, task, labels)  # the class and head it will really build
        progress(0.4, desc=f"Downloading {base_id}")
        folder = hub.fetch_files(base_id, sorted(base_sizes), token=token)
        _check_weights(base_id, folder)  # header only: what the file holds, before it is loaded
        if folder != config_folder:  # main moved since the check: what is loaded is what is checked
            params = _check_built_size(base_id, folder, task, labels)
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        local = dict(local_files_only=True, trust_remote_code=False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **local)
            if task == "SEQ_CLS":
                model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=labels, use_safetensors=True,
                                                                           **local)
            else:
                model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, **local)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"Could not load the base model {base_id} with transformers: {exc}") from None
        progress(0.7, desc="Running the batch")
        served = share.serve(model.eval())
        del share  # the served model keeps its own tables
        rows = chosen + (["__base__"] if include_base else [])
        import torch

        with torch.no_grad():
            enc = tokenizer([text] * len(rows), return_tensors="pt", truncation=True, max_length=256)
            if task == "CAUSAL_LM":
                enc.pop("token_type_ids", None)  # generate() refuses what the model does not take
            if task == "SEQ_CLS":
                probs = served(**enc, adapter_names=rows).logits.float().softmax(-1)
                id2label = getattr(model.config, "id2label", None) or {}
                outputs = []
                for p in probs:
                    top = int(p.argmax())
                    label = str(id2label.get(top, f"LABEL_{top}"))
                    detail = ", ".join(f"{id2label.get(i, f'LABEL_{i}')}: {float(v):.3f}" for i, v in enumerate(p))
                    outputs.append((label, detail))
            else:
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                ids = served.generate(**enc, adapter_names=rows, max_new_tokens=TRY_NEW_TOKENS, do_sample=False,
                                      pad_token_id=pad)
                new = ids[:, enc["input_ids"].shape[1]:]
                outputs = [(tokenizer.decode(t, skip_special_tokens=True).strip(), f"{len(t)} new tokens, greedy")
                           for t in new]
        added = served.served_bytes()
        frame = pd.DataFrame([{"adapter": "base model" if n == "__base__" else n, "output": o, "detail": d}
                              for n, (o, d) in zip(rows, outputs)], columns=["adapter", "output", "detail"])
        summary = (f"Ran {len(rows)} rows in **one batch** on `{base_id}` (about {_count(params)} parameters, "
                   f"{'classification' if task == 'SEQ_CLS' else 'greedy generation'}): each row with its own adapter "
                   f"over the shared bases. Serving them added {size(added['total'])} to the base model "
                   f"(bases {size(added['bases'])}, loadings {size(added['tables'])}, heads {size(added['heads'])}).")
        return summary, frame


# ------------------------------------------------------------------------------------- UI

INTRO = """# lorashare: many LoRA adapters, one shared basis

Compress LoRA adapters of **one base model** from the Hugging Face Hub into shared low-rank bases
plus a tiny loading per adapter (SHARE), explore SHARE checkpoints, and rebuild any adapter as a
standard PEFT adapter. Powered by [lorashare](https://github.com/lorashare/lorashare) {version}.
"""

ID_PLACEHOLDER = "acme/billing-lora\nacme/refunds-lora@v2\nacme/multi-lora/legal\nlegal2=bob/legal-lora"


#: What each endpoint does, for gradio_client's view_api and the API page (the docstrings are for this file).
API_DESCRIPTIONS = {
    "compress": f"Compress 2 or more LoRA adapters of one base model from the Hub (adapter_ids: one per line, "
                f"{ID_FORMS}; name=owner/name names one) into a SHARE checkpoint: status, statistics, fidelity per "
                "adapter, the plots' data, and the checkpoint as a .zip.",
    "push": "Push this session's last compressed checkpoint to a Hub repo (owner/name) with its model card. Needs a "
            "token with write access: token_text, or Client(..., oauth_token=...).",
    "explore": "Read a SHARE checkpoint on the Hub, without downloading any adapter: its summary, adapters, "
               "statistics, the plots' data, and its adapter names.",
    "reconstruct": "Rebuild one adapter of a SHARE checkpoint on the Hub as a standard PEFT adapter (.zip), with how "
                   "to load it.",
    "try_list": "List a SHARE checkpoint's adapters, and check that its base model is small enough to run here.",
    "try_run": "Run one text through several adapters of a SHARE checkpoint in one batch (and the base model alone): "
               "one output row per adapter.",
}


def _toggle_k(mode: str):
    return gr.Number(interactive=mode != "auto"), gr.Slider(interactive=mode == "auto")


#: Closes the message toasts on screen (Gradio's own close buttons).
CLEAR_MESSAGES = "() => { document.querySelectorAll('.toast-close').forEach((b) => b.click()); }"


def _pushed_to(repo: str):
    """Explore and Try it, filled in with the repo just pushed (when it was given as owner/name)."""
    repo = (repo or "").strip()
    return (repo, repo) if "/" in repo else (gr.skip(), gr.skip())


def _reveal():
    """Show a column of results (hidden while there are none, rather than empty tables and plots)."""
    return gr.Column(visible=True)


def oauth_enabled() -> bool:
    """Sign-in works on a Space with ``hf_oauth: true`` (which sets ``OAUTH_CLIENT_ID``) only.

    Anywhere else Gradio would mock the login with the machine's own Hugging Face login, and fail
    without one, so the token field stands in for it.
    """
    return os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("SPACE_ID")) and bool(
        os.environ.get("OAUTH_CLIENT_ID"))


def _result_plots() -> Tuple[gr.LinePlot, gr.BarPlot]:
    """The two plots a compression and a checkpoint both show: explained variance, and bytes before and after."""
    with gr.Row():
        ev = gr.LinePlot(x="layer", y="explained variance", color="side", tooltip=["module", "side", "explained variance"],
                         title="Explained variance per module and side", height=320, label="Explained variance",
                         show_label=False)
        sizes = gr.BarPlot(x="checkpoint", y="bytes", color="part", title="Bytes before and after", y_axis_format="~s",
                           height=320, sort=["original LoRA", "SHARE"], label="Bytes before and after", show_label=False)
    return ev, sizes


def build_demo() -> gr.Blocks:
    on_space = oauth_enabled()
    with gr.Blocks(title="lorashare: SHARE for LoRA adapters", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO.format(version=lorashare.__version__))
        with gr.Row(equal_height=True):
            if on_space:
                # OAuth only works on a Space; locally the login button would need a machine login.
                gr.LoginButton(scale=0, min_width=240)
            token_box = gr.Textbox(
                label="Hugging Face token (optional)", value="", type="password", scale=3, elem_id="hf-token",
                placeholder="hf_… — for private or gated repos, and to push" + (" (or sign in)" if on_space else ""),
                info="Used for this request only; never logged or stored.",
            )
        result = gr.State(None, time_to_live=LIMITS.state_ttl)

        with gr.Tab("Compress", id="compress"):
            ids = gr.Textbox(
                label="Adapter ids, one per line", lines=6, placeholder=ID_PLACEHOLDER, elem_id="adapter-ids",
                info=f"{ID_FORMS}; `name=owner/name` names one. 2–{LIMITS.max_adapters} adapters, "
                     f"at most {size(LIMITS.max_bytes)} downloaded.",
            )
            with gr.Row():
                k_mode = gr.Radio(["auto", "number"], value="auto", label="Components per module (k)",
                                  info="auto: the fewest that keep the variance threshold")
                k = gr.Number(value=32, label="k", precision=0, minimum=1, interactive=False)
                threshold = gr.Slider(0.5, 0.999, value=0.95, step=0.001, label="Variance threshold (auto)")
                storage = gr.Dropdown(list(SCHEMES), value="float32", label="Storage",
                                      info=f"int8: 8-bit; nf4: 4-bit NormalFloat; both keep one float32 scale per "
                                           f"block of {NF4_BLOCK} values",
                                      elem_id="storage")
            compress_btn = gr.Button("Compress", variant="primary", elem_id="compress-btn")
            status = gr.Markdown(label="Status", show_label=False, elem_id="compress-status")
            with gr.Column(visible=False) as compress_results:  # shown once there are results
                stats = gr.Dataframe(label="Compression statistics", interactive=False, wrap=True, elem_id="stats")
                fidelity = gr.Dataframe(label="Fidelity per adapter", interactive=False, wrap=True, elem_id="fidelity")
                ev_plot, bytes_plot = _result_plots()
                checkpoint_zip = gr.File(label="SHARE checkpoint (.zip)", interactive=False, elem_id="checkpoint-zip")
                with gr.Accordion("Push to the Hub", open=True):
                    gr.Markdown("Sign in (on the Space) or paste a token with write access above."
                                if on_space else "Paste a token with write access above (sign-in works on a Space).")
                    with gr.Row():
                        repo_box = gr.Textbox(label="Repo (owner/name)", placeholder="you/support-share", scale=3,
                                              elem_id="push-repo")
                        private = gr.Checkbox(value=True, label="Private", scale=1)
                        license_box = gr.Dropdown(
                            [("none", "")] + list(HUB_LICENSES), value="", label="License (optional)", scale=1,
                            info="one of the Hub's license ids", elem_id="push-license")
                    push_btn = gr.Button("Push to the Hub", elem_id="push-btn")
                    push_result = gr.Markdown(label="Push result", show_label=False, elem_id="push-result")

        with gr.Tab("Explore", id="explore"):
            with gr.Row():
                repo_id = gr.Textbox(label="SHARE checkpoint repo (owner/name)", scale=3, elem_id="explore-repo")
                revision = gr.Textbox(label="Revision (optional)", value="", placeholder="main", scale=1)
            explore_btn = gr.Button("Explore", variant="primary", elem_id="explore-btn")
            card = gr.Markdown(label="Checkpoint summary", show_label=False, elem_id="explore-card")
            with gr.Column(visible=False) as explore_results:  # shown once a checkpoint is read
                adapters = gr.Dataframe(label="Adapters", interactive=False, wrap=True, elem_id="explore-adapters")
                explore_stats = gr.Dataframe(label="Compression statistics", interactive=False, wrap=True)
                explore_ev, explore_bytes = _result_plots()
                with gr.Row():
                    adapter_pick = gr.Dropdown(label="Adapter to reconstruct", choices=[], allow_custom_value=True,
                                               scale=3)
                    rebuild_btn = gr.Button("Reconstruct as a PEFT adapter", scale=1, elem_id="reconstruct-btn")
                adapter_zip = gr.File(label="PEFT adapter (.zip)", interactive=False, elem_id="adapter-zip")
                snippet = gr.Markdown(label="How to load it", show_label=False, elem_id="reconstruct-snippet")

        with gr.Tab("Try it", id="try"):
            gr.Markdown("Run one text through several adapters of a SHARE checkpoint **in one batch**: every row "
                        "gets its own adapter over the shared bases (`SHAREModel.serve`). For base models of up to "
                        f"{LIMITS.try_max_params / 1e6:,.0f} M parameters, checked from their config.json before "
                        "any weight is downloaded.")
            with gr.Row():
                try_repo = gr.Textbox(label="SHARE checkpoint repo (owner/name)", scale=3, elem_id="try-repo")
                try_revision = gr.Textbox(label="Revision (optional)", value="", placeholder="main", scale=1)
            try_list_btn = gr.Button("List adapters", elem_id="try-list-btn")
            try_info = gr.Markdown(label="Checkpoint and base model", show_label=False, elem_id="try-info")
            try_pick = gr.Dropdown(label="Adapters to run", info=f"up to {LIMITS.try_max_adapters}", choices=[],
                                   multiselect=True, allow_custom_value=True, elem_id="try-adapters")
            try_text = gr.Textbox(label="Text", lines=3, elem_id="try-text",
                                  placeholder="A sentence to classify, or a prompt to continue")
            try_base = gr.Checkbox(value=True, label="Also run the base model alone (its own \"base model\" row)")
            try_btn = gr.Button("Run all in one batch", variant="primary", elem_id="try-btn")
            try_summary = gr.Markdown(label="Batch summary", show_label=False, elem_id="try-summary")
            with gr.Column(visible=False) as try_results:  # shown once a batch has run
                try_out = gr.Dataframe(label="Each adapter's output", interactive=False, wrap=True, elem_id="try-out")

        gr.Markdown(
            f"Limits: {LIMITS.max_adapters} adapters and {size(LIMITS.max_bytes)} of downloads per request; "
            "one job at a time, others wait in the queue. Also scriptable: "
            "`gradio_client.Client(...).predict(..., api_name=\"/compress\")` (and `/push`, `/explore`, `/reconstruct`, "
            "`/try_list`, `/try_run`)."
        )

        k_mode.change(_toggle_k, k_mode, [k, threshold], api_visibility="private", queue=False)
        for button in (compress_btn, push_btn, explore_btn, rebuild_btn, try_list_btn, try_btn):
            # A new try clears the messages of the last ones, so that an error on screen is this request's.
            button.click(None, js=CLEAR_MESSAGES, api_visibility="private", queue=False)
        compress_btn.click(
            compress, [ids, k_mode, k, threshold, token_box, storage],
            [status, stats, fidelity, ev_plot, bytes_plot, checkpoint_zip, result], api_name="compress",
            api_description=API_DESCRIPTIONS["compress"], show_progress_on=status,
        ).success(_reveal, None, compress_results, api_visibility="private", queue=False)
        push_btn.click(push, [result, repo_box, private, license_box, token_box], push_result, api_name="push",
                       api_description=API_DESCRIPTIONS["push"], show_progress_on=push_result,
                       ).success(_pushed_to, repo_box, [repo_id, try_repo], api_visibility="private", queue=False)
        explore_btn.click(
            explore, [repo_id, revision, token_box],
            [card, adapters, explore_stats, explore_ev, explore_bytes, adapter_pick], api_name="explore",
            api_description=API_DESCRIPTIONS["explore"], show_progress_on=card,
        ).success(_reveal, None, explore_results, api_visibility="private", queue=False)
        rebuild_btn.click(reconstruct, [repo_id, revision, adapter_pick, token_box], [adapter_zip, snippet],
                          api_name="reconstruct", api_description=API_DESCRIPTIONS["reconstruct"],
                          show_progress_on=snippet)
        try_list_btn.click(try_list, [try_repo, try_revision, token_box], [try_info, try_pick], api_name="try_list",
                           api_description=API_DESCRIPTIONS["try_list"], show_progress_on=try_info)
        try_btn.click(try_adapters, [try_repo, try_revision, try_pick, try_text, try_base, token_box],
                      [try_summary, try_out], api_name="try_run", api_description=API_DESCRIPTIONS["try_run"],
                      show_progress_on=try_summary,
                      ).success(_reveal, None, try_results, api_visibility="private", queue=False)
    demo.queue(default_concurrency_limit=1, max_size=LIMITS.queue_size)
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    demo = build_demo()
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        server_port=int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
        share=False,
        ssr_mode=False,
        show_error=False,
        state_session_capacity=LIMITS.max_sessions,
        footer_links=["api"],
        run_history=False,  # the run history would keep inputs (tokens too) in the browser
        max_file_size="1mb",  # nothing here takes uploads
        mcp_server=False,
    )


if __name__ == "__main__":
    main()
