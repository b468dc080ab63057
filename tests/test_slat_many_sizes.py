"""``benchmarks/slat_many_sizes.py``: sizes, coordinates, the per-pass summary, and a CPU run of the script."""
from __future__ import annotations

import csv

import pytest
import torch

from benchmarks import slat_many_sizes as sms


def test_object_sizes_are_distinct_and_span_the_range():
    assert sms.object_sizes(4, 100, 400) == [100, 200, 300, 400]
    assert sms.object_sizes(1, 50, 90) == [50]
    with pytest.raises(ValueError, match="5 distinct sizes do not fit in \\[10, 12\\]"):
        sms.object_sizes(5, 10, 12)
    with pytest.raises(ValueError, match="--objects must be >= 1"):
        sms.object_sizes(0, 10, 12)
    with pytest.raises(ValueError, match="need 1 <= --min-voxels <= --max-voxels"):
        sms.object_sizes(2, 30, 20)


def test_warmup_size_is_none_of_the_timed_sizes():
    assert sms.warmup_size([100, 200, 300]) == 201
    assert sms.warmup_size([100, 101, 102]) == 103  # 101 and 102 are taken


@pytest.mark.parametrize("shapes", sms.SHAPES)
def test_object_coords_are_seeded_distinct_voxel_subsets(shapes):
    a = sms.object_coords([50, 80], 32, seed=3, shapes=shapes)
    b = sms.object_coords([50, 80], 32, seed=3, shapes=shapes)
    assert [len(c) for c in a] == [50, 80]
    for c, c2 in zip(a, b):
        assert c.dtype == torch.int32 and torch.equal(c, c2)
        assert torch.all(c[:, 0] == 0) and int(c[:, 1:].max()) < 32
        assert len(torch.unique(c, dim=0)) == len(c)
        assert torch.equal(c, c[torch.argsort(c[:, 1] * 4096 + c[:, 2] * 64 + c[:, 3])])  # sorted
    with pytest.raises(ValueError, match=f"exceeds the .* distinct voxels available at resolution 8 \\({shapes}\\)"):
        sms.object_coords([10_000], 8, seed=0, shapes=shapes)


def test_crops_are_surface_patches_with_a_real_objects_token_density():
    """A crop keeps a real surface's locality: at 14,171 voxels its 2x-downsampled token count is near the real
    14,171-voxel object's (3,619), where scattered voxels give ~2.5x as many."""
    def tokens(c):
        return len(torch.unique(c[:, 1:] // 2, dim=0))
    crop, = sms.object_coords([14171], 64, seed=0, shapes="crops")
    scattered, = sms.object_coords([14171], 64, seed=0, shapes="scattered")
    assert 2500 < tokens(crop) < 4500 and tokens(scattered) > 2 * tokens(crop)
    # the crop is the voxels on one side of a plane: every kept voxel projects below every dropped one
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(3, generator=g, dtype=torch.float64)
    surface = sms.surface_voxels(64, largest_only=True)
    kept = set(map(tuple, crop[:, 1:].tolist()))
    in_crop = torch.tensor([tuple(v) in kept for v in surface.tolist()])
    proj = surface.double() @ direction
    assert int(in_crop.sum()) == 14171 and proj[in_crop].max() <= proj[~in_crop].min()
    with pytest.raises(ValueError, match="unknown shapes 'cubes'"):
        sms.object_coords([10], 64, seed=0, shapes="cubes")


def test_summarise_per_variant_and_pass():
    rows = [{"variant": "a", "pass": p, "seconds": s, "graphs_recorded": g, "reserved_gb": m}
            for p, s, g, m in [(1, 1.0, 2, 5.0), (1, 3.0, 2, 6.0), (1, 2.0, 2, 7.0), (2, 0.5, 0, 7.0)]]
    rows.append({"variant": "b", "pass": 1, "seconds": 4.0, "graphs_recorded": 0, "reserved_gb": 1.0})
    assert sms.summarise(rows) == [
        {"variant": "a", "pass": 1, "calls": 3, "median_s": 2.0, "max_s": 3.0, "graphs_recorded": 6,
         "reserved_gb_end": 7.0},
        {"variant": "a", "pass": 2, "calls": 1, "median_s": 0.5, "max_s": 0.5, "graphs_recorded": 0,
         "reserved_gb_end": 7.0},
        {"variant": "b", "pass": 1, "calls": 1, "median_s": 4.0, "max_s": 4.0, "graphs_recorded": 0,
         "reserved_gb_end": 1.0}]


def test_paired_differences_by_size():
    """Each later variant against the first at the same size and pass: median difference and how often faster; sizes
    only one variant met are left out."""
    def row(v, p, n, sec):
        return {"variant": v, "pass": p, "N": n, "seconds": sec}
    rows = [row("a", 1, 100, 1.0), row("a", 1, 200, 2.0), row("a", 1, 300, 3.0), row("a", 2, 100, 1.0),
            row("b", 1, 100, 0.5), row("b", 1, 200, 2.5), row("b", 1, 300, 2.0), row("b", 2, 100, 1.5),
            row("b", 2, 999, 9.0), row("c", 1, 200, 2.0)]
    assert sms.paired(rows) == [
        {"variant": "b", "against": "a", "pass": 1, "sizes": 3, "median_diff_s": -0.5, "faster_at": 2},
        {"variant": "b", "against": "a", "pass": 2, "sizes": 1, "median_diff_s": 0.5, "faster_at": 0},
        {"variant": "c", "against": "a", "pass": 1, "sizes": 1, "median_diff_s": 0.0, "faster_at": 0}]
    assert sms.paired([r for r in rows if r["variant"] == "a"]) == []


def test_cpu_run_writes_one_row_per_call(tmp_path):
    sms.main(["--device", "cpu", "--config", "mini", "--variants", "bf16-cfg-kv", "--objects", "2",
              "--min-voxels", "60", "--max-voxels", "90", "--passes", "2", "--out", str(tmp_path)])
    with open(tmp_path / sms.CSV_NAME) as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["pass"], r["N"]) for r in rows] == [("1", "60"), ("1", "90"), ("2", "60"), ("2", "90")]
    assert all(float(r["seconds"]) > 0 for r in rows) and set(rows[0]) == set(sms.COLUMNS)
    readme = (tmp_path / "README.md").read_text()
    assert "CPU: a check of the script, not a timing." in readme and "| bf16-cfg-kv | 2 | 2 |" in readme
    assert (tmp_path / "slat_many_sizes.png").is_file()


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(SystemExit, match="--variants fastest: unknown variant 'fastest'"):
        sms.main(["--device", "cpu", "--variants", "fastest", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--variants compile-all-zkv-ro: compile_ss is CUDA-only"):
        sms.main(["--device", "cpu", "--variants", "compile-all-zkv-ro", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="all variants must hold the weights in one precision"):
        sms.main(["--device", "cpu", "--variants", "bf16,fp32", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--variants: \\['bf16'\\] named twice"):
        sms.main(["--device", "cpu", "--variants", "bf16,bf16", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--passes must be >= 1"):
        sms.main(["--device", "cpu", "--variants", "bf16", "--passes", "0", "--out", str(tmp_path)])
