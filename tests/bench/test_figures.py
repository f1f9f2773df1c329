"""The bench's labelled image grids."""

import pytest
import torch

from qdrift.bench.figures import have_pillow, labelled_grid

pytestmark = pytest.mark.skipif(not have_pillow(), reason="labels need Pillow")


def test_a_long_label_widens_the_label_column_and_never_covers_an_image():
    tiles = -torch.ones(3, 1, 28, 28)  # black tiles: a label drawn over them would show as changed pixels
    short = labelled_grid([("Q", tiles)])
    long = labelled_grid([("w4a4 Q-Drift v2 4 bands sized and tuned", tiles)])
    images = short.shape[1] - 110  # the default label column
    assert long.shape[1] > short.shape[1]
    width = long.shape[1] - images
    assert (long[:, width:] == short[:, 110:]).all()  # the image part is the same, untouched by the label
    assert (long[:, :width] < 128).any()  # and the label was drawn in its column
