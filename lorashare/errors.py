"""One exception hierarchy for everything lorashare raises on purpose.

Every error is a :class:`LoraShareError`, so callers (the CLI, the Action, the
Space) can catch one type.  Each subclass also inherits the built-in it refines
(``ValueError``, ``FileNotFoundError``, ``KeyError``), so code written against
lorashare 0.1.x, which raised the built-ins, keeps working.

Messages follow one rule: the value, the rule it broke, and how to fix it.  A fix
names only what exists where the message is shown: messages are written for Python
callers (keywords such as ``overwrite=True``), and an error whose fix reads
differently elsewhere also carries ``problem``, the message without its fix, so that
a front (the CLI's table of messages) can give its own fix (``--overwrite``).
"""

from __future__ import annotations

from typing import Optional


class LoraShareError(Exception):
    """Base class of every error raised by lorashare.

    Attributes:
        adapter: the adapter (name or source) at fault, if any.
        path: the file or folder at fault, if any.
        layer: the module path (``encoder.layer.0.attention.self.query``) at fault, if any.
        problem: the message without its fix (the value and the rule), where a front may give its own fix.
    """

    def __init__(
        self,
        message: str,
        *,
        adapter: Optional[str] = None,
        path: Optional[str] = None,
        layer: Optional[str] = None,
        problem: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.adapter = adapter
        self.path = path
        self.layer = layer
        self.problem = problem

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


class AdapterError(LoraShareError, ValueError):
    """An adapter is unreadable, malformed or not a LoRA adapter."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """An adapter folder or one of its files does not exist."""


class IncompatibleAdaptersError(AdapterError):
    """Adapters cannot share a basis (different base models, shapes...)."""


class StorageRangeError(AdapterError):
    """Loadings do not fit the storage dtype (float16 overflows); another dtype holds them.

    Its own class so that each front names its own way to pick the dtype.

    Attributes:
        dtype: the storage dtype that cannot hold them.
    """

    def __init__(self, message: str, *, dtype: str, adapter: Optional[str] = None, layer: Optional[str] = None,
                 problem: Optional[str] = None) -> None:
        super().__init__(message, adapter=adapter, layer=layer, problem=problem)
        self.dtype = dtype


class DuplicateAdapterError(AdapterError):
    """An adapter of that name is already in the SHARE model.

    A subclass of its own so that each front can give its own fix (the CLI
    suggests ``--name`` and ``lorashare remove``, the API ``name=...``).
    """


class CheckpointError(LoraShareError, ValueError):
    """A SHARE checkpoint is missing, malformed, or fails verification."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No SHARE checkpoint at the given path."""


class IntegrityError(CheckpointError):
    """A file's bytes do not match the fingerprint recorded for it."""


class UnknownAdapterError(LoraShareError, KeyError):
    """An adapter name is not in this SHARE model."""


class InvalidNameError(LoraShareError, ValueError):
    """An adapter name is not a single safe path component."""


class ConfigError(LoraShareError, ValueError):
    """A parameter or manifest value is out of range or of the wrong type."""


class WorsenedError(LoraShareError, ValueError):
    """An edit would make adapters already in the model worse (a higher ΔW error, or recompressed
    from their reconstructions), and the caller asked to refuse that (``strict=True``,
    ``require_originals=True``).  Nothing was changed.

    Attributes:
        worsened: ``{adapter: {"before": …, "after": …}}``: the ΔW errors (max over modules) the edit
            would have recorded; empty when the refusal is about missing originals.
        missing: the adapters whose originals were not available.
        lossless_k: the number of components (the sum of the adapters' ranks) that keeps every adapter exact.
    """

    def __init__(self, message: str, *, worsened: Optional[dict] = None, missing: Optional[list] = None,
                 lossless_k: Optional[int] = None, adapter: Optional[str] = None, problem: Optional[str] = None) -> None:
        super().__init__(message, adapter=adapter, problem=problem)
        self.worsened = dict(worsened or {})
        self.missing = list(missing or [])
        self.lossless_k = lossless_k


class TrainingError(LoraShareError, ValueError):
    """A model given to learning in the subspace is not the one it needs (not built by
    ``subspace_model``, trained on other bases, or without the original adapter to match)."""


class HubError(LoraShareError):
    """A Hugging Face Hub request failed (not found, unauthorised, offline...)."""


class LocalBaseModelError(ConfigError):
    """The base model is a local folder, which a model card on the Hub must not publish.

    Attributes:
        base_model: the local path.
    """

    def __init__(self, message: str, *, base_model: str, problem: Optional[str] = None) -> None:
        super().__init__(message, problem=problem)
        self.base_model = base_model


class HubAuthError(HubError, PermissionError):
    """A Hub request needs a token (or one with more access); ``problem`` says which repo, each front its fix."""


class HubTimeoutError(HubError, TimeoutError):
    """A Hub operation passed its deadline (``LORASHARE_HUB_TIMEOUT``, 60 s by default)."""


class HubNotFoundError(HubError, FileNotFoundError):
    """A repo, revision or file does not exist on the Hub."""


class OutputPathError(LoraShareError, FileExistsError):
    """An output path is one lorashare will not replace (a file, a foreign folder, ``.``, an input's ancestor)."""


class ForeignFolderError(OutputPathError):
    """The output is a non-empty folder that lorashare did not write; ``overwrite=True`` would replace it.

    Its own class so that each front gives the fix it has: the CLI ``--overwrite`` where the
    subcommand has it, and for an edit in place (``add``, ``remove``) moving the stray entry out.

    Attributes:
        found: what in the folder is not lorashare's (``"it holds 'notes.txt'"``).
    """

    def __init__(self, message: str, *, found: str, path: Optional[str] = None, problem: Optional[str] = None) -> None:
        super().__init__(message, path=path, problem=problem)
        self.found = found


class ConflictError(LoraShareError):
    """A read-modify-write lost the race: what was read changed before the write (another save, ``add`` or push).

    Nothing was written.  Load again and redo the edit; the CLI's edits wait for each other instead.
    """


class HubConflictError(HubError, ConflictError):
    """A push with ``parent_commit`` found the branch moved on: someone pushed since it was read; nothing pushed."""


class SaveError(LoraShareError, OSError):
    """The OS refused a write while saving (disk full, permissions...); the previous content is intact."""
