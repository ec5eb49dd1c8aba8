"""Export: rebuilt adapters as standard PEFT folders, for inference engines (vLLM, SGLang, LoRAX).

An engine's multi-LoRA server takes plain PEFT folders and a ``max_lora_rank`` it was started
with; an adapter above it fails only when a request first names it.  :func:`check_ranks` says
so before anything is written, and :func:`export_adapter` writes one folder atomically in the
dtype the engine wants.

Example:
    >>> export_adapters(share.state, "exported", max_rank=16)  # doctest: +SKIP
    {'billing': '/srv/exported/billing', 'refunds': '/srv/exported/refunds'}
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Iterable, List, Mapping, Optional

import torch
from tqdm.auto import tqdm

from ..codec import edit
from ..codec.state import SHAREState, peft_config, rebuild
from ..errors import ConfigError, OutputPathError, StorageRangeError
from ..format.loraconfig import check_forward, engine_config
from ..peft.adapters import check_adapter_target, write_peft_adapter
from ..utils.names import is_within

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_DTYPES", "check_dtype", "check_engine", "check_rebuild_target", "check_ranks", "export_adapter",
           "export_adapters"]

EXPORT_DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The dtypes an exported adapter's LoRA factors may be written in (heads keep their own)."""


def check_dtype(dtype: Optional[str]) -> torch.dtype:
    """The torch dtype for ``dtype`` (default float32: the factors exactly as rebuilt).

    Example:
        >>> check_dtype("bfloat16")
        torch.bfloat16
    """
    if dtype is None:
        return torch.float32
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not supported; expected one of {sorted(EXPORT_DTYPES)}.",
                          problem=f"export dtype {dtype!r} is not supported.")
    return EXPORT_DTYPES[dtype]


def check_ranks(state: SHAREState, names: Iterable[str], max_rank: Optional[int]) -> None:
    """Refuse, naming every culprit, when an adapter's rank is above an engine's ``max_lora_rank``.

    Example:
        >>> check_ranks(share.state, ["billing"], max_rank=8)  # doctest: +SKIP
        Traceback (most recent call last):
        ConfigError: adapter 'billing' has rank 16, above the engine's max_lora_rank 8. ...
    """
    if max_rank is None:
        return
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ConfigError(f"max_rank must be a positive integer (the engine's max_lora_rank), not {max_rank!r}.")
    over = {n: state.records[n].rank for n in names if state.records[n].rank > max_rank}
    if over:
        need = max(over.values())
        if len(over) == 1:
            (n, r), = over.items()
            problem = f"adapter {n!r} has rank {r}, above the engine's max_lora_rank {max_rank}."
        else:
            listed = ", ".join(f"{n!r} (rank {r})" for n, r in over.items())
            problem = f"adapters {listed} have ranks above the engine's max_lora_rank {max_rank}."
        raise ConfigError(
            f"{problem} Start the engine with a max_lora_rank of at least {need} (vLLM: --max-lora-rank {need}), "
            "or leave these adapters out.", adapter=next(iter(over)), problem=problem)


def check_rebuild_target(state: SHAREState, folder: str, *, overwrite: bool = False) -> None:
    """Refuse a folder a rebuilt adapter of ``state`` may not be written to: what
    :func:`~lorashare.peft.adapters.check_adapter_target` refuses, and, unless ``overwrite``, a folder (or one
    holding a folder) one of ``state``'s adapters was compressed from: the lossy copy would take the original's place,
    and a later recompute would fit on it.

    Example:
        >>> check_rebuild_target(share.state, "runs/billing")  # doctest: +SKIP
        Traceback (most recent call last):
        OutputPathError: runs/billing is the source adapter 'billing' was compressed from ...
    """
    check_adapter_target(folder, inputs=list(state.inputs), overwrite=overwrite)
    if overwrite:
        return
    for n, rec in state.records.items():
        src = rec.source
        if not src or not os.path.isdir(src) or not is_within(src, folder):
            continue  # a Hub id, or a folder that is gone: nothing to lose
        what = "is" if os.path.realpath(src) == os.path.realpath(folder) else "holds"
        raise OutputPathError(
            f"{folder} {what} the source adapter {n!r} was compressed from ({src}); writing a rebuild there would "
            "replace the original with a lossy copy. Write to another folder, or pass overwrite=True (--overwrite) "
            "if that is what you want.", path=folder, adapter=n)


