"""The loss lesson's figures from the installed package, outside any notebook (they once used `plt` without importing it)."""
import matplotlib
matplotlib.use("Agg")

from ddpo_course.loss import clip_explorer, plot_clipped_objective

def test_plot_clipped_objective_outside_a_notebook():
    ax = plot_clipped_objective(0.2)
    assert len(ax.lines) >= 2 and "ε = 0.2" in ax.get_title()

def test_clip_explorer_redraws_outside_a_notebook():
    box = clip_explorer()
    image = box.children[-1]
    before = image.value
    box.children[0].value = 0.01
    assert before and image.value != before
