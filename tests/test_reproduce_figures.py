"""The table figures drawn from the runs' per-epoch logs: what each panel plots is the mean over seeds."""

import numpy as np
import pytest

from balance.reproduce_figures import contributions_figure, convergence_figure, mean_curve


def _run(val, train):
    return {"val/acc": dict(enumerate(val)), "train/acc": dict(enumerate(train))}


def test_mean_curve_keeps_the_epochs_every_seed_logged():
    epochs, mean, std = mean_curve([{0: 0.2, 1: 0.4, 2: 0.9}, {0: 0.4, 1: 0.6}])
    assert epochs.tolist() == [0, 1]
    assert mean == pytest.approx([0.3, 0.5]) and std == pytest.approx([np.sqrt(0.02)] * 2)


def test_convergence_draws_one_panel_per_trained_row_with_the_seed_mean():
    curves = {
        "joint": [_run([0.5, 0.7, 0.8], [0.4, 0.8, 0.9]), _run([0.3, 0.5, 0.6], [0.4, 0.6, 0.7])],
        "method": [_run([0.1, 0.2, 0.3], [0.2, 0.3, 0.4])],
        "retested": [{"val/acc": {}}],  # tests another row's checkpoints: no epochs of its own
    }
    figure = convergence_figure(curves)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["joint (2 seeds)", "method (1 seeds)"]
    lines = {line.get_label(): line.get_ydata() for line in panels[0].get_lines()}
    assert lines["val"] == pytest.approx([40.0, 60.0, 70.0]) and lines["train"] == pytest.approx([40.0, 70.0, 80.0])
    assert panels[1].get_lines()[1].get_ydata() == pytest.approx([10.0, 20.0, 30.0])


def test_no_convergence_figure_without_validation_epochs():
    assert convergence_figure({"retested": [{"val/acc": {}}]}) is None and convergence_figure({}) is None


def test_contributions_plot_the_seed_mean_and_leave_out_rows_without_epochs():
    curves = {
        "joint": [{"val/phi_audio": {0: 0.2, 1: 0.4}, "val/acc_audio": {0: 0.5, 1: 0.7}},
                  {"val/phi_audio": {0: 0.4, 1: 0.6}, "val/acc_audio": {0: 0.3, 1: 0.5}}],
        "retested": [{"val/phi_audio": {}, "val/acc_audio": {}}],
    }
    phi, acc = contributions_figure(curves).axes
    assert [line.get_label() for line in phi.get_lines()] == ["joint"]
    assert phi.get_lines()[0].get_ydata() == pytest.approx([0.3, 0.5])
    assert acc.get_lines()[0].get_ydata() == pytest.approx([0.4, 0.6])
    assert [text.get_text() for text in phi.get_legend().get_texts()] == ["joint"]
