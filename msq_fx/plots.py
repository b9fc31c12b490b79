"""Figures of an MSQ run's pruning history (needs the ``plot`` extra: matplotlib).

``plot_history`` draws what the paper shows for ResNet-20 (its Fig. 1 and Fig. 5): each
group's bit width after every pruning step, Omega per group against their mean at the latest
step that recorded the most groups (groups under the mean lose 2 bits next, the others 1), and
the compression step by step.
It builds a ``matplotlib.figure.Figure`` directly, not through pyplot, so it keeps no global
figure state and needs no display.
"""
from __future__ import annotations

import os
from typing import Iterable

from .controller import MSQController
from .precision_groups import PruneRecord

__all__ = ["plot_history", "bits_by_step", "P_COLOURS"]

#: Bar colours by the next prune step p, as in the paper's Fig. 5 (1 bit: red, 2 bits: blue).
P_COLOURS = {1: "#d62728", 2: "#1f77b4"}


def bits_by_step(history: list[PruneRecord]) -> tuple[list[str], list[int], list[list[int]]]:
    """Groups (in first-seen order), the epochs of the pruning steps, and each group's bit
    width after each step (a group a step did not record keeps its previous width)."""
    groups = list(dict.fromkeys(record.group for record in history))
    epochs = sorted({record.epoch for record in history})
    bits: dict[str, int] = {}
    for record in history:  # until its first record, a group has its starting width
        bits.setdefault(record.group, record.bits_before)
    matrix = []
    for epoch in epochs:
        for record in history:
            if record.epoch == epoch:
                bits[record.group] = record.bits_after
        matrix.append([bits[group] for group in groups])
    return groups, epochs, [list(row) for row in zip(*matrix)]


def plot_history(history: Iterable[PruneRecord] | MSQController,
                 path: str | os.PathLike | None = None, title: str | None = None):
    """A figure of a run's pruning history; saved to ``path`` (PNG, SVG, PDF by its suffix)
    when given. ``history`` is a controller or its ``history`` records."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("msq_fx.plot_history needs matplotlib: pip install 'msq_fx[plot]'"
                          ) from error
    records = list(history.history if isinstance(history, MSQController) else history)
    if not records:
        raise ValueError("plot_history: the history is empty; no pruning step has run yet")
    groups, epochs, bits = bits_by_step(records)
    # Groups that reached min_bits drop out of later steps, so the Omega panel shows the latest
    # step that still recorded the most groups.
    counts = {epoch: sum(r.epoch == epoch and r.omega is not None for r in records)
              for epoch in epochs}
    omega_epoch = max(epochs, key=lambda epoch: (counts[epoch], epoch))
    last = [r for r in records if r.epoch == omega_epoch and r.omega is not None]

    height = max(4.0, 0.28 * len(groups) + 1.5)
    figure = Figure(figsize=(15, height), layout="constrained")
    heat, omega, compression = figure.subplots(1, 3, width_ratios=[3, 2, 2])
    top = max(max(row) for row in bits)
    image = heat.imshow(bits, aspect="auto", cmap="viridis", vmin=0, vmax=top)
    heat.set(xticks=range(len(epochs)), xticklabels=epochs, yticks=range(len(groups)),
             yticklabels=groups, xlabel="epoch of the pruning step", title="bits after each step")
    heat.tick_params(axis="y", labelsize=7)
    if len(groups) * len(epochs) <= 600:
        for row, widths in enumerate(bits):
            for column, width in enumerate(widths):
                heat.text(column, row, width, ha="center", va="center", fontsize=7,
                          color="white" if width < 0.6 * top else "black")
    figure.colorbar(image, ax=heat, label="bits")

    if last:
        names = [r.group for r in last]
        values = [r.omega for r in last]
        omega.barh(range(len(last)), values,
                   color=[P_COLOURS.get(r.next_prune_step, "grey") for r in last])
        omega.axvline(sum(values) / len(values), color="black", linestyle=":", label="mean")
        omega.set_xscale("symlog", linthresh=max(min(abs(v) for v in values if v) or 1e-6, 1e-12))
        omega.set(yticks=range(len(last)), yticklabels=names, title=f"Omega at epoch {omega_epoch}"
                  " (red: next p = 1, blue: 2)")
        omega.tick_params(axis="y", labelsize=7)
        omega.invert_yaxis()
        omega.legend(loc="lower right")
    else:
        omega.set_title("no Omega recorded (prune_step_policy='fixed')")
        omega.set_axis_off()

    steps = [max(r.compression for r in records if r.epoch == epoch) for epoch in epochs]
    compression.plot(epochs, steps, marker="o")
    compression.set(xlabel="epoch", ylabel="compression (x)", title="compression after each step")
    compression.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
