"""Read safetensors files lazily, strictly and without mmap.

Why not ``safetensors.safe_open``?  Two reasons.  It maps the whole file, and
every page touched stays in the process's resident set, so streaming 6 GB of
adapters would show 6 GB of RSS.  Here each tensor is read with one
``readinto`` into its own buffer, so memory is what the caller keeps.  And the
header is validated before any byte of data is trusted: offsets inside the
file, sizes that match the shape, and a cap on what one tensor may allocate,
so a hostile or truncated file gives a clear :class:`CheckpointError` /
:class:`AdapterError` instead of a crash deep inside torch.  A path that is not a regular
file (a FIFO, a device) is refused before anything waits on it
(:func:`lorashare.format.jsonfile.open_regular`).

Writing is our own :func:`save_bytes`: deterministic (sorted names, fixed metadata order) and fast; the
tests read its output back with the ``safetensors`` library itself.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, Iterable, Mapping, Optional, Type

import torch

from ..errors import LoraShareError
from .jsonfile import loads as json_loads
from .jsonfile import open_regular

__all__ = ["TensorInfo", "TensorFile", "read_header", "save_bytes", "write_tensors", "header_bytes", "MAX_TENSOR_BYTES"]

_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in _DTYPES.items()}

#: One tensor may not declare more bytes than this (env ``LORASHARE_MAX_TENSOR_BYTES``).
MAX_TENSOR_BYTES = int(os.environ.get("LORASHARE_MAX_TENSOR_BYTES", str(8 * 1024**3)))
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(
    path: str, *, error: Type[LoraShareError] = LoraShareError, who: Optional[str] = None
) -> tuple:
    """Parse and validate the header of a safetensors file.

    Returns ``(infos, metadata)``: ``{name: TensorInfo}`` and the ``__metadata__`` dict.
    Raises ``error`` (naming ``who`` and the file) on anything malformed, or on a path that is
    not a regular file (a FIFO is refused at once, never waited on).

    Example:
        >>> infos, meta = read_header("adapter_model.safetensors")  # doctest: +SKIP
    """
    with _open(path, error, who) as f:
        return _parse_header(f, path, error, who)


def _open(path: str, error: Type[LoraShareError], who: Optional[str]) -> BinaryIO:
    label = f"{who}: " if who else ""
    return open_regular(path, error=error, who=who, label=label,
                        hint="Replace it with the real safetensors file (re-download or re-save it).")


def _parse_header(f: BinaryIO, path: str, error: Type[LoraShareError], who: Optional[str]) -> tuple:
    """The header of the open file ``f`` (see :func:`read_header`); its size is the descriptor's own."""
    label = f"{who}: " if who else ""

    def fail(why: str) -> LoraShareError:
        return error(
            f"{label}{path} is not a valid safetensors file: {why}. "
            "Re-save it with safetensors.torch.save_file, or re-download it.",
            adapter=who,
            path=path,
        )

    try:
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise fail(f"{size} bytes, too short for the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES:
            raise fail(
                f"its header length is {n} bytes, over the safetensors limit of {_MAX_HEADER_BYTES} bytes "
                "(100 MB); the file is corrupt or not safetensors"
            )
        if 8 + n > size:
            raise fail(f"header length {n} does not fit in a file of {size} bytes")
        raw = f.read(n)
    except OSError as exc:
        raise error(f"{label}cannot read {path}: {exc.strerror or exc}", adapter=who, path=path) from exc
    if len(raw) != n:
        raise fail(f"it ended after {8 + len(raw)} bytes, inside its {n}-byte header (truncated while read?)")
    header = json_loads(
        raw, path=path, what="safetensors file", error=error, who=who, label=label, subject="its header is",
        hint="Re-save it with safetensors.torch.save_file, or re-download it.",
    )
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise fail("__metadata__ is not an object")
    base = 8 + n
    infos: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise fail(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPES:
            raise fail(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise fail(f"tensor {name!r} has a bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise fail(f"tensor {name!r} has bad data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if nbytes > MAX_TENSOR_BYTES:
            raise fail(
                f"tensor {name!r} declares shape {shape} = {nbytes} bytes, over the "
                f"{MAX_TENSOR_BYTES}-byte limit (set LORASHARE_MAX_TENSOR_BYTES to raise it)"
            )
        if not (0 <= begin <= end) or end - begin != nbytes or base + end > size:
            raise fail(
                f"tensor {name!r}: data_offsets {offsets} do not match shape {shape} "
                f"({nbytes} bytes) inside a file of {size} bytes (truncated?)"
            )
        infos[name] = TensorInfo(name, _DTYPES[dtype], tuple(shape), base + begin, nbytes)
    _check_tiling(infos, base, size, fail)
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _check_tiling(
    infos: Mapping[str, TensorInfo], base: int, size: int, fail: Callable[[str], LoraShareError]
) -> None:
    """The tensors, sorted by offset, must cover the data section exactly: no overlap, no hole, no tail.

    This is the safetensors library's own rule (``Metadata::validate``), so offsets that
    ``safetensors.safe_open`` refuses are refused here too; two tensors sharing bytes would
    otherwise alias each other's data.
    """
    at = base
    for info in sorted(infos.values(), key=lambda i: (i.start, i.start + i.nbytes)):
        if info.start != at:
            how = "overlaps the previous tensor" if info.start < at else f"leaves {info.start - at} unused bytes before it"
            raise fail(
                f"tensor {info.name!r} starts at data offset {info.start - base}, but the tensors before it end "
                f"at {at - base}: it {how}. The safetensors library refuses such a header"
            )
        at += info.nbytes
    if at != size:
        raise fail(
            f"the tensors cover {at - base} bytes of data but the file holds {size - base} after its header "
            f"({size - at} bytes unaccounted for). The safetensors library refuses such a file"
        )


class TensorFile:
    """A safetensors file opened for lazy, validated reads (a regular file only; see :func:`read_header`).

    It holds one descriptor from the header to the last read (close it, or use ``with``).

    Example:
        >>> with TensorFile("adapter_model.safetensors") as tf:  # doctest: +SKIP
        ...     a = tf.get("base_model.model.q.lora_A.weight")
    """

    def __init__(
        self, path: str, *, error: Type[LoraShareError] = LoraShareError, who: Optional[str] = None
    ) -> None:
        self.path = path
        self._error = error
        self._who = who
        # One descriptor for the header and the data: the bytes read are those the header described.
        self._fh: Optional[BinaryIO] = _open(path, error, who)
        try:
            self.infos, self.metadata = _parse_header(self._fh, path, error, who)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def keys(self) -> Iterable[str]:
        return self.infos.keys()

    def get(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Read one tensor; with ``out`` (right dtype, contiguous), read into it."""
        info = self.infos[name]
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        elif out.dtype != info.dtype or tuple(out.shape) != info.shape:
            # Caller wants another dtype or layout: read natively, then copy.
            out.copy_(self.get(name))
            return out
        if info.nbytes == 0:
            return out
        self._read_into(out.reshape(-1).view(torch.uint8), info.start, name)
        return out

    def get_many(self, names: Iterable[str], *, max_gap: int = 1 << 20) -> Dict[str, torch.Tensor]:
        """Read several tensors with few syscalls: nearby tensors are read as one span.

        Tensors whose bytes lie within ``max_gap`` of each other are coalesced, so
        an adapter's factors for a chunk of modules usually take one ``readinto``.
        """
        infos = sorted((self.infos[n] for n in names), key=lambda i: i.start)
        out: Dict[str, torch.Tensor] = {}
        at = 0
        while at < len(infos):
            end = at + 1
            while end < len(infos) and infos[end].start - (infos[end - 1].start + infos[end - 1].nbytes) <= max_gap:
                end += 1
            group = infos[at:end]
            lo, hi = group[0].start, max(i.start + i.nbytes for i in group)
            buf = torch.empty(hi - lo, dtype=torch.uint8)
            self._read_into(buf, lo, group[0].name)
            for i in group:
                raw = buf[i.start - lo : i.start - lo + i.nbytes]
                out[i.name] = raw.view(i.dtype).reshape(i.shape) if i.nbytes else torch.empty(i.shape, dtype=i.dtype)
            at = end
        return out

    def _read_into(self, buf: torch.Tensor, offset: int, name: str) -> None:
        if self._fh is None:  # reopened after close()
            self._fh = _open(self.path, self._error, self._who)
        self._fh.seek(offset)
        view = memoryview(buf.numpy())
        got = 0
        while got < len(view):
            n = self._fh.readinto(view[got:])
            if not n:
                break
            got += n
        if got != len(view):
            raise self._error(
                f"{self._who + ': ' if self._who else ''}{self.path} ended after {got} of {len(view)} bytes "
                f"while reading tensor {name!r} (truncated file?). Re-download or re-save it.",
                adapter=self._who,
                path=self.path,
            )

    def load_all(self) -> Dict[str, torch.Tensor]:
        """Read every tensor (small files only: loadings, heads)."""
        return {name: self.get(name) for name in self.infos}


_NAMES = {dt: name for name, dt in _DTYPES.items()}


def header_bytes(entries: Iterable[tuple], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The header (length prefix, JSON, padding) of a file holding ``entries`` ``(name, dtype, shape)``
    (dtype as safetensors names it, ``"F32"``), sorted by name: what :func:`save_bytes` writes."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    at = 0
    for name, dtype, shape in sorted(entries, key=lambda e: e[0]):
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + nbytes]}
        at += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the spec aligns the data start to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _layout(tensors: Mapping[str, torch.Tensor]) -> tuple:
    """``(entries, arrays)``: each tensor's header entry and its bytes as a numpy array, sorted by name."""
    entries, arrays = [], []
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _NAMES:
            raise ValueError(f"cannot store tensor {name!r} of dtype {t.dtype} in safetensors")
        entries.append((name, _NAMES[t.dtype], list(t.shape)))
        if t.numel():
            # numpy has no bfloat16: its bytes go through an int16 view
            arrays.append((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy())
    return entries, arrays


def save_bytes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """Serialise tensors to safetensors bytes, deterministically (sorted names).

    A direct writer of the format: ``safetensors.torch.save`` spends ~0.1 ms of
    Python per tensor, which dominated saving a checkpoint of a thousand small
    loadings.  The output is read back by ``safetensors`` itself in the tests.
    """
    entries, arrays = _layout(tensors)
    return header_bytes(entries, metadata) + b"".join(a.tobytes() for a in arrays)


def write_tensors(f: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write what :func:`save_bytes` returns to the open file ``f``, one tensor at a time.

    The bytes are the same; no copy of the whole file is made in memory first (a rebuilt 7B
    adapter is tens of MB).
    """
    entries, arrays = _layout(tensors)
    f.write(header_bytes(entries, metadata))
    for a in arrays:
        f.write(memoryview(a).cast("B"))

