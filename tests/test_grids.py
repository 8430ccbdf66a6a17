"""Report sample grids: one titled panel per method, images at a readable size, panels in a grid."""
import numpy as np
import pytest
import torch
from PIL import Image

from cqpolicy.tracking.grids import default_ncols, save_sample_grids, wrap_title

LONG = ("learned:path=/work/main/runs/quick-2024-06-01/retrain/mlp/policy.pt,threshold=0.35,min_reuse=2 (fp8_e4m3)"
        "\n2.40x MACs · FID 26.2 ± 0.5 · ΔFID +0.9 ± 0.2")


def _images(n, c, seed, size=28):
    return np.random.default_rng(seed).integers(0, 256, (n, c, size, size), dtype=np.uint8)


def test_five_panels_grey_and_rgb_are_a_readable_grid(tmp_path):
    panels = [("uncached (plain)\n1.00x MACs · FID 25.3 ± 0.3", _images(20, 1, 0)),
              ("fora:interval=3 (fp16)\n2.85x MACs · FID 27.1 ± 0.4", torch.from_numpy(_images(20, 1, 1))),
              (LONG, _images(20, 3, 2)),
              ("teacache:threshold=0.3 (int8)", _images(20, 1, 3)),
              ("smoothcache (fp16)", _images(7, 3, 4))]  # fewer images than the others
    path = save_sample_grids(panels, tmp_path / "grids.png")
    assert path == tmp_path / "grids.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        width, height = im.size
    # 3 panels to a row, 5 images of >= 0.45 in (at 120 dpi: >= 54 px) per panel row -> wide, two rows high
    assert width >= 3 * 5 * 54 and height >= 2 * 4 * 54
    assert width / height < 3 and width < 2000 and height < 2000


def test_layout_defaults_and_ncols(tmp_path):
    assert [default_ncols(n) for n in range(1, 8)] == [1, 2, 3, 2, 3, 3, 3]
    one = save_sample_grids([("a", _images(4, 1, 0))], tmp_path / "one.png")
    column = save_sample_grids([(str(i), _images(4, 3, i)) for i in range(3)], tmp_path / "col.png", ncols=1)
    with Image.open(one) as a, Image.open(column) as b:
        assert a.size[0] >= 2.6 * 120 - 2  # a small panel is still wide enough for its title
        assert b.size[1] > 2 * b.size[0]  # three panels stacked
        assert b.size[0] >= 2 * 0.9 * 120  # 4 images, 2 to a row: zoomed up to fill the panel (>= 0.9 in each)
    with pytest.raises(ValueError):
        save_sample_grids([], tmp_path / "none.png")
    with pytest.raises(TypeError, match="uint8"):
        save_sample_grids([("float", np.zeros((2, 1, 28, 28), np.float32))], tmp_path / "f.png")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        save_sample_grids([("c2", np.zeros((2, 2, 28, 28), np.uint8))], tmp_path / "c.png")


def test_long_titles_wrap_without_losing_text():
    wrapped = wrap_title(LONG, 36)
    lines = wrapped.split("\n")
    assert len(lines) >= 4 and all(len(line) <= 36 for line in lines)
    # nothing dropped: the same characters, only line breaks (and the spaces they replace) differ
    assert "".join(wrapped.split()) == "".join(LONG.split())
    assert lines[0].endswith("/")  # spec strings break after a separator, not mid-word
    assert wrap_title("short\ntwo", 36) == "short\ntwo"
