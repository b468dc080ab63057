"""``benchmarks/gemm_first_call.py`` and ``benchmarks/slat_host_profile.py``: their arguments, their rows, and a CPU run
of each (a check of the scripts; their timings mean something on a GPU only)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks import gemm_first_call as gfc
from benchmarks import slat_host_profile as shp

ROOT = Path(__file__).resolve().parents[1]


def test_gemm_first_call_writes_one_row_per_call(tmp_path):
    gfc.main(["--device", "cpu", "--ops", "addmm,mm", "--sizes", "33,47", "--blocks", "2", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / gfc.CSV_NAME)))
    # 2 meetings x 2 sizes x 2 ops x 3 shapes x 2 blocks
    assert len(rows) == 2 * 2 * 2 * len(gfc.SHAPES) * 2
    assert {(r["op"], r["meeting"]) for r in rows} == {(o, m) for o in ("addmm", "mm") for m in ("1", "2")}
    assert all(float(r["total_ms"]) >= float(r["host_ms"]) >= 0 for r in rows)
    readme = (tmp_path / "README.md").read_text()
    assert readme.count("| addmm | mlp.fc1 |") == 2 and "| mm | attn.qkv | 2 |" in readme


def test_gemm_ops_compute_their_math():
    import torch
    x, w, b = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3)
    torch.testing.assert_close(gfc.op_fns("addmm")(x, w, b), x @ w.t() + b)
    torch.testing.assert_close(gfc.op_fns("mm")(x, w, b), x @ w.t())
    torch.testing.assert_close(gfc.op_fns("addmm-gelu")(x, w, b), torch.nn.functional.gelu(x @ w.t() + b))
    with pytest.raises(ValueError, match="unknown op 'gemm'"):
        gfc.op_fns("gemm")


@pytest.mark.parametrize("argv,message", [
    (["--blocks", "1"], "--blocks must be >= 2"),
    (["--sizes", "5,5"], "--sizes: distinct counts"),
    (["--sizes", "a"], "--sizes: comma-separated integers"),
    (["--ops", "addmm,fma"], "--ops: unknown op 'fma'"),
    (["--ops", "mm,mm"], "--ops: distinct op names"),
    (["--ops", ","], "--ops: distinct op names, at least one"),
    (["--sizes", "10,12", "--ops", "addmm,mm"], "two would meet"),
])
def test_gemm_first_call_rejects_bad_arguments(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        gfc.main(["--device", "cpu", "--out", str(tmp_path), *argv])


def test_each_variant_meets_sizes_no_earlier_variant_met():
    assert shp.object_sizes_per_variant([100, 200], 3) == [[100, 200], [103, 203], [106, 206]]
    with pytest.raises(SystemExit, match="two objects would share a size"):
        shp.object_sizes_per_variant([100, 103], 2)
    with pytest.raises(SystemExit, match="warm-up size"):
        shp.object_sizes_per_variant([5], 1)


def test_slat_host_profile_on_cpu_records_every_step(tmp_path):
    shp.main(["--device", "cpu", "--config", "mini", "--variants", "bf16", "--sizes", "120,160", "--cprofile",
              "--top", "5", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / shp.CSV_NAME)))
    calls = [r for r in rows if r["step"] == "-1"]
    assert [int(r["N"]) for r in calls] == [120, 160]
    steps = [r for r in rows if r["object"] == "0" and r["step"] != "-1"]
    assert [int(r["step"]) for r in steps] == list(range(len(steps))) and len(steps) >= 3
    # the host time of the steps fits in the call's wall time
    assert sum(float(r["host_ms"]) for r in steps) <= float(calls[0]["host_ms"])
    assert [r["call"] for r in calls] == ["0", "1"]  # the last object ran under cProfile
    profile = (tmp_path / "host_profile_bf16.txt").read_text()
    assert "Ordered by: internal time" in profile and "was called by" in profile
    assert (tmp_path / "host_profile_bf16.prof").stat().st_size > 0
    assert "| bf16 " in (tmp_path / "README.md").read_text()


def test_slat_host_profile_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--sizes: distinct counts"):
        shp.main(["--device", "cpu", "--config", "mini", "--variants", "bf16", "--sizes", "50,50", "--out",
                  str(tmp_path)])
    with pytest.raises(SystemExit, match="--top must be >= 1"):
        shp.main(["--device", "cpu", "--config", "mini", "--variants", "bf16", "--top", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--variants nope"):
        shp.main(["--device", "cpu", "--config", "mini", "--variants", "nope", "--out", str(tmp_path)])


def test_slat_host_profile_repeat_meets_each_object_again(tmp_path):
    shp.main(["--device", "cpu", "--config", "mini", "--variants", "bf16", "--sizes", "120,160", "--repeat", "2",
              "--cprofile", "--top", "5", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / shp.CSV_NAME)))
    calls = [r for r in rows if r["step"] == "-1"]
    assert [(r["object"], int(r["N"])) for r in calls] == [("0m1", 120), ("0m2", 120), ("0m3", 120),
                                                           ("1m1", 160), ("1m2", 160), ("1m3", 160)]
    assert [r["call"] for r in calls] == ["0"] * 5 + ["1"]  # only the last object's last meeting is profiled
    with pytest.raises(SystemExit, match="--repeat must be >= 0"):
        shp.main(["--device", "cpu", "--config", "mini", "--variants", "bf16", "--repeat", "-1", "--out",
                  str(tmp_path)])


def test_cprofile_steps_profiles_only_the_first_steps(tmp_path):
    """--cprofile-steps 1: the profile ends with the first velocity call, so it holds that step's network passes where
    the whole call's profile holds every step's; it needs --cprofile and a count >= 0."""
    import pstats

    from fs3d_accel.model.slat_flow import SLaTFlowModel
    line = SLaTFlowModel.forward.__code__.co_firstlineno

    def network_calls(folder):  # calls of the SLaT flow's forward, one per sampler step
        stats = pstats.Stats(str(folder / "host_profile_bf16.prof")).stats
        return sum(v[1] for k, v in stats.items() if k[0].endswith("slat_flow.py") and k[1:] == (line, "forward"))

    base = ["--device", "cpu", "--config", "mini", "--variants", "bf16", "--sizes", "120", "--cprofile", "--top", "5"]
    shp.main(base + ["--out", str(tmp_path / "all")])
    shp.main(base + ["--cprofile-steps", "1", "--out", str(tmp_path / "first")])
    steps = [r for r in csv.DictReader(open(tmp_path / "all" / shp.CSV_NAME)) if r["step"] != "-1"]
    # the first step's passes (this variant runs CFG's two branches as two passes) against at least one per step
    assert network_calls(tmp_path / "first") == 2
    assert network_calls(tmp_path / "all") >= len(steps) >= 3 and network_calls(tmp_path / "all") > 2
    assert json.loads((tmp_path / "first" / "meta.json").read_text())["cprofile_steps"] == 1
    with pytest.raises(SystemExit, match="--cprofile-steps must be >= 0 and needs --cprofile"):
        shp.main(["--device", "cpu", "--config", "mini", "--variants", "bf16", "--cprofile-steps", "1", "--out",
                  str(tmp_path)])
    with pytest.raises(SystemExit, match="--cprofile-steps must be >= 0"):
        shp.main(base + ["--cprofile-steps", "-1", "--out", str(tmp_path)])
    too_many = f"--cprofile-steps 999: the SLaT sampler of config 'mini' has {len(steps)} steps"
    with pytest.raises(SystemExit, match=too_many):
        shp.main(base + ["--cprofile-steps", "999", "--out", str(tmp_path)])


def test_host_split_groups_the_session23_step0_profile():
    """The committed profile of a 14k call's first step (session 23): each part's inclusive ms and calls, exactly as
    pstats holds them, and the profile's own total."""
    prof = next((ROOT / "benchmarks/results/slat_host_profile_h100/session23/step0").glob("host_profile_*.prof"))
    rows, total = shp.host_split(prof)
    assert total == pytest.approx(71.022, abs=1e-3)
    got = {r["part"]: (round(r["ms"], 2), r["calls"]) for r in rows}
    # the input path ran twice in that step: once for the tables (11.17 ms, within "tables"), once in the recorded
    # pass (with _io_out: "IO blocks", 10.97 ms)
    assert got == {"tables": (13.38, 1), "tables: input path run": (11.17, 1), "condition K/V": (4.45, 1),
                   "IO blocks": (10.97, 2), "torso launches": (20.04, 24), "piece captures": (3.83, 28),
                   "piece replays": (5.63, 13), "hook check": (2.21, 1)}
    assert [r["part"] for r in rows] == [p.name for p in shp.HOST_PARTS]
    assert {r["part"]: r["within"] for r in rows if r["within"]} == {"tables: input path run": "tables"}
    assert sum(r["ms"] for r in rows if not r["within"]) < total  # top-level parts share no calls


