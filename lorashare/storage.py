"""Storage dtypes of a checkpoint's bases and loadings: their names and what they cost."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "bytes_per_value"]

#: ``share_config.json``'s ``dtype`` → the torch dtype the tensors are stored in.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bytes_per_value(dtype: str) -> int:
    """Bytes one stored value takes (float32 for an unknown name).

    Example:
        >>> bytes_per_value("float16")
        2
    """
    return torch.empty(0, dtype=DTYPES.get(dtype, torch.float32)).element_size()
