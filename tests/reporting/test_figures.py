"""Run and sweep figures: what they draw, and labels that say only what a setting sets."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np

from fedmoe.reporting.figures import plot_rounds, write_run_plots
from fedmoe.reporting.sweep import Setting

ROUNDS = [{"round": r, "train_loss": 4.0 - r, "eval_ppl_mean": 30.0 - r, "eval_ppl_worst": 40.0,
           "eval_ppl_by_client": {"0": 20.0 - r, "1": 40.0}, "bytes_down": 10, "bytes_up": 5}
          for r in (1, 2, 3)]


def test_run_plots_include_loss_and_perplexity_per_round(tmp_path):
    results = {"strategy": {"name": "fedmoe"}, "rounds": ROUNDS,
               "clients": {"0": {"base_ppl": 30.0, "final_ppl": 17.0}}}
    plots = write_run_plots(results, tmp_path)
    assert set(plots) == {"rounds", "client_perplexity", "communication"}
    assert plots["rounds"] == tmp_path / "plots" / "rounds.png"


def test_rounds_plot_draws_every_series(tmp_path):
    import matplotlib.pyplot as plt

    drawn = {}
    real_save = plt.Figure.savefig

    def capture(fig, *args, **kwargs):  # the figure's data as drawn, before it is closed
        for ax in fig.axes:
            drawn[ax.get_title()] = [(line.get_label(), list(line.get_ydata()))
                                     for line in ax.get_lines()]
        return real_save(fig, *args, **kwargs)

    plt.Figure.savefig = capture
    try:
        path = plot_rounds(ROUNDS, tmp_path / "rounds.png", title="fedmoe")
    finally:
        plt.Figure.savefig = real_save
    assert drawn["training loss"] == [("_child0", [3.0, 2.0, 1.0])]
    series = dict(drawn["held-out perplexity"])
    assert series["mean over clients"] == [29.0, 28.0, 27.0]
    assert series["worst client"] == [40.0, 40.0, 40.0]
    image = mpimg.imread(path)
    assert image.shape[1] > image.shape[0] and np.std(image) > 0.05


def test_a_setting_label_leaves_out_keys_it_does_not_set():
    keys = ["strategy", "logger"]
    assert Setting({"strategy": "local"}, []).label(keys) == "strategy=local"
    assert Setting({"strategy": "fedmoe", "logger": "wandb"}, []).label(keys) == \
        "strategy=fedmoe, logger=wandb"
    assert Setting({}, []).label(keys) == "defaults"
    assert Setting({}, []).label([]) == "all runs"