def test_host_split_counts_every_numbered_torso_function_of_the_session26_profiles():
    """With kept block modulations (-cm) inductor names each block's function apart (repeated_subgraph0..23): the
    torso part counts all 24 of them, as it counts the two shared ones of the plain torso."""
    folder = ROOT / "benchmarks/results/slat_host_profile_h100/session26"
    got = {}
    for prof in folder.glob("host_profile_*.prof"):
        rows, _ = shp.host_split(prof)
        got[prof.name.endswith("-mi.prof")] = next((round(r["ms"], 2), r["calls"]) for r in rows
                                                   if r["part"] == "torso launches")
    assert got == {False: (13.99, 24), True: (17.43, 24)}
    assert shp._matches(("/tmp/x.py", 1, "repeated_subgraph17"), ("", "repeated_subgraph*"))
    assert not shp._matches(("/tmp/x.py", 1, "repeated_subgraph_helper"), ("", "repeated_subgraph*"))
    assert not shp._matches(("/tmp/x.py", 1, "repeated_subgraph"), ("", "repeated_subgraph*"))


def test_slat_host_profile_trace_bills_the_idle_to_project_code_and_rereads(tmp_path):
    shp.main(["--device", "cpu", "--config", "mini", "--variants", "bf16", "--sizes", "120", "--trace",
              "--trace-steps", "1", "--top", "5", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "idle_attribution.csv")))
    assert {r["attribution"] for r in rows} == {"project", "project_path", "python", "op"}
    assert {r["variant"] for r in rows} == {"bf16"}
    for kind in ("project", "python", "op"):  # each attribution bills all of the idle: on the CPU, the whole window
        assert sum(float(r["share"]) for r in rows if r["attribution"] == kind) == pytest.approx(1.0)
    # the traced window holds the first step: the flow's forward is among the project frames the GPU "waited" on
    assert any("slat_flow.py" in r["key"] for r in rows if r["attribution"] == "project")
    assert (tmp_path / "trace_bf16.json.gz").stat().st_size > 0
    readme = (tmp_path / "README.md").read_text()
    assert "## Where the GPU waited in the traced call" in readme and "end of step 1" in readme
    calls = [r for r in csv.DictReader(open(tmp_path / shp.CSV_NAME)) if r["step"] == "-1"]
    assert [r["call"] for r in calls] == ["1"]
    # --reread rebuilds the README and the trace tables from the folder's files, running nothing
    before = (tmp_path / "first_step_parts.csv").read_text()
    (tmp_path / "README.md").unlink()
    (tmp_path / "first_step_parts.csv").write_text("stale")
    shp.main(["--reread", str(tmp_path), "--top", "5"])
    assert (tmp_path / "first_step_parts.csv").read_text() == before
    assert "## Where the GPU waited in the traced call" in (tmp_path / "README.md").read_text()
    with pytest.raises(SystemExit, match="not a slat_host_profile.py run folder"):
        shp.main(["--reread", str(tmp_path / "nothing")])
    (tmp_path / "trace_bf16.json.gz").unlink()
    with pytest.raises(SystemExit, match="no trace_<variant>.json.gz is there"):
        shp.main(["--reread", str(tmp_path)])
    with pytest.raises(SystemExit, match="--out is required"):
        shp.main(["--device", "cpu", "--config", "mini"])


def test_slat_host_profile_trace_arguments_are_checked(tmp_path):
    base = ["--device", "cpu", "--config", "mini", "--variants", "bf16", "--sizes", "120", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="--trace and --cprofile"):
        shp.main(base + ["--trace", "--cprofile"])
    with pytest.raises(SystemExit, match="--trace-steps must be >= 0"):
        shp.main(base + ["--trace", "--trace-steps", "-1"])
    with pytest.raises(SystemExit, match="--trace-steps 999: the SLaT sampler"):
        shp.main(base + ["--trace", "--trace-steps", "999"])
