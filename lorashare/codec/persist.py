"""Saving and pushing a state: checked read-modify-writes, and partial views kept whole.

A state loaded from a checkpoint remembers it (:class:`~lorashare.codec.state.Origin`).  Writing
it back there is a read-modify-write, so it is checked and completed here:

* **no lost update**: a save over the folder it was loaded from holds that folder's edit lock
  (:func:`lorashare.format.lock.folder_lock`) and first checks that ``share_config.json`` is still
  the one read; a push back to its own repo, loaded from the head of ``main``, pushes only if the
  branch is still at the commit read.  Otherwise :class:`~lorashare.errors.ConflictError`, and
  nothing is written.
* **a partial view stays partial, never destructive**: a model loaded with ``adapters=[...]``
  that is saved or pushed back writes the checkpoint *with* the adapters it did not load, read
  again from the same revision (bit for bit), so a card edit or an added adapter never deletes
  the others.  Where its bases were refitted, the unseen adapters no longer fit and the write is
  refused.

Saving elsewhere writes just what the model holds.

Example:
    >>> state = save_state(share.state, "share_ckpt")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Tuple

from .. import hub
from ..errors import ConfigError, ConflictError
from ..format.checkpoint import check_checkpoint_target, load_checkpoint, save_checkpoint
from ..format.lock import folder_lock
from ..format.schema import config_stamp
from ..hub.card import render_card
from .state import SHAREState, from_checkpoint, save_inputs, to_checkpoint
from .stats import config_of

logger = logging.getLogger(__name__)

__all__ = ["is_own_folder", "complete_view", "save_state", "push_state"]


def is_own_folder(state: SHAREState, folder: str) -> bool:
    """Whether ``folder`` is the local checkpoint ``state`` was loaded from."""
    o = state.origin
    if o is None or o.repo_id or not o.folder or not o.stamp:
        return False
    return os.path.realpath(o.folder) == os.path.realpath(folder)


def _bases_kept(state: SHAREState) -> bool:
    """Whether the bases are still the ones read (so the unseen adapters' loadings still fit them)."""
    read = state.origin.bases if state.origin else {}
    return set(read) == set(state.bases) and all(state.bases[k] is read[k] for k in read)


def complete_view(state: SHAREState, *, token: Optional[str] = None, timeout: Optional[float] = None) -> SHAREState:
    """The whole checkpoint a partial view came from, with the view's edits applied (itself if not partial).

    The unseen adapters are read again from the revision the view was loaded from: the same
    folder (refused if it changed since) or the same Hub commit.

    Example:
        >>> whole = complete_view(SHAREModel.from_pretrained("ckpt", adapters=["a"]).state)  # doctest: +SKIP
    """
    o = state.origin
    if o is None or not o.unseen:
        return state
    if not _bases_kept(state):
        raise ConfigError(
            f"cannot write this model back to {o.where}: it holds only {list(state.names)} of its adapters, and its "
            f"bases were refitted since it was loaded, so the other {len(o.unseen)} ({', '.join(o.unseen)}) no longer "
            "fit them; writing it there would drop them. Load the whole checkpoint (without adapters=) to make this "
            "edit, or save this view to another folder.")
    clash = [n for n in o.unseen if n in state.records]
    if clash:
        raise ConfigError(f"adapter {clash[0]!r} was added to a view of {o.where} that did not load the adapter of "
                          "that name; load it too to replace it.", adapter=clash[0])
    if o.repo_id:
        folder, jail = hub.fetch_checkpoint(o.repo_id, revision=o.commit, adapters=list(o.unseen), token=token,
                                            timeout=timeout)
    else:
        folder, jail = o.folder, None
    data = load_checkpoint(folder, adapters=list(o.unseen), jail=jail)
    if data.stamp != o.stamp:
        raise _changed(o.where)
    rest = from_checkpoint(data, folder).records
    order = [n for n in o.names if n in state.records or n in rest] + [n for n in state.records if n not in o.names]
    records = {n: state.records[n] if n in state.records else rest[n] for n in order}
    logger.info("writing back %d adapters of %s not loaded in this view (%s)", len(rest), o.where, ", ".join(rest))
    return dataclasses.replace(state, records=records, origin=dataclasses.replace(o, unseen=()))


def _changed(where: str) -> ConflictError:
    return ConflictError(
        f"the checkpoint at {where} changed since this model was loaded from it (another save, `lorashare add` or "
        "`remove` at the same time?). Nothing was written, so that change is kept: load the checkpoint again and "
        "redo the edit.", path=where)


def save_state(state: SHAREState, output_dir: str, *, card: bool = True, overwrite: bool = False) -> SHAREState:
    """Write ``state`` as ``save_pretrained`` does; return the state to publish next (its origin up to date).

    Over the folder it was loaded from: under that folder's edit lock, only if the folder is still
    as read, and with the adapters a partial load left out.
    """
    own = is_own_folder(state, output_dir)
    with folder_lock(output_dir):
        whole = state
        if own:
            now = config_stamp(output_dir)
            if now is None and not os.path.lexists(output_dir) and state.unseen:
                raise ConflictError(
                    f"the checkpoint at {output_dir} is gone (deleted since this model was loaded from it), and this "
                    f"view holds only {list(state.names)} of its adapters: {', '.join(state.unseen)} cannot be "
                    "written back. Save the view to another folder, or restore the checkpoint first.", path=output_dir)
            if now != state.origin.stamp and not (now is None and not os.path.lexists(output_dir)):
                raise _changed(output_dir)
            whole = complete_view(state)
        elif state.unseen:
            logger.info("saving %d of the %d adapters of %s (a partial view) to %s", len(state.names),
                        len(state.origin.names), state.origin.where, output_dir)
        inputs = save_inputs(whole, output_dir)
        check_checkpoint_target(output_dir, inputs=inputs, overwrite=overwrite)
        config = dataclasses.replace(config_of(whole))  # the save fills in files and format; the view stays
        text = render_card(config) if card else None
        stamp = save_checkpoint(output_dir, to_checkpoint(whole, config), card=text, inputs=inputs, overwrite=overwrite)
    if not own:
        return state
    origin = dataclasses.replace(state.origin, stamp=stamp, files=dict(config.files), names=whole.names,
                                 format_version=config.format_version, legacy=None, bases=dict(state.bases))
    return dataclasses.replace(state, origin=origin)


def push_state(state: SHAREState, repo_id: str, *, token: Optional[str] = None, revision: Optional[str] = None,
               create_pr: bool = False, parent_commit: Optional[str] = None, timeout: Optional[float] = None,
               commit_message: Optional[str] = None, **options: Any) -> Tuple[SHAREState, Any]:
    """Push ``state`` to ``repo_id`` in one commit; return the state to publish next and the ``CommitInfo``.

    Back to the repo it was loaded from, the adapters a partial load left out are pushed with it,
    and (loaded from the head of ``main``, pushed to ``main``) only if nobody pushed since.
    ``options`` are :func:`lorashare.hub.push_folder`'s.
    """
    o = state.origin
    own = bool(o and o.repo_id == repo_id)
    whole = complete_view(state, token=token, timeout=timeout) if own else state
    if own and parent_commit is None and o.head and o.commit and revision is None and not create_pr:
        parent_commit = o.commit  # a read-modify-write of the repo: a push made since is not undone
    stamps = []

    def save(folder: str) -> None:
        save_state(whole, folder)
        stamps.append(config_stamp(folder))

    info = hub.push_saved(save, repo_id, token=token, revision=revision, create_pr=create_pr,
                          parent_commit=parent_commit, timeout=timeout,
                          commit_message=commit_message or f"Upload SHARE checkpoint ({len(whole.records)} adapters)",
                          **options)
    oid = getattr(info, "oid", None)
    if own and oid and revision is None and not create_pr:  # the view now stands for the commit just pushed
        state = dataclasses.replace(state, origin=dataclasses.replace(o, commit=oid, names=whole.names, stamp=stamps[-1]))
    return state, info
