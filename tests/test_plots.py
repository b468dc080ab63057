"""fs3d_analysis.plots.reconstruction_gallery: renders tiny synthetic results and writes a PNG."""
from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from fs3d_analysis.plots import reconstruction_gallery  # noqa: E402
from conftest import make_scene  # noqa: E402


def _synthetic_sample(name: str):
    """make_scene's image / mask / point map with pinhole intrinsics (the scene's point map is a
    plane at z ~ 2, 0.01 m per pixel: focal ~ 200 px) and no ground truth."""
    img, mask, pm = make_scene()
    h, w = mask.shape
    k = np.array([[200.0, 0.0, w / 2], [0.0, 200.0, h / 2], [0.0, 0.0, 1.0]])
    return SimpleNamespace(name=name, image=img, mask=mask, pointmap=pm, intrinsics=k)


def test_reconstruction_gallery_writes_png(mini_pipe, tmp_path):
    samples = [_synthetic_sample("synthetic_a"), _synthetic_sample("synthetic_b")]
    s = samples[0]
    result = mini_pipe(s.image, s.mask, pointmap=s.pointmap, seed=0)
    # one real (random-weight) result and one failed run: both must be drawn
    path = tmp_path / "gallery.png"
    fig = reconstruction_gallery(samples, [result, None], path, metrics=[{"f_score": 12.3, "volume_iou": 0.1}, None],
                                 notes=["1.0 s", "failed"], ncols=2, panel_in=1.5, dpi=50)
    try:
        assert path.is_file() and path.stat().st_size > 0
        # no GT on these samples -> 2 panels per object, 2 objects in one figure row
        w_in, h_in = fig.get_size_inches()
        assert w_in == pytest.approx(2 * 2 * 1.5) and h_in == pytest.approx(1 * (1.5 + 0.55) + 0.5)
        with Image.open(path) as im:
            assert im.size == (round(w_in * 50), round(h_in * 50))
            assert im.size[0] > im.size[1]
        titles = [ax.get_title() for ax in fig.axes]
        assert any("F1 12.3" in t for t in titles)
        assert any("synthetic_b" in t for t in titles)
        # the random-weight mesh reaches behind the camera: near-plane culling still renders it
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert texts == ["no mesh (run failed)"]
    finally:
        plt.close(fig)


def test_reconstruction_gallery_checks_lengths():
    s = _synthetic_sample("x")
    with pytest.raises(ValueError, match="results"):
        reconstruction_gallery([s], [], None)
    with pytest.raises(ValueError, match="neither a camera nor intrinsics"):
        reconstruction_gallery([SimpleNamespace(name="y", image=s.image, mask=s.mask)], [None], None)
