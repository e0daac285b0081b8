"""Plot functions: ax=None -> (fig, ax), drawing into a given axis, and a clear error without loss."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from noisescale import plot
from noisescale.runlog import RunLog


def _log(with_loss=True):
    recs = []
    for i in range(1, 21):
        r = {
            "type": "step",
            "step": i,
            "examples": 64.0 * i,
            "status": "measured",
            "b_simple": 10.0 + i,
            "b_simple_low": 5.0 + i,
            "b_simple_high": None if i < 4 else 20.0 + i,
            "g2": 1.0 / i,
            "trace_sigma": 10.0,
        }
        if with_loss:
            r["loss"] = 2.0 / i
        recs.append(r)
    return RunLog(header={"type": "header", "unit": "tokens"}, records=recs)


@pytest.mark.parametrize("fn", [plot.plot_b_simple, plot.plot_components, plot.plot_loss])
def test_returns_fig_and_ax_and_uses_given_axis(fn):
    fig, ax = fn(_log())
    assert ax.get_lines() and fig is ax.figure
    fig2, ax2 = plt.subplots()
    f, a = fn(_log(), ax2, x="examples")
    assert a is ax2 and f is fig2
    plt.close("all")


def test_units_in_labels_and_unbounded_band():
    _fig, ax = plot.plot_b_simple(_log(), x="examples")
    assert "tokens" in ax.get_ylabel() and "tokens" in ax.get_xlabel()
    assert ax.get_yscale() == "log"
    plt.close("all")


def test_plot_run_panels_and_errors(tmp_path):
    fig = plot.plot_run(_log(), tmp_path / "f.png")
    assert len(fig.axes) == 3 and (tmp_path / "f.png").exists()
    assert len(plot.plot_run(_log(with_loss=False)).axes) == 2
    with pytest.raises(ValueError, match="no loss values"):
        plot.plot_loss(_log(with_loss=False))
    with pytest.raises(ValueError, match="x must be"):
        plot.plot_b_simple(_log(), x="time")
    plt.close("all")


def test_b_noise_drawn_when_the_log_has_it():
    log = _log()
    assert "B_{noise}" not in " ".join(line.get_label() for line in plot.plot_b_simple(log)[1].get_lines())
    for i, r in enumerate(log.records):
        r.update(b_noise=None if i < 2 else 30.0 + i, b_noise_low=None if i < 4 else 20.0, b_noise_high=None)
    _fig, ax = plot.plot_b_simple(log)
    lines = {line.get_label(): line for line in ax.get_lines()}
    drawn = lines["$B_{noise}$ (Hessian)"].get_ydata()
    assert list(drawn[2:]) == [30.0 + i for i in range(2, 20)]
    plt.close("all")
