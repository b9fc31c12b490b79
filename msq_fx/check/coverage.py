"""The check's coverage rule: every conv / linear / attention weight of the float model is
either quantized or listed as float with a reason."""
from __future__ import annotations

from torch import nn

from ..report import Report, report
from .stages import Findings

__all__ = ["expected_weight_names", "check_coverage"]


def expected_weight_names(model: nn.Module) -> set[str]:
    """Every conv / linear / multi-head-attention weight FQN, from the module tree alone."""
    names = set()
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            names.add(prefix + "weight")
        if isinstance(module, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, attr, None) is not None:
                    names.add(prefix + attr)
    return {n for n in names if _is_parameter(model, n)}


def _is_parameter(model: nn.Module, qualname: str) -> bool:
    owner_name, _, attr = qualname.rpartition(".")
    return isinstance(model.get_submodule(owner_name)._parameters.get(attr), nn.Parameter)


def check_coverage(findings: Findings, expected: set[str], qmodel: nn.Module) -> None:
    """Every weight in ``expected`` (conv/linear/attention) must be quantized or listed as float
    with a reason."""
    rows: Report = report(qmodel)
    findings.fields["quantized_weights"] = len(rows.layers)
    findings.fields["float_weights"] = [{"name": f.name, "kind": f.kind, "reason": f.reason}
                                        for f in rows.float_weights]
    findings.fields["notes"] = list(rows.notes)
    covered = ({r.name for r in rows.layers} | {n for r in rows.layers for n in r.shared_with}
               | {f.name for f in rows.float_weights})
    missing = sorted(expected - covered)
    if missing:
        findings.problem("prepare", f"prepare: {len(missing)} weight(s) neither quantized nor "
                                    f"listed as float: {_first(missing)}")
    unexplained = [f.name for f in rows.float_weights if not f.reason.strip()]
    if unexplained:
        findings.problem("prepare", f"prepare: float weight(s) without a reason: "
                                    f"{_first(unexplained)}")


def _first(names: list[str], count: int = 5) -> str:
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more
