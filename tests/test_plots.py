"""Specification of msq_fx.plot_history: the pruning history as a figure (matplotlib)."""
from __future__ import annotations

import sys

import pytest

import msq_fx
from msq_fx.precision_groups import PruneRecord
from msq_fx.plots import P_COLOURS, bits_by_step


def record(epoch: int, group: str, before: int, after: int, omega: float | None = 1.0,
           next_p: int = 1, compression: float = 4.0) -> PruneRecord:
    return PruneRecord(epoch=epoch, group=group, kind="conv", params=10, beta=0.2,
                       hessian_trace=None if omega is None else 1.0, omega=omega,
                       lsbs_dropped=before - after, bits_before=before, bits_after=after,
                       next_prune_step=next_p, compression=compression)


HISTORY = [
    record(2, "a", 8, 7, omega=0.5, next_p=2, compression=4.3),
    record(2, "b", 8, 7, omega=3.0, next_p=1, compression=4.3),
    # The round that reaches the target stops early: "b" is not recorded at epoch 4.
    record(4, "a", 7, 5, omega=0.1, next_p=2, compression=5.5),
    record(6, "c", 8, 6, omega=2.0, next_p=1, compression=6.0),
]


def test_bits_by_step_carries_a_width_through_steps_that_did_not_record_the_group():
    groups, epochs, bits = bits_by_step(HISTORY)
    assert groups == ["a", "b", "c"] and epochs == [2, 4, 6]
    assert bits == [[7, 5, 5], [7, 7, 7], [8, 8, 6]]


def test_the_heatmap_shows_each_groups_bits_after_each_step():
    figure = msq_fx.plot_history(HISTORY)
    heat = figure.axes[0]
    assert heat.images[0].get_array().tolist() == bits_by_step(HISTORY)[2]
    assert [label.get_text() for label in heat.get_yticklabels()] == ["a", "b", "c"]


def panel(history, title_start: str):
    return next(ax for ax in msq_fx.plot_history(history).axes
                if ax.get_title().startswith(title_start))


def test_the_omega_bars_are_those_of_the_step_that_recorded_most_groups_coloured_by_next_p():
    from matplotlib.colors import to_hex

    omega_axes = panel(HISTORY, "Omega at epoch 2")
    bars = omega_axes.patches
    assert [bar.get_width() for bar in bars] == [0.5, 3.0]
    assert [to_hex(bar.get_facecolor()) for bar in bars] == [P_COLOURS[2], P_COLOURS[1]]


def test_of_steps_recording_as_many_groups_the_omega_panel_takes_the_latest():
    history = HISTORY + [record(8, "a", 5, 4, omega=0.2), record(8, "c", 6, 5, omega=0.4)]
    assert [bar.get_width() for bar in panel(history, "Omega at epoch 8").patches] == [0.2, 0.4]


def test_the_compression_curve_has_one_point_per_step():
    compression = panel(HISTORY, "compression")
    x, y = compression.lines[0].get_data()
    assert list(x) == [2, 4, 6] and list(y) == [4.3, 5.5, 6.0]


def test_a_controller_is_plotted_from_its_history_and_saved_as_png(tmp_path):
    controller = msq_fx.MSQController(msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=4)))
    controller.history = list(HISTORY)
    msq_fx.plot_history(controller, tmp_path / "history.png", title="run")
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_history_without_omega_says_so_instead_of_plotting_bars():
    fixed = [record(1, "a", 8, 7, omega=None)]
    assert not panel(fixed, "no Omega recorded").patches


def test_an_empty_history_is_refused():
    with pytest.raises(ValueError, match="no pruning step has run yet"):
        msq_fx.plot_history([])


def test_without_matplotlib_the_error_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"msq_fx\[plot\]"):
        msq_fx.plot_history(HISTORY)
