"""torch.fx passes of msq_fx: trace, probe, discover, rewrite, group, lower (one pass per module).

``weight_uses`` is not a pass: it holds the rule, shared by discover and probe, for which operand
of a torch op is a weight.
"""

__all__ = ["trace", "probe", "discover", "weight_uses", "group", "rewrite", "lower"]
