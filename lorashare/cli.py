"""The ``lorashare`` command: thin verbs over the public API.

``main(argv) -> int``: 0 on success, 1 on a lorashare error (one line on stderr),
2 on bad usage.  ``--json`` prints one versioned object to stdout; logs and
progress go to stderr.

The library's messages name Python fixes (``overwrite=True``); :data:`CLI_MESSAGES`
turns those whose fix reads differently here into the flags that exist for the
subcommand at hand, from the fields the errors carry.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import __version__
from .errors import (
    AdapterNotFoundError,
    ConfigError,
    DuplicateAdapterError,
    ForeignFolderError,
    HubAuthError,
    HubNotFoundError,
    InvalidNameError,
    LocalBaseModelError,
    LoraShareError,
    StorageRangeError,
)
from .format.storage import NF4_BLOCK, SCHEMES
from .peft.adapters import check_source, name_sources

logger = logging.getLogger(__name__)

JSON_SCHEMA_VERSION = 1


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


#: The library's notes (log records with a ``lorashare_note``) that the running command prints
#: itself, in its own words (flags, not keywords): shown once, not twice.
_OWN_NOTES: set = set()


class _OwnNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "lorashare_note", None) not in _OWN_NOTES


_OWN_NOTES_FILTER = _OwnNotes()


def _finite(value: Any) -> Any:
    """``value`` with every NaN/±Inf float replaced by ``None`` (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_line(args: argparse.Namespace, payload: Dict[str, Any]) -> str:
    """The one versioned JSON object of a ``--json`` run: strict JSON, never NaN or Infinity."""
    body = {"lorashare": JSON_SCHEMA_VERSION, "version": __version__, "command": args.command, **payload}
    return json.dumps(_finite(body), default=str, allow_nan=False)


def _emit(args: argparse.Namespace, payload: Dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(_json_line(args, payload))
    elif text:
        print(text)


def _k(value: str):
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer or 'auto'") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"k must be ≥ 1, got {k}")
    return k


def _sources(args: argparse.Namespace):
    named: Dict[str, str] = {}
    for item in args.name or []:
        if "=" not in item:
            raise UsageError(f"--name {item!r}: expected NAME=PATH")
        n, p = item.split("=", 1)
        if n in named:
            raise UsageError(f"--name {n!r} is given twice")
        named[n] = p
    positional = list(args.adapters or [])
    if args.names:
        if len(args.names) != len(positional):
            raise UsageError(f"--names gives {len(args.names)} names for {len(positional)} adapters")
        for n, p in zip(args.names, positional):
            if n in named:
                raise UsageError(f"duplicate adapter name {n!r}")
            named[n] = p
        positional = []
    given = len(named) + len(positional)
    if args.on_error == "raise" or given < 2:
        # A path that is not there, a folder of adapters, a pattern the shell left alone: said before
        # the count (one folder of four adapters is not "1 adapter"), and before any Hub request.
        for n, p in [*named.items(), *((None, p) for p in positional)]:
            check_source(p, name=n)
    if given < 2:
        raise UsageError(
            f"compress needs at least 2 adapters (folders or Hub ids) to share a basis, got {given}. "
            "Example: lorashare compress runs/a runs/b -o share_ckpt"
        )
    # Unnamed ones get their folder's (or Hub repo's) name, made unique as the library does; named
    # here, so that a clash is logged by name_sources, whose note needs no Python-only fix.
    return name_sources([*named.items(), *((None, p) for p in positional)])


def cmd_compress(args: argparse.Namespace) -> int:
    from .format.checkpoint import check_checkpoint_target
    from .model import SHAREModel

    k = "auto" if args.auto else args.num_components  # None: -k not given, the library's default
    budget_given = args.budget_bytes is not None or args.target_ratio is not None
    _OWN_NOTES.add("larger")
    if isinstance(k, int) and not budget_given:
        _OWN_NOTES.add("k_capped")
    sources = _sources(args)
    local = [p for p in sources.values() if os.path.exists(p)]
    check_checkpoint_target(args.output, inputs=local, overwrite=args.overwrite)  # fail before the work
    share = SHAREModel.from_adapters(
        sources, **({} if k is None else {"num_components": k}), variance_threshold=args.variance, device=args.device,
        on_error=args.on_error, dtype=args.dtype, budget_bytes=args.budget_bytes, strict=args.strict,
        target_ratio=args.target_ratio, weighting=args.weighting, base_model=args.base_model,
        progress=not args.json and not args.quiet, token=os.environ.get("HF_TOKEN"),
    )
    share.save_pretrained(args.output, overwrite=args.overwrite)
    cfg = share.config
    st = cfg.compression_stats
    if isinstance(k, int) and not budget_given:
        _note_if_capped(args, k, cfg.k_per_group)
    _note_if_larger(args, st)
    disk = _bytes_on_disk(args.output)
    on_disk = st["original_lora_bytes"] / disk if disk and st.get("original_lora_bytes") else None
    stats = {**_public_stats(st), "compressed_bytes_on_disk": disk, "compression_ratio_on_disk": on_disk}
    if args.target_ratio is not None:  # the budget counts the files, so the ratio printed does too
        ratio = f"{on_disk or 0:.2f}x on disk (target {args.target_ratio:g}x; the bases' and loadings' files)"
    elif args.budget_bytes is not None:
        ratio = f"{disk} bytes on disk (budget {args.budget_bytes}; the bases' and loadings' files), {on_disk or 0:.2f}x"
    else:
        ratio = f"{st['compression_ratio']:.2f}x (bases counted)"
    _emit(args, {"output": os.path.abspath(args.output), "adapters": share.adapter_names, "stats": stats,
                 "target_ratio": args.target_ratio, "budget_bytes": cfg.budget_bytes},
          f"compressed {len(share.adapter_names)} adapters into {args.output}: {ratio}, "
          f"ΔW error mean {st['delta_w_rel_error_mean']:.4f}")
    return 0


def _bytes_on_disk(checkpoint: str) -> int:
    """Bytes of the checkpoint's bases' and loadings' files, headers and scales included: what a byte budget counts."""
    from .format.checkpoint import COMPONENTS_FILE, LOADINGS_FILE, checkpoint_files, read_config

    files = [rel for rel in checkpoint_files(read_config(checkpoint))
             if rel == COMPONENTS_FILE or rel.endswith("/" + LOADINGS_FILE)]
    return sum(os.path.getsize(os.path.join(checkpoint, *rel.split("/"))) for rel in files)


def _note_if_capped(args: argparse.Namespace, k: int, k_per_group: Dict[str, int]) -> None:
    """One line on stderr when -k is more than every module needs to be lossless, and what was used instead."""
    most = max(k_per_group.values(), default=0)
    if not most or k <= most:  # some module used k: nothing was capped for all of them
        return
    using = f"k={most}" if min(k_per_group.values()) == most else f"each module's lossless k (at most {most})"
    print(f"lorashare {args.command}: note: -k {k} is more than the {most} components these adapters need to be "
          f"lossless (k = N·r, their ranks summed); using {using}.", file=sys.stderr)


def _note_if_larger(args: argparse.Namespace, st: Dict[str, Any]) -> None:
    """One line on stderr when the checkpoint is larger than its input, with the k that would help."""
    if not st.get("original_lora_bytes") or st.get("compression_ratio", 1.0) >= 1.0:
        return
    k = st.get("largest_saving_k")
    again = "compressing them again with " if args.command != "compress" else ""
    fix = f"{again}-k {k} or lower would make it smaller" if k else "with so few adapters no k saves space"
    print(f"lorashare {args.command}: note: the checkpoint is {1 / st['compression_ratio']:.2f}x the size of the "
          f"adapters' LoRA weights (the shared bases cost more than they save); {fix}.", file=sys.stderr)


def _public_stats(st: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in st.items() if k not in ("per_layer_explained_variance", "card")}


def _load(args: argparse.Namespace, adapters: Optional[List[str]] = None):
    from .model import SHAREModel

    return SHAREModel.from_pretrained(args.checkpoint, revision=getattr(args, "revision", None), adapters=adapters,
                                      token=os.environ.get("HF_TOKEN"))


def cmd_info(args: argparse.Namespace) -> int:
    share = _load(args)
    cfg = share.config
    if args.json:
        _emit(args, {
            "checkpoint": args.checkpoint, "format_version": cfg.format_version, "base_model": cfg.base_model_name_or_path,
            "adapters": {n: {**cfg.adapters.get(n, {}), "delta_w_error": share.reconstruction_error(n) if share.delta_w_errors.get(n) else None}
                         for n in share.adapter_names},
            "k_per_group": cfg.k_per_group, "dtype": cfg.dtype, "compression": share.spec.to_dict(),
            "stats": _public_stats(cfg.compression_stats),
        }, "")
    else:
        share.summary()
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from .serving.export import export_adapter, export_adapters

    if not args.adapter and not args.all:
        raise UsageError("give --adapter NAME or --all")
    share = _load(args, None if args.all else [args.adapter])
    # export_adapters checks every target before it writes the first, so a refused one leaves nothing behind.
    if args.all:
        written = export_adapters(share.state, args.output, overwrite=args.overwrite, progress=False)
    else:
        written = {args.adapter: export_adapter(share.state, args.adapter, args.output, overwrite=args.overwrite)}
    if not args.json:
        for n in written:
            print(f"{n} -> {os.path.join(args.output, n) if args.all else args.output}")
    _emit(args, {"written": written}, "")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .serving.export import export_adapters

    share = _load(args, args.adapter or None)
    written = export_adapters(share.state, args.output, args.adapter or None, max_rank=args.max_rank, dtype=args.dtype,
                              overwrite=args.overwrite, progress=not (args.quiet or args.json))
    ranks = {n: share.records[n].rank for n in written}
    if not args.json:
        for n in written:
            print(f"{n} -> {os.path.join(args.output, n)} (rank {ranks[n]})")
    _emit(args, {"written": written, "ranks": ranks}, "")
    return 0


def _edit(args: argparse.Namespace, change: Callable[[Any], Dict[str, Any]], message: Callable[[Dict[str, Any]], str]
          ) -> Tuple[Any, Dict[str, Any]]:
    """Load the checkpoint, ``change`` it, write it back: a folder under its edit lock (a second edit at the same
    time waits, then applies to this one's result), a Hub repo in one commit (refused if it moved meanwhile)."""
    from . import hub
    from .format.lock import folder_lock

    if os.path.isdir(args.checkpoint):
        with folder_lock(args.checkpoint):
            share = _load(args)
            report = change(share)
            share.save_pretrained(args.checkpoint)
        return share, report
    if os.path.lexists(args.checkpoint) or hub.is_local_path(args.checkpoint) or not hub.is_hub_id(args.checkpoint):
        _load(args)  # says what is wrong with the path
    ref = hub.parse_adapter_id(args.checkpoint)
    if ref.revision or ref.subfolder:
        raise UsageError(f"{args.command} edits the head of a Hub repo's main branch: give the repo id alone "
                         f"({ref.repo_id}), not {args.checkpoint!r}")
    share = _load(args)
    report = change(share)
    info = share.push_to_hub(ref.repo_id, token=os.environ.get("HF_TOKEN"), commit_message=message(report))
    report["commit_url"] = getattr(info, "commit_url", str(info))
    return share, report


def cmd_add(args: argparse.Namespace) -> int:
    from .errors import WorsenedError

    _OWN_NOTES.update(("larger", "worsened", "reconstructed"))  # said below, with this command's flags
    originals = _originals(args)

    def change(share: Any) -> Dict[str, Any]:
        try:
            return share.add_adapter(args.path, name=args.adapter_name, variance_threshold=args.variance,
                                     force_recompute=args.force_recompute, token=os.environ.get("HF_TOKEN"),
                                     replace=args.replace, strict=args.strict, originals=originals or None)
        except WorsenedError as exc:
            if exc.lossless_k is None:
                raise
            raise WorsenedError(f"{exc.problem} --strict refuses that; nothing was written. Drop --strict to accept "
                                f"it, or compress the adapters together again with -k {exc.lossless_k} (the sum of "
                                "their ranks: lossless).", worsened=exc.worsened, lossless_k=exc.lossless_k,
                                adapter=exc.adapter, problem=exc.problem) from None

    share, report = _edit(args, change, lambda r: f"lorashare add: {r['adapter_name']} by {r['method']}")
    _note_if_larger(args, share.config.compression_stats)
    pushed = f"; pushed {report['commit_url']}" if "commit_url" in report else ""
    worse = report.get("worsened") or {}
    raised = f"; raised the ΔW error of {', '.join(worse)} (see the warning)" if worse else ""
    _emit(args, report, f"added {report['adapter_name']} by {report['method']} ({report['reason']}){raised}{pushed}")
    _note_edit_quality(args, report, sum(r.rank for r in share.records.values()))
    return 0


def _originals(args: argparse.Namespace) -> Dict[str, str]:
    """``--original NAME=PATH`` flags as ``{name: path}``."""
    out: Dict[str, str] = {}
    for item in getattr(args, "original", None) or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--original {item!r}: expected NAME=PATH (an adapter of the checkpoint, and its "
                             "original folder or Hub id)")
        if name in out:
            raise UsageError(f"--original {name!r} is given twice")
        out[name] = path
    return out


def _note_edit_quality(args: argparse.Namespace, report: Dict[str, Any], lossless_k: int) -> None:
    """Warnings on stderr when an edit made the adapters already there worse, or rebuilt them from reconstructions."""
    rebuilt = report.get("reconstructed") or []
    if rebuilt:
        print(f"lorashare {args.command}: warning: no original for {', '.join(rebuilt)} (the source folder is gone "
              "or changed since compression): recompressed from the reconstruction, so the losses add up, and the "
              "recorded ΔW error is now an upper bound (shown as ≤). To start from the originals, keep the source "
              "folders unchanged, or pass --original NAME=PATH.", file=sys.stderr)
    worse = report.get("worsened") or {}
    if worse:
        changes = ", ".join(f"{n} {w['before']:.4f} → {'≤ ' if w.get('bound') else ''}{w['after']:.4f}"
                            for n, w in worse.items())
        print(f"lorashare {args.command}: warning: the recompute raised the ΔW error (max over modules) of the "
              f"adapters already there: {changes}. Compress them together again with -k {lossless_k} (the sum of their "
              "ranks: lossless), or pass --strict to refuse such an add.", file=sys.stderr)


def cmd_remove(args: argparse.Namespace) -> int:
    def change(share: Any) -> Dict[str, Any]:
        share.remove_adapter(args.adapter_name)
        return {"removed": args.adapter_name, "adapters": share.adapter_names}

    _, report = _edit(args, change, lambda r: f"lorashare remove: {r['removed']}")
    pushed = f"; pushed {report['commit_url']}" if "commit_url" in report else ""
    _emit(args, report, f"removed {args.adapter_name}{pushed}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    share = _load(args)
    if args.base_model:
        share.set_base_model(args.base_model)
    info = share.push_to_hub(args.repo_id, private=args.private, token=os.environ.get("HF_TOKEN"),
                             commit_message=args.message, create_pr=args.create_pr, revision=args.branch,
                             license=args.license)
    url = getattr(info, "commit_url", str(info))
    _emit(args, {"repo_id": args.repo_id, "commit_url": url, "commit_sha": getattr(info, "oid", None),
                 "repo_url": str(getattr(info, "repo_url", ""))}, f"pushed to {url}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from .sync.run import check_sync, run_sync

    if args.check:
        if args.force:
            raise UsageError("--check validates offline and never pushes, so --force does nothing with it: drop "
                             "--force, or drop --check to sync")
        checked = check_sync(args.config, json_mode=args.json)
        if args.json:
            print(_json_line(args, checked.to_json()))
        if checked.ok:
            if not args.json:
                print(checked.text())
            return 0
        print(checked.text(), file=sys.stderr)
        return 1
    result = run_sync(args.config, dry_run=args.dry_run, force=args.force,
                      progress=not args.json and not args.quiet, json_mode=args.json)
    _emit(args, result.to_json(), result.text())
    return 0


def _rebuild_flags(parser: argparse.ArgumentParser) -> None:
    """--overwrite and --revision, as the verbs that write rebuilt adapters have them."""
    parser.add_argument("--overwrite", action="store_true",
                        help="also replace a non-empty folder that lorashare did not write (never a file, '.', "
                             "the checkpoint, anything inside it, or a folder holding it)")
    parser.add_argument("--revision", help="Hub branch, tag or commit")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object to stdout (logs go to stderr)")
    common.add_argument("-v", "--verbose", action="store_true", help="log more (to stderr)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--hub-timeout", type=float, metavar="SECONDS",
                        help="how long one Hub operation may take in all, retries included (default: "
                             "$LORASHARE_HUB_TIMEOUT, else 60)")

    parser = argparse.ArgumentParser(
        prog="lorashare",
        description="Compress many PEFT LoRA adapters of one base model into shared bases (SHARE), and rebuild them.",
        epilog="Exit codes: 0 success, 1 error, 2 bad usage. HF_TOKEN is read from the environment for the Hub.",
    )
    parser.add_argument("--version", action="version", version=f"lorashare {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    compress = sub.add_parser("compress", parents=[common], help="compress adapters into a SHARE checkpoint",
                              description="Compress PEFT LoRA adapters (folders or Hub ids user/repo[/sub][@rev]) into a SHARE checkpoint.")
    compress.add_argument("adapters", nargs="*", help="adapter folders or Hub ids")
    compress.add_argument("-o", "--output", required=True,
                          help="checkpoint folder to write: new, empty, or a SHARE checkpoint (replaced atomically)")
    compress.add_argument("--overwrite", action="store_true",
                          help="also replace a non-empty folder that is not a SHARE checkpoint (never a file, '.', "
                               "an input, a folder inside one, or a folder holding one)")
    compress.add_argument("-k", "--num-components", type=_k, help="components per module and side, or 'auto' "
                          "(default 32); N·r, the adapters' ranks summed, is lossless, and a larger k is cut to it")
    compress.add_argument("--auto", action="store_true", help="pick k per module from --variance")
    compress.add_argument("--variance", type=float, default=0.95,
                          help="share of the ΔW energy to keep with --auto, in (0, 1] (default 0.95)")
    compress.add_argument("--name", action="append", metavar="NAME=PATH", help="a named adapter (repeatable)")
    compress.add_argument("--names", nargs="+", help="names for the positional adapters, in order (0.1.x style)")
    compress.add_argument("--dtype", choices=SCHEMES, default="float32",
                          help="storage of bases and loadings: float32 (default), float16, bfloat16, int8 (8-bit) "
                               f"or nf4 (4-bit NormalFloat); int8 and nf4 keep one float32 scale per block of "
                               f"{NF4_BLOCK} values")
    budget = compress.add_mutually_exclusive_group()
    budget.add_argument("--budget-bytes", type=int, metavar="BYTES",
                        help="size on disk of the bases' and loadings' files (headers and scales included); "
                             "k chosen per module (overrides -k)")
    budget.add_argument("--target-ratio", type=float, metavar="R",
                        help="compress to 1/R of the adapters' LoRA bytes, counted on disk as --budget-bytes is; "
                             "k chosen per module (overrides -k)")
    compress.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    compress.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="skip unreadable adapters instead of failing")
    compress.add_argument("--strict", action="store_true", help="refuse mixed ranks or target modules")
    compress.add_argument("--base-model", metavar="OWNER/NAME",
                          help="the base model's Hub id, when the adapters were trained from a local folder")
    compress.add_argument("--weighting", choices=["delta_w", "factors"], default="delta_w",
                          help="fit the bases to the updates ΔW, each adapter normalised (default), or to the plain "
                               "factors (PCA); kept in the checkpoint for later recomputes")
    compress.add_argument("--layer-by-layer", action="store_true", help=argparse.SUPPRESS)
    compress.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    compress.set_defaults(func=cmd_compress)

    info = sub.add_parser("info", parents=[common], help="show a checkpoint's adapters and stats",
                          description="Show the adapters and compression stats of a SHARE checkpoint (folder or Hub id).")
    info.add_argument("checkpoint", help="checkpoint folder or Hub repo id")
    info.add_argument("--revision", help="Hub branch, tag or commit")
    info.set_defaults(func=cmd_info)

    reconstruct = sub.add_parser("reconstruct", parents=[common], help="rebuild adapters as standard PEFT folders",
                                 description="Rebuild one adapter (--adapter) or all (--all, one subfolder each) as PEFT adapter folders.")
    reconstruct.add_argument("checkpoint", help="checkpoint folder or Hub repo id")
    which = reconstruct.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="the adapter to rebuild")
    which.add_argument("--all", action="store_true", help="rebuild every adapter into OUTPUT/<name>")
    reconstruct.add_argument("-o", "--output", required=True,
                             help="output folder: new, empty, or an adapter lorashare rebuilt before (replaced atomically)")
    _rebuild_flags(reconstruct)
    reconstruct.set_defaults(func=cmd_reconstruct)

    export = sub.add_parser(
        "export", parents=[common], help="write adapters as PEFT folders for vLLM, SGLang or LoRAX",
        description="Rebuild all adapters (or those given with --adapter) as standard PEFT folders OUTPUT/<name>, "
                    "for an inference engine's static LoRA list (vLLM: --lora-modules name=OUTPUT/name). "
                    "--max-rank checks every adapter against the engine's max_lora_rank before anything is written.")
    export.add_argument("checkpoint", help="checkpoint folder or Hub repo id (from the Hub, only the chosen adapters "
                                           "are downloaded)")
    export.add_argument("-o", "--output", required=True, help="folder to write OUTPUT/<name> into")
    export.add_argument("--adapter", action="append", metavar="NAME", help="an adapter to export (repeat; default: all)")
    export.add_argument("--max-rank", type=int, metavar="R",
                        help="refuse (exit 2, nothing written) if an adapter's rank is above R, the engine's max_lora_rank")
    export.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the LoRA factors on disk (default float32; engines cast to the model's dtype)")
    _rebuild_flags(export)
    export.set_defaults(func=cmd_export)

    add = sub.add_parser("add", parents=[common], help="add an adapter to a checkpoint (projection or recompute)",
                         description="Add an adapter to a checkpoint, by projection onto the bases when they explain it well enough, else by recomputing. A folder is rewritten atomically (edits at the same time wait for each other); a Hub repo gets one commit (token from HF_TOKEN), refused if the repo changed meanwhile.")
    add.add_argument("checkpoint", help="checkpoint folder (it must hold only lorashare's files) or Hub repo id owner/name")
    add.add_argument("path", help="adapter folder or Hub id")
    add.add_argument("--name", dest="adapter_name", help="name for the new adapter")
    add.add_argument("--variance", type=float,
                     help="projection threshold in (0, 1]: the share of the adapter's ΔW energy the bases must "
                          "explain, else the bases are recomputed (default: the checkpoint's)")
    add.add_argument("--force-recompute", action="store_true", help="always recompute the bases")
    add.add_argument("--replace", action="store_true", help="replace the adapter of the same name, in one step")
    add.add_argument("--strict", action="store_true",
                     help="refuse (exit 1, nothing written) an add whose recompute raises the ΔW error of the "
                          "adapters already there")
    add.add_argument("--original", action="append", metavar="NAME=PATH",
                     help="where adapter NAME's original is (folder or Hub id), for a recompute to start from it "
                          "rather than from its reconstruction (repeat; default: its recorded source)")
    add.set_defaults(func=cmd_add)

    remove = sub.add_parser("remove", parents=[common], help="remove an adapter from a checkpoint",
                            description="Remove an adapter from a checkpoint (a folder, rewritten atomically, or a Hub repo, in one commit); the others are untouched.")
    remove.add_argument("checkpoint", help="checkpoint folder (it must hold only lorashare's files) or Hub repo id owner/name")
    remove.add_argument("adapter_name", metavar="NAME", help="adapter to remove")
    remove.set_defaults(func=cmd_remove)

    push = sub.add_parser("push", parents=[common], help="upload a checkpoint to the Hub in one commit",
                          description="Upload a checkpoint with its model card to a Hub repo in one commit (token from HF_TOKEN).")
    push.add_argument("checkpoint", help="checkpoint folder")
    push.add_argument("repo_id", help="target repo, owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--message", help="commit message")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    push.add_argument("--branch", help="target branch")
    push.add_argument("--license", help="license for the model card metadata")
    push.add_argument("--base-model", metavar="OWNER/NAME",
                      help="the base model's Hub id (required when the checkpoint names a local folder)")
    push.set_defaults(func=cmd_push)

    sync = sub.add_parser("sync", parents=[common], help="recompress and republish when a manifest's adapters change",
                          description="Compare the adapters named in a manifest (lorashare.yaml) with the checkpoint published "
                                      "on the Hub; when they differ, add (projection) or recompress, and push one commit. See "
                                      "the docstring of lorashare.sync.manifest (python -m pydoc lorashare.sync.manifest) for every key "
                                      "of the manifest, and examples/lorashare.yaml in the lorashare repository for one that works. "
                                      "Token from HF_TOKEN "
                                      "(not needed with --dry-run or --check).")
    sync.add_argument("--config", default="lorashare.yaml", help="the manifest (default lorashare.yaml)")
    mode = sync.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="validate the manifest and its adapter folders offline (no Hub request, no token), e.g. "
                           "in a pre-commit hook: exit 0 valid, 1 a broken or incompatible adapter folder, 2 a bad "
                           "manifest")
    mode.add_argument("--dry-run", action="store_true", help="decide and report; push nothing")
    sync.add_argument("--force", action="store_true", help="recompress and push even if nothing changed")
    sync.set_defaults(func=cmd_sync)

    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # the terminal's: the command prints some notes itself
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__):
            handler.addFilter(_OWN_NOTES_FILTER)
    try:
        _hub_settings(args)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe (| head) is caught below, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (lorashare info --json | head): no traceback, and none at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UsageError as exc:
        if getattr(args, "json", False):
            print(_json_line(args, {"error": str(exc), "type": "UsageError"}))
        print(f"lorashare {args.command}: usage error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        _fail(args, exc)
        return 2
    except LoraShareError as exc:
        _fail(args, exc)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _OWN_NOTES.clear()


def _hub_settings(args: argparse.Namespace) -> None:
    """--hub-timeout for every Hub call of this run; no download bars with -q, --json or a non-terminal stderr."""
    from . import hub

    if args.hub_timeout is not None:
        if not (math.isfinite(args.hub_timeout) and args.hub_timeout > 0):
            raise UsageError(f"--hub-timeout {args.hub_timeout:g}: expected a number of seconds above 0 "
                             f"(default {hub.DEFAULT_TIMEOUT:g}), e.g. --hub-timeout 120")
        os.environ[hub.TIMEOUT_ENV] = str(args.hub_timeout)
    if args.quiet or getattr(args, "json", False) or not sys.stderr.isatty():
        hub.disable_progress_bars()


def _duplicate_message(exc: LoraShareError, args: argparse.Namespace) -> str:
    ckpt = getattr(args, "checkpoint", None) or "CHECKPOINT"
    return (f"adapter {exc.adapter!r} is already in {ckpt}. Add it under another name with --name NAME, replace it "
            f"with --replace, or remove the old one first: lorashare remove {shlex.quote(ckpt)} "
            f"{shlex.quote(str(exc.adapter))}")


def _with_fix(exc: LoraShareError, fix: Optional[str]) -> str:
    """The error's problem (its message without Python's fix) followed by ``fix``; an error raised
    without ``problem`` keeps its own message (never two fixes)."""
    if exc.problem is None:
        return str(exc)
    return f"{exc.problem} {fix}" if fix else exc.problem


def _foreign_message(exc: LoraShareError, args: argparse.Namespace) -> str:
    if args.command in ("compress", "reconstruct", "export"):  # the subcommands that have --overwrite
        return _with_fix(exc, "Choose another path, remove it yourself, or pass --overwrite to replace it.")
    if args.command in ("add", "remove"):
        # An edit in place: --overwrite would delete what the user put there, so no such flag; moving it works.
        ckpt = getattr(args, "checkpoint", None) or "the checkpoint"
        return _with_fix(exc, f"Move that out of {ckpt} (a checkpoint folder holds only the files lorashare "
                              f"wrote), then run lorashare {args.command} again.")
    return _with_fix(exc, None)


def _invalid_name_message(exc: LoraShareError, args: argparse.Namespace) -> str:
    chosen = getattr(args, "adapter", None)
    given = [*(getattr(args, "names", None) or []), *(chosen if isinstance(chosen, list) else [chosen]),
             getattr(args, "adapter_name", None),
             *(item.split("=", 1)[0] for item in getattr(args, "name", None) or [] if isinstance(item, str))]
    if exc.adapter not in given:  # not a name typed here (one read from a checkpoint): no flag fixes it
        return _with_fix(exc, None)
    fix = {
        "compress": "Pick another name with --name NAME=PATH (or --names).",
        "add": "Pick another name with --name NAME.",
    }.get(args.command)
    if fix is None and args.command in ("reconstruct", "remove", "export"):
        ckpt = getattr(args, "checkpoint", None) or "CHECKPOINT"
        fix = f"Give the name of an adapter in the checkpoint (lorashare info {shlex.quote(ckpt)} lists them)."
    return _with_fix(exc, fix)


def _storage_range_message(exc: LoraShareError, args: argparse.Namespace) -> str:
    if args.command == "add":  # the checkpoint's dtype is fixed; a new compress picks another
        return _with_fix(exc, f"The checkpoint stores {getattr(exc, 'dtype', 'its dtype')}, which cannot hold "
                              "them: compress the adapters again with --dtype float32 or --dtype bfloat16.")
    if args.command == "compress":
        return _with_fix(exc, "Compress with --dtype float32 or --dtype bfloat16, which hold the range.")
    return _with_fix(exc, None)


def _not_found_message(exc: LoraShareError, args: argparse.Namespace) -> str:
    """A folder of adapters, or a wildcard pattern the shell passed on: the shell's fix, not Python's."""
    path = exc.path or ""
    if exc.problem is None:
        return str(exc)
    if os.path.isdir(path):  # a folder of adapters
        if args.command == "compress":
            return _with_fix(exc, f"Pass them all with {shlex.quote(path.rstrip('/') or path)}/* (the shell lists them).")
        if args.command == "add":
            ckpt = shlex.quote(getattr(args, "checkpoint", None) or "CHECKPOINT")
            return _with_fix(exc, f"Add them one at a time: lorashare add {ckpt} {shlex.quote(path.rstrip('/'))}/NAME.")
        return str(exc)
    import glob

    if glob.glob(os.path.expanduser(path)):
        return _with_fix(exc, "The shell did not expand it (was it quoted?): write it without quotes.")
    return _with_fix(exc, "The shell passed it on unexpanded because it matched nothing.")


#: The library's keywords that are flags of a subcommand here (keyword → flag, and its dest in args):
#: a ConfigError about one ("target_ratio=0.0: expected ...") names the flag and the value typed.
KEYWORD_FLAGS: Dict[str, Dict[str, Tuple[str, str]]] = {
    "compress": {"num_components": ("-k", "num_components"), "variance_threshold": ("--variance", "variance"),
                 "target_ratio": ("--target-ratio", "target_ratio"), "budget_bytes": ("--budget-bytes", "budget_bytes"),
                 "device": ("--device", "device"), "dtype": ("--dtype", "dtype"), "weighting": ("--weighting", "weighting")},
    "add": {"variance_threshold": ("--variance", "variance")},
}


def _config_message(exc: LoraShareError, args: argparse.Namespace) -> str:
    msg = str(exc)
    if args.command == "export" and getattr(args, "max_rank", None) is not None and "max_lora_rank" in msg:
        return f"--max-rank {args.max_rank}: {msg}"
    for keyword, (flag, dest) in KEYWORD_FLAGS.get(args.command, {}).items():
        m = re.match(rf"{keyword}=\S*?: ", msg)
        if m:
            value = getattr(args, dest, None)
            shown = f"{value:g}" if isinstance(value, float) else shlex.quote(str(value))
            return f"{flag} {shown}: {msg[m.end():]}"
    return msg


#: Errors whose fix reads differently on the command line than in Python (flags, not arguments),
#: each rendered from the fields it carries.  A subclass comes before its base.
CLI_MESSAGES: Dict[type, Callable[[LoraShareError, argparse.Namespace], str]] = {
    DuplicateAdapterError: _duplicate_message,
    HubNotFoundError: lambda exc, args: _with_fix(exc, "Check the id; for a private repo set HF_TOKEN." if exc.problem
                                                  else None),
    HubAuthError: lambda exc, args: _with_fix(exc, "Set HF_TOKEN to a token with access (write access to push), or "
                                                   "log in once with `hf auth login`."),
    LocalBaseModelError: lambda exc, args: _with_fix(exc, (
        "Name its Hub id in the manifest: base_model: OWNER/NAME." if args.command == "sync" else
        "Pass its Hub id: lorashare push CHECKPOINT REPO --base-model OWNER/NAME." if args.command == "push" else
        "Pass its Hub id with --base-model OWNER/NAME.")),
    ForeignFolderError: _foreign_message,
    InvalidNameError: _invalid_name_message,
    StorageRangeError: _storage_range_message,
    AdapterNotFoundError: _not_found_message,
    ConfigError: _config_message,  # after LocalBaseModelError, a ConfigError with its own message
}


def _fail(args: argparse.Namespace, exc: LoraShareError) -> None:
    render = next((fn for cls, fn in CLI_MESSAGES.items() if isinstance(exc, cls)), None)
    msg = (render(exc, args) if render else str(exc)).replace("\n", " ")
    if getattr(args, "json", False):
        print(_json_line(args, {"error": msg, "type": type(exc).__name__}))
    print(f"lorashare {args.command}: error: {msg}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