def check_engine(state: SHAREState, name: str) -> None:
    """Refuse ``name`` when an engine would compute other outputs than PEFT from its folder.

    vLLM and its kin read the factors, ``r``, ``lora_alpha`` and ``use_rslora`` only: an adapter that PEFT
    computes otherwise (a base-weight init like PiSSA, aLoRA, patterns that give a module its own scale...)
    is refused by name (:func:`lorashare.format.loraconfig.check_forward`).

    Example:
        >>> check_engine(share.state, "billing")  # doctest: +SKIP
    """
    rec = state.records[name]
    ranks = {k[:-2]: int(w.shape[1]) for k, w in rec.weights.items() if k.endswith(":A")}
    check_forward(rec.config, name, engine=True, ranks=ranks)


def _check_cast(name: str, cast: Mapping[str, torch.Tensor], rebuilt: Mapping[str, torch.Tensor], dtype: str) -> None:
    """Refuse factors that the export dtype cannot hold (float16 tops out at 65504): written as ``inf``, they
    would turn every output of the engine into NaN.  Refused rather than kept in float32, since the engine
    casts them to its own dtype anyway."""
    for key, t in cast.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            peak = float(rebuilt[key].detach().abs().max())
            limit = torch.finfo(t.dtype).max
            problem = (f"adapter {name!r}: {key} holds values up to {peak:.4g}, beyond {dtype}'s largest ({limit:.4g}): "
                       f"exported in {dtype} it would hold inf; nothing was written.")
            raise StorageRangeError(
                f"{problem} Export it in bfloat16 or float32, which hold that range (dtype='bfloat16'; on the "
                "command line --dtype bfloat16).", dtype=dtype, adapter=name, layer=key)


def export_adapter(state: SHAREState, name: str, folder: str, *, dtype: Optional[str] = None,
                   overwrite: bool = False, durable: bool = True) -> str:
    """Rebuild ``name`` and write it as a PEFT folder at ``folder`` (atomically); return its absolute path.

    The LoRA factors are written in ``dtype`` (default float32); heads keep their own dtype.
    ``durable=False`` skips the fsync (see :func:`lorashare.peft.adapters.write_peft_adapter`).

    Example:
        >>> export_adapter(share.state, "billing", "exported/billing", dtype="bfloat16")  # doctest: +SKIP
        '/srv/exported/billing'
    """
    edit.check_known(state, name)
    check_engine(state, name)
    check_rebuild_target(state, folder, overwrite=overwrite)
    cast = check_dtype(dtype)
    heads = state.records[name].heads
    rebuilt = rebuild(state, name, contiguous=False)
    tensors = {k: v.contiguous() if k in heads or not v.is_floating_point()
               else v.to(cast, memory_format=torch.contiguous_format)  # one pass: the cast and the copy
               for k, v in rebuilt.items()}
    _check_cast(name, {k: t for k, t in tensors.items() if k not in heads}, rebuilt, dtype or "float32")
    # PEFT's defaults made explicit where engines require them (lora_alpha: vLLM refuses a config without one).
    write_peft_adapter(folder, tensors, engine_config(peft_config(state.records[name], name)), inputs=list(state.inputs),
                       overwrite=overwrite, durable=durable)
    return os.path.abspath(folder)


def export_adapters(
    state: SHAREState,
    output_dir: str,
    names: Optional[Iterable[str]] = None,
    *,
    max_rank: Optional[int] = None,
    dtype: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Dict[str, str]:
    """Write ``names`` (default: all) as PEFT folders ``output_dir/<name>``; return ``{name: folder}``.

    Every name, rank and target is checked before the first folder is written, so a refusal
    leaves nothing behind; each folder is then written atomically.

    Example:
        >>> export_adapters(share.state, "exported", ["billing", "refunds"], max_rank=16)  # doctest: +SKIP
    """
    chosen: List[str] = list(state.names) if names is None else list(dict.fromkeys(names))
    for n in chosen:
        edit.check_known(state, n)
        check_engine(state, n)
    check_ranks(state, chosen, max_rank)
    check_dtype(dtype)
    targets = {n: os.path.join(os.fspath(output_dir), n) for n in chosen}
    for out in targets.values():
        check_rebuild_target(state, out, overwrite=overwrite)
    written: Dict[str, str] = {}
    for n in tqdm(chosen, desc="exporting adapters", unit="adapter", disable=not progress or len(chosen) < 2):
        written[n] = export_adapter(state, n, targets[n], dtype=dtype, overwrite=overwrite)
        logger.info("exported %s -> %s", n, written[n])
    return written
