"""What the benchmarks measure against, in one place: the reference install and the ΔW oracle.

Deliberately independent of the lorashare under test (it imports neither ours nor 0.1.3, so the
workers can load either): ΔW = s·B·A per module, with PEFT's scale rules (``lora_alpha / r``,
``/ √r`` with rsLoRA, ``rank_pattern`` / ``alpha_pattern`` keys matched as PEFT matches them), and
the relative error computed from (r + r̂)² Gram matrices in float64, never forming d_out × d_in.
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

logger = logging.getLogger("benchmarks.oracle")

REFERENCE_VERSION = "0.1.3"

# PEFT key -> (module path, side); tolerates a missing prefix and an adapter-name infix.
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+?)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def ensure_reference(ref_dir: Path) -> None:
    """pip-install lorashare==0.1.3 into ``ref_dir`` (``--no-deps --target``) unless it is already there."""
    dist = ref_dir / f"lorashare-{REFERENCE_VERSION}.dist-info"
    if (ref_dir / "lorashare" / "__init__.py").exists() and dist.exists():
        return
    logger.info("installing reference lorashare==%s into %s (measurement only)", REFERENCE_VERSION, ref_dir)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(ref_dir),
                    f"lorashare=={REFERENCE_VERSION}"], check=True)


def split_lora(state: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{module: {"A": tensor, "B": tensor}}`` from a PEFT state dict; other tensors dropped."""
    out: Dict[str, Dict[str, Any]] = {}
    for key, tensor in state.items():
        m = _LORA_KEY.match(key)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = tensor
    return out


def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():  # PEFT: the key matches a suffix of the module path
        if module == key or re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def module_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scale of one module: alpha / r, or alpha / √r with rsLoRA, patterns applied."""
    alpha = _pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    alpha = float(rank if alpha is None else alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def delta_w_rel_err(a, b, a_hat, b_hat, scale: float, scale_hat: float) -> Tuple[float, float]:
    """``(‖ΔW − ΔŴ‖_F / ‖ΔW‖_F, ‖ΔW‖_F)`` without forming d_out × d_in matrices.

    With ΔW − ΔŴ = [sB, −ŝB̂]·[A; Â], ‖XY‖²_F = Σ (XᵀX) ⊙ (YYᵀ): only (r + r̂)² Gram matrices,
    in float64, so that nearly equal ΔW's keep ~1e-7 relative resolution, whatever the gauge or rank.
    """
    import torch

    x = torch.cat([b.double() * scale, b_hat.double() * -scale_hat], dim=1)
    y = torch.cat([a.double(), a_hat.double()], dim=0)
    gx, gy = x.T @ x, y @ y.T
    r = b.shape[1]
    ref = math.sqrt(max(float((gx[:r, :r] * gy[:r, :r]).sum()), 0.0))
    err_sq = max(float((gx * gy).sum()), 0.0)
    if ref < 1e-30:
        return (0.0 if err_sq < 1e-60 else math.inf), ref
    return math.sqrt(err_sq) / ref, ref


def adapter_errors(original: Mapping[str, Any], original_config: Mapping[str, Any],
                   rebuilt: Mapping[str, Any], rebuilt_config: Mapping[str, Any]) -> Dict[str, Any]:
    """Per-module ΔW relative error of a rebuilt adapter against the original (both PEFT state dicts).

    Returns ``{"errors": {module: err}, "missing": [...], "rank_changed": n}``.
    """
    orig, rec = split_lora(original), split_lora(rebuilt)
    errors: Dict[str, float] = {}
    missing, rank_changed = [], 0
    for module, ab in orig.items():
        got = rec.get(module)
        if got is None or "A" not in got or "B" not in got:
            missing.append(module)
            continue
        rank_changed += int(got["A"].shape[0] != ab["A"].shape[0])
        s = module_scale(original_config, module, ab["A"].shape[0])
        s_hat = module_scale(rebuilt_config, module, got["A"].shape[0])
        errors[module] = delta_w_rel_err(ab["A"], ab["B"], got["A"], got["B"], s, s_hat)[0]
    return {"errors": errors, "missing": sorted(missing), "rank_changed": rank_changed}
