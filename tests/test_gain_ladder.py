"""benchmarks/gain_ladder.py: chaining same-run switch ratios from base_vs_official.py result folders."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gain_ladder as gl  # noqa: E402

OBJ = "007_tuna_fish_can"


def write_run(folder: Path, seconds: dict, rounds: int = 1, scale: dict | None = None) -> None:
    """A base_vs_official.py output folder: per variant (ss, slat, mesh) seconds at OBJ, each round scaled."""
    folder.mkdir(parents=True)
    with open(folder / "base_vs_official.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["round", "stage", "object", "N", "variant", "median_s"])
        w.writeheader()
        for rnd in range(1, rounds + 1):
            k = (scale or {}).get(rnd, 1.0)
            for variant, (ss, slat, mesh) in seconds.items():
                w.writerow(dict(round=rnd, stage="ss", object="", N="", variant=variant, median_s=ss * k))
                w.writerow(dict(round=rnd, stage="slat", object=OBJ, N=14171, variant=variant, median_s=slat * k))
                w.writerow(dict(round=rnd, stage="mesh", object=OBJ, N=14171, variant=variant, median_s=mesh * k))
    (folder / "meta.json").write_text(json.dumps({"device": "H100 test"}))


def test_ladder_chains_same_run_ratios_and_attributes_the_rest(tmp_path):
    write_run(tmp_path / "a", {"official": (4.0, 3.0, 1.0), "x": (2.0, 1.5, 0.5)})            # 8 s -> 4 s: 2x
    write_run(tmp_path / "b", {"x": (1.0, 1.0, 1.0), "y": (0.5, 0.75, 0.25)}, rounds=3,      # 3 s -> 1.5 s: 2x
              scale={2: 1.0, 3: 1.0})
    write_run(tmp_path / "c", {"official": (6.0, 5.0, 1.0), "y": (0.5, 0.5, 0.0)})           # direct: 12 / 1 = 12x
    steps = (gl.Step("first", ("a",), "official", "x"), gl.Step("second", ("b",), "x", "y"))
    rows = gl.ladder(steps, root=tmp_path, obj=OBJ)
    assert [r["switch"] for r in rows] == ["first", "second", gl.RESIDUAL]
    assert rows[0]["ratio"] == 2.0 and rows[1]["ratio"] == 2.0 and rows[1]["rounds"] == 3
    assert rows[1]["chained"] == 4.0
    # the chain predicts 8 / 4 = 2 s for y; y measured 1.5 s in the last step: 1.33x not explained by the switches
    res = rows[2]
    assert res["before_s"] == 2.0 and res["after_s"] == 1.5 and math.isclose(res["ratio"], 4 / 3)
    assert math.isclose(res["chained"], 8 / 1.5)
    assert math.isclose(sum(r["share"] for r in rows), 1.0)
    assert math.isclose(rows[0]["share"], math.log(2) / math.log(8 / 1.5))
    assert (rows[1]["ss_before_s"], rows[1]["ss_after_s"], rows[1]["slat_after_s"]) == (1.0, 0.5, 0.75)
    direct = gl.direct_ratio(tmp_path, OBJ, ("c", "official", "y"))
    assert direct["ratio"] == 12.0 and direct["official_s"] == 12.0
    gl.write(rows, direct, tmp_path / "out", OBJ)
    text = (tmp_path / "out" / "gain_ladder.md").read_text()
    assert "| 2 | second (`y`) | b (3) | 3.000 → 1.500 | 2.00x (2.00-2.00) | 4.00x |" in text
    assert "**12.00x**" in text and "12.000 s there against 8.000 s" in text
    with open(tmp_path / "out" / "gain_ladder.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_ratio_is_the_median_over_rounds_of_same_round_pairs(tmp_path):
    """A round missing one side is skipped; rounds pair within themselves, never across."""
    write_run(tmp_path / "a", {"x": (1.0, 1.0, 1.0), "y": (1.0, 0.5, 0.5)}, rounds=3, scale={2: 2.0, 3: 4.0})
    rows = gl.ladder((gl.Step("s", ("a",), "x", "y"),), root=tmp_path, obj=OBJ)
    assert rows[0]["ratio"] == 1.5 and rows[0]["rounds"] == 3 and rows[0]["before_s"] == 6.0


def test_a_step_without_both_variants_is_refused_by_name(tmp_path):
    write_run(tmp_path / "a", {"x": (1.0, 1.0, 1.0)})
    with pytest.raises(SystemExit, match="step 'missing': no round of \\['a'\\] has both 'x' and 'y'"):
        gl.ladder((gl.Step("missing", ("a",), "x", "y"),), root=tmp_path, obj=OBJ)


def test_the_committed_ladder_reads_every_step():
    """The shipped step list resolves against the committed H100 results (no GPU needed)."""
    rows = gl.ladder()
    assert len(rows) == len(gl.STEPS) + 1 and all(r["rounds"] >= 1 for r in rows[:-1])
    assert rows[0]["before"] == "official" and rows[-2]["after"] == "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-fk"
    # run F (session 5): official 4.571 s, ours at the official precision 3.486 s per object (its README's table)
    assert (round(rows[0]["before_s"], 3), round(rows[0]["after_s"], 3)) == (4.571, 3.486)
    # session 16's three runs pooled: six rounds of -ge against -ac
    assert rows[-3]["rounds"] == 6 and round(rows[-3]["after_s"], 3) == 1.225
    # session 22's three-stage run: -ac-fk at 1.1928 and 1.2885 s per object in its two rounds (median of two)
    assert rows[-2]["rounds"] == 2 and round(rows[-2]["after_s"], 3) == round((1.1928 + 1.2885) / 2, 3)
