"""lorashare: many LoRA adapters, one shared low-rank basis per layer (SHARE)."""

__version__ = "0.2.0"

from .errors import LoraShareError  # noqa: E402
from .format.checkpoint import SHAREConfig  # noqa: E402
from .format.spec import CompressionSpec  # noqa: E402
from .model import SHAREModel  # noqa: E402

__all__ = ["SHAREModel", "SHAREConfig", "CompressionSpec", "LoraShareError", "__version__"]
