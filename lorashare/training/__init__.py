"""Learning in the shared subspace: new adapters trained as loadings over frozen bases
(:mod:`.subspace`), and compressed adapters distilled from their originals (:mod:`.refit`).

Example:
    >>> from lorashare.training import subspace_model, add_trained  # doctest: +SKIP
"""

from .refit import refit
from .subspace import (
           SubspaceFactor,
           SubspaceRun,
           add_trained,
           lora_init,
           stored_as,
           subspace_model,
           trainable_parameters,
           trained_factors,
)

__all__ = ["SubspaceFactor", "SubspaceRun", "subspace_model", "add_trained", "refit", "trainable_parameters",
           "stored_as", "lora_init", "trained_factors"]
