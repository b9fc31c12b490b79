"""torch.fx passes of msq_fx: trace, discover, rewrite, group, lower (one pass per module)."""
