"""``benchmarks/base_vs_official.py``: argument validation, the writers on synthetic rows, and a tiny
CPU run of our variants (no official code needed); the official side runs only where the official
code and its dependencies are importable (skipped otherwise)."""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import base_vs_official as bvo  # noqa: E402
from benchmarks import parity_official as po  # noqa: E402
from fs3d_analysis.profile.busy import IdleGap, Timeline  # noqa: E402

TINY = ["--device", "cpu", "--config", "mini", "--steps", "1", "--max-voxels", "40", "--objects", "032_knife",
        "--warmup", "0", "--repeats", "1"]


def _exit_message(argv) -> str:
    with pytest.raises(SystemExit) as e:
        bvo.parse_args(argv)
    return str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["--device", "cpu", "--config", "huge"], "--config"),
    (["--device", "cpu", "--repeats", "0"], "--repeats"),
    (["--device", "cpu", "--warmup", "-1"], "--warmup"),
    (["--device", "cpu", "--steps", "0"], "--steps"),
    (["--device", "cpu", "--max-voxels", "0"], "--max-voxels"),
    (["--device", "cpu", "--stages", "ss,decoder"], "--stages"),
    (["--device", "cpu", "--stages", ","], "--stages: empty"),
    (["--device", "cpu", "--objects", "banana"], "--objects"),
    (["--device", "cpu", "--variants", "fp32,warp-drive"], "--variants warp-drive: unknown variant 'warp-drive'"),
    (["--device", "cpu", "--variants", "fp32,fp32"], "listed twice"),
    (["--device", "cpu", "--variants", "compile"], "--variants compile"),
    (["--device", "cpu", "--variants", "official-like"], "--variants official-like"),
    (["--device", "cpu", "--variants", "official-compile"], "CUDA-only"),
    (["--device", "tpu"], "--device"),
    (["--device", "cpu", "--gpu-busy"], "--gpu-busy"),
    (["--device", "cpu", "--rounds", "0"], "--rounds"),
    (["--device", "cpu", "--flops-only", "--rounds", "2"], "--flops-only times nothing"),
    (["--device", "cpu", "--cublaslt-workspace-kib", "-1"], "--cublaslt-workspace-kib must be >= 0"),
])
def test_argument_errors(argv, needle):
    assert needle in _exit_message(argv)


def test_official_paths_checked_only_when_official_requested(tmp_path):
    msg = _exit_message(["--device", "cpu", "--variants", "official,fp32", "--official", str(tmp_path)])
    assert "FS3D_OFFICIAL" in msg
    (tmp_path / "sam3d_objects").mkdir()
    msg = _exit_message(["--device", "cpu", "--variants", "official", "--official", str(tmp_path),
                         "--hf-configs", str(tmp_path)])
    assert "FS3D_HF_CONFIGS" in msg and "ss_generator.yaml" in msg
    args = bvo.parse_args(["--device", "cpu", "--variants", "fp32", "--official", str(tmp_path / "nowhere")])
    assert args.variants == ["fp32"]


def test_valid_arguments_are_normalised(tmp_path):
    args = bvo.parse_args(["--device", "cpu", "--variants", "bf16-cfg-kv,fp32", "--stages", "mesh,ss",
                           "--objects", "013_apple,032_knife", "--out", str(tmp_path)])
    assert args.stages == ["ss", "mesh"]  # pipeline order
    assert args.variants == ["bf16-cfg-kv", "fp32"]
    assert args.objects == ["013_apple", "032_knife"]
    assert args.device.type == "cpu"


def _rows():
    return [
        dict(variant="official", stage="ss", object=None, N=None, median_s=4.0, min_s=3.9, first_call_s=5.0, n=3,
             model_tflop=400.0, peak_mem_gb=10.0, resident_gb=4.0, max_abs_vs_official=0.0, rel_vs_official=0.0,
             precision="fp32+autocast"),
        dict(variant="compile", stage="ss", object=None, N=None, median_s=1.0, min_s=1.0, first_call_s=30.0, n=3,
             model_tflop=400.0, peak_mem_gb=5.0, resident_gb=2.0, max_abs_vs_official=0.1, rel_vs_official=0.02,
             precision="bf16"),
        dict(variant="official", stage="slat", object="007_tuna_fish_can", N=14171, median_s=3.0, model_tflop=220.0),
        dict(variant="compile", stage="slat", object="007_tuna_fish_can", N=14171, median_s=1.5, model_tflop=220.0),
        dict(variant="official", stage="mesh", object="007_tuna_fish_can", N=14171, median_s=0.3, model_tflop=2.4),
        dict(variant="compile", stage="mesh", object="007_tuna_fish_can", N=14171, median_s=float("nan"),
             model_tflop=2.4, error="OutOfMemoryError: boom"),
    ]


def test_complete_rows_speedup_and_mfu():
    rows = bvo.complete_rows(_rows(), peak_tflops=800.0)
    assert rows[0]["speedup_vs_official"] == pytest.approx(1.0)
    assert rows[1]["speedup_vs_official"] == pytest.approx(4.0)
    assert rows[1]["achieved_tflops"] == pytest.approx(400.0)
    assert rows[1]["mfu"] == pytest.approx(0.5)
    assert rows[3]["speedup_vs_official"] == pytest.approx(2.0)
    assert math.isnan(rows[5]["speedup_vs_official"])
    assert math.isnan(bvo.complete_rows(_rows(), peak_tflops=None)[1]["mfu"])


def test_writers_on_synthetic_rows(tmp_path):
    meta = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "config": "full", "official_commit": "abc",
            "peak_tflops": 800.0, "notes": ["note one"], "variants": {"official": "as the pipeline"}}
    bvo.write_outputs(_rows(), tmp_path, meta)
    with open(tmp_path / bvo.CSV_NAME) as fh:
        got = list(csv.DictReader(fh))
    assert len(got) == 6 and list(got[0]) == bvo.COLUMNS
    assert float(got[1]["speedup_vs_official"]) == pytest.approx(4.0)
    text = (tmp_path / bvo.README_NAME).read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "abc" in text and "note one" in text
    assert "| SS generator sampler |  |  | compile | 1.0000 |" in text and "50.0%" in text
    assert "ERROR: OutOfMemoryError: boom" in text
    # per object: the compile variant lacks a mesh time (error), so only the official total appears
    assert "| 1 | 007_tuna_fish_can | 14171 | official | 7.300 | 1.00 |" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / bvo.FIG_NAME).stat().st_size > 0


def test_the_peak_is_the_larger_of_the_runs_measurements_and_the_readme_says_so(tmp_path):
    from benchmarks.stage_latency import record_matmul_peak
    values = iter([788.0, 734.0])
    meta = {"device": "H100"}
    record_matmul_peak(meta, torch.device("cuda"), measure=lambda dev: next(values))
    assert meta["peak_tflops"] == 788.0 and meta["peak_tflops_runs"] == [788.0]
    record_matmul_peak(meta, torch.device("cuda"), measure=lambda dev: next(values))
    assert meta["peak_tflops"] == 788.0 and meta["peak_tflops_runs"] == [788.0, 734.0]  # the conservative one
    rows = bvo.complete_rows(_rows(), peak_tflops=meta["peak_tflops"])
    bvo.write_outputs(rows, tmp_path, meta)
    assert "788 TFLOP/s (the larger of 788 and 734, measured at the run's start and end)" in \
        (tmp_path / bvo.README_NAME).read_text()
    cpu = {}
    record_matmul_peak(cpu, torch.device("cpu"))  # no GPU: no measurement, the peak stays None
    assert cpu == {"peak_tflops": None}
    with pytest.raises(ValueError, match="must be > 0"):
        record_matmul_peak({}, torch.device("cuda"), measure=lambda dev: float("nan"))


def test_peak_every_round_gives_each_row_its_rounds_peak_and_keeps_mfu_against_the_largest(tmp_path):
    """``--peak-every-round``: round 2's row is judged against round 2's own peak in its own column, while MFU and
    MFU (executed) of every row stay against the largest measurement of the run (start, rounds, end)."""
    rows = [dict(round=rnd, variant="compile-all-zkv", stage="ss", object=None, N=None, median_s=1.0,
                 model_tflop=500.0, executed_tflop=400.0) for rnd in (1, 2)]
    meta = {"device": "H100", "peak_tflops": 800.0, "peak_tflops_runs": [800.0, 640.0, 760.0],
            "peak_tflops_by_round": {"1": 800.0, "2": 640.0}}
    bvo.write_outputs(rows, tmp_path, meta)
    assert [r["mfu_executed"] for r in rows] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert [r["round_peak_tflops"] for r in rows] == [800.0, 640.0]
    assert [r["mfu_executed_round_peak"] for r in rows] == [pytest.approx(0.5), pytest.approx(0.625)]
    text = (tmp_path / bvo.README_NAME).read_text()
    # no peak_at_end key (runs before it existed): three measurements for two rounds mean one at the end
    assert "800 TFLOP/s (the largest of 800, 640 and 760, measured at the run's start, before round 2 and at the end)" \
        in text
    assert "| round's peak TFLOP/s | MFU (executed, round's peak) |" in text
    assert "| 62.5% | 50.0% | 640 | 62.5% |" in text  # MFU, MFU (executed), the round's peak, against it
    with open(tmp_path / bvo.CSV_NAME) as fh:
        got = list(csv.DictReader(fh))
    assert [g["round_peak_tflops"] for g in got] == ["800.0", "640.0"]
    back, meta_back = bvo.load_outputs(tmp_path)  # --replot keeps the per-round peaks
    bvo.write_outputs(back, tmp_path / "again", meta_back)
    assert (tmp_path / "again" / bvo.README_NAME).read_text() == text


def test_the_cublaslt_workspace_is_stated_where_the_run_set_it():
    rows = [{"round": 1, "variant": "x", "stage": "ss", "object": None, "N": None, "median_s": 1.0}]
    text = bvo.readme_text(rows, {"device": "d", "variants": {}, "cublaslt_workspace_kib": 0})
    assert "cuBLASLt workspace: 0 KiB for the whole process" in text
    assert "cuBLASLt workspace" not in bvo.readme_text(rows, {"device": "d", "variants": {},
                                                             "cublaslt_workspace_kib": None})


@pytest.mark.parametrize("runs, by_round, at_end, expected", [
    ([800.0, 640.0], {"1": 800.0, "2": 640.0}, None, "the larger of 800 and 640, measured at the run's start and "
                                                      "before round 2"),  # killed before the end
    ([800.0, 640.0, 700.0, 760.0], {"1": 800.0, "2": 640.0, "3": 700.0}, True,
     "the largest of 800, 640, 700 and 760, measured at the run's start, before rounds 2-3 and at the end"),
    ([800.0, 640.0, 700.0], {"1": 800.0, "2": 640.0, "4": 700.0}, False,  # round 3's measurement failed
     "the largest of 800, 640 and 700, measured at the run's start and before rounds 2, 4"),
    ([800.0, 760.0], {"1": 800.0}, None, "the larger of 800 and 760, measured at the run's start and end"),
    ([800.0, 760.0], None, True, "the larger of 800 and 760, measured at the run's start and end"),
    ([800.0], {"1": 800.0}, None, None),
])
def test_peak_provenance_says_where_each_measurement_was_taken(runs, by_round, at_end, expected):
    meta = {"peak_tflops_runs": runs, **({"peak_tflops_by_round": by_round} if by_round else {}),
            **({} if at_end is None else {"peak_at_end": at_end})}
    assert bvo.peak_provenance(meta) == ("" if expected is None else f" ({expected})")


def test_a_failed_round_peak_leaves_the_round_without_one_and_the_run_going(capsys):
    meta = {"peak_tflops": 800.0, "peak_tflops_runs": [800.0]}
    bvo.record_round_peak(meta, torch.device("cuda"), 1, measure=lambda dev: pytest.fail("round 1 measures nothing"))
    bvo.record_round_peak(meta, torch.device("cuda"), 2, measure=lambda dev: 700.0)
    bvo.record_round_peak(meta, torch.device("cuda"), 3, measure=lambda dev: float("nan"))  # refused: not > 0

    def broken(dev):
        raise RuntimeError("cuBLAS failed")
    bvo.record_round_peak(meta, torch.device("cuda"), 4, measure=broken)
    assert meta["peak_tflops_by_round"] == {"1": 800.0, "2": 700.0}
    assert meta["peak_tflops_runs"] == [800.0, 700.0] and meta["peak_tflops"] == 800.0
    out = capsys.readouterr().out
    assert "round 3: the matmul peak could not be measured" in out and "round 4: the matmul peak" in out


def test_main_sets_the_cublaslt_workspace_before_the_device_checks(monkeypatch):
    """parse_args' device checks initialise CUDA on a GPU machine, after which the size could no longer be set: main
    sets it first."""
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "")
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE")  # restored (removed) after the test
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    seen = []

    def parse_args(argv):
        seen.append(os.environ.get("CUBLASLT_WORKSPACE_SIZE"))
        raise SystemExit("stop")
    monkeypatch.setattr(bvo, "parse_args", parse_args)
    with pytest.raises(SystemExit, match="stop"):
        bvo.main(["--device", "cpu", "--cublaslt-workspace-kib", "0"])
    assert seen == ["0"]


def test_without_round_peaks_no_round_columns_appear(tmp_path):
    rows = bvo.complete_rows([dict(round=1, variant="x", stage="ss", object=None, N=None, median_s=1.0,
                                   executed_tflop=400.0)], peak_tflops=800.0)
    assert "round_peak_tflops" not in rows[0]
    assert "round's peak" not in bvo.readme_text(rows, {"device": "d", "variants": {}})


def _two_round_rows():
    """Official slower in round 1 (host drift), ours the same in both rounds."""
    rows = []
    for rnd, off_ss in ((1, 3.0), (2, 2.0)):
        for v, ss, sl, me in (("official", off_ss, 2.5, 0.5), ("compile-all-zkv", 0.75, 0.65, 0.1)):
            rows += [dict(round=rnd, variant=v, stage="ss", object=None, N=None, median_s=ss),
                     dict(round=rnd, variant=v, stage="slat", object="007_tuna_fish_can", N=14171, median_s=sl),
                     dict(round=rnd, variant=v, stage="mesh", object="007_tuna_fish_can", N=14171, median_s=me)]
    return rows


def test_rounds_compare_within_a_round(tmp_path):
    rows = bvo.complete_rows(_two_round_rows(), peak_tflops=None)
    ours_ss = [r for r in rows if r["variant"] == "compile-all-zkv" and r["stage"] == "ss"]
    assert [r["speedup_vs_official"] for r in ours_ss] == [pytest.approx(4.0), pytest.approx(2.0 / 0.75)]
    totals = bvo.per_object_totals(rows)
    got = {(t["round"], t["variant"]): (t["seconds"], t["speedup"]) for t in totals}
    assert got[(1, "official")] == (pytest.approx(6.0), pytest.approx(1.0))
    assert got[(1, "compile-all-zkv")] == (pytest.approx(1.5), pytest.approx(4.0))
    assert got[(2, "compile-all-zkv")] == (pytest.approx(1.5), pytest.approx(5.0 / 1.5))
    bvo.write_outputs(rows, tmp_path, {"device": "H100"})
    text = (tmp_path / bvo.README_NAME).read_text()
    assert "| round | stage | object |" in text
    assert "Over 2 rounds" in text
    assert "| 007_tuna_fish_can | compile-all-zkv | 1.500 (1.500-1.500) | 3.67 (3.33-4.00) |" in text
    with open(tmp_path / bvo.CSV_NAME) as fh:
        assert [r["round"] for r in csv.DictReader(fh)] == ["1"] * 6 + ["2"] * 6


def test_official_compile_total_borrows_the_uncompiled_slat_and_mesh_of_its_round(tmp_path):
    """The shipped pipeline compiles only the SS generator: its per-object total is its own SS plus official's
    SLaT and mesh of the same round, and ours gets a second speedup against that total."""
    rows = _two_round_rows() + [dict(round=rnd, variant="official-compile", stage="ss", object=None, N=None,
                                     median_s=ss) for rnd, ss in ((1, 1.5), (2, 1.25))]
    rows = bvo.complete_rows(rows, peak_tflops=None)
    got = {(t["round"], t["variant"]): t for t in bvo.per_object_totals(rows)}
    assert got[(1, "official-compile")]["seconds"] == pytest.approx(1.5 + 2.5 + 0.5)
    assert got[(1, "official-compile")]["borrowed"] == ["slat", "mesh"] and got[(1, "official")]["borrowed"] == []
    assert got[(2, "official-compile")]["speedup"] == pytest.approx(5.0 / 4.25)
    assert got[(1, "compile-all-zkv")]["speedup_vs_compiled"] == pytest.approx(4.5 / 1.5)
    assert got[(2, "compile-all-zkv")]["speedup_vs_compiled"] == pytest.approx(4.25 / 1.5)
    bvo.write_outputs(rows, tmp_path, {"device": "H100"})
    text = (tmp_path / bvo.README_NAME).read_text()
    assert "speedup vs official-compile (same round)" in text
    assert "| 007_tuna_fish_can | compile-all-zkv | 1.500 (1.500-1.500) | 3.67 (3.33-4.00) | 2.92 (2.83-3.00) |" in text


def test_official_compile_borrows_only_the_stages_it_lacks_and_rounds_without_a_reference_say_so(tmp_path):
    rows = _two_round_rows() + [
        dict(round=1, variant="official-compile", stage="ss", object=None, N=None, median_s=1.5),
        dict(round=1, variant="official-compile", stage="slat", object="007_tuna_fish_can", N=14171, median_s=2.0),
        dict(round=2, variant="official-compile", stage="ss", object=None, N=None, median_s=1.25)]
    rows = [r for r in rows if not (r["round"] == 2 and r["variant"] == "official" and r["stage"] == "ss")]
    got = {(t["round"], t["variant"]): t for t in bvo.per_object_totals(bvo.complete_rows(rows, peak_tflops=None))}
    # round 1: its own SLaT time, the official mesh time
    assert got[(1, "official-compile")]["borrowed"] == ["mesh"]
    assert got[(1, "official-compile")]["seconds"] == pytest.approx(1.5 + 2.0 + 0.5)
    # round 2 has no official SS time: no official total, so no plain speedup, but the compiled one stays
    assert (2, "official") not in got
    assert got[(2, "official-compile")]["borrowed"] == ["slat", "mesh"]
    assert math.isnan(got[(2, "compile-all-zkv")]["speedup"])
    assert got[(2, "compile-all-zkv")]["speedup_vs_compiled"] == pytest.approx(4.25 / 1.5)
    bvo.write_outputs(bvo.complete_rows(rows, peak_tflops=None), tmp_path, {"device": "H100"})
    text = (tmp_path / bvo.README_NAME).read_text()
    assert "so its mesh and slat seconds are `official`'s of the same round" in text
    assert "| 007_tuna_fish_can | compile-all-zkv | 1.500 (1.500-1.500) | 4.00 (4.00-4.00) [1 of 2 rounds] |" in text


def test_idle_in_front_of_kernels_is_tabled_written_and_read_back(tmp_path):
    rows = _rows()
    rows[1].update(kernel_s=0.95, launches=300, gpu_busy=0.95, executed_tflop=300.0)
    rows[1]["kernels"] = {"kernel_cutlass_FlashAttentionForwardSm90": (0.5, 100),
                          "nvjet_sm90_tst_256x128": (0.4, 100), "Memset (Device)": (0.05, 100)}
    rows[1]["idle_before"] = {"kernel_cutlass_FlashAttentionForwardSm90": (0.0002, 100),
                              "nvjet_sm90_tst_256x128": (0.0001, 100), "Memset (Device)": (0.0003, 100)}
    rows[1]["after"] = {"Memset (Device)": ("nvjet_sm90_tst_256x128", 99),
                        "kernel_cutlass_FlashAttentionForwardSm90": ("Memset (Device)", 100),
                        "nvjet_sm90_tst_256x128": ("", 1)}
    meta = {"device": "H100", "peak_tflops": 800.0}
    bvo.write_outputs(rows, tmp_path, meta)
    text = (tmp_path / bvo.README_NAME).read_text()
    # by class: 0.60 ms in all, attention 0.20, matmul 0.10, copy / memset 0.30
    assert "| SS generator sampler |  | compile | 0.60 | 0.00 | 0.20 | 0.10 | 0.30 | 0.00 | 0.00 | 0.00 |" in text
    # longest first, with the wait per launch
    top = [line for line in text.splitlines() if line.startswith("| compile | `")]
    assert top == ["| compile | `Memset (Device)` | 100 | 0.30 | 3.00 | `nvjet_sm90_tst_256x128` (99x) |",
                   "| compile | `kernel_cutlass_FlashAttentionForwardSm90` | 100 | 0.20 | 2.00 | `Memset (Device)` (100x) |",
                   "| compile | `nvjet_sm90_tst_256x128` | 100 | 0.10 | 1.00 | `` (1x) |"]
    with open(tmp_path / bvo.KERNELS_CSV_NAME) as fh:
        kernels = list(csv.DictReader(fh))
    assert [k["idle_before_s"] for k in kernels] == ["0.0002", "0.0001", "0.0003"]
    assert [(k["most_often_after"], k["after_count"]) for k in kernels] == [
        ("Memset (Device)", "100"), ("", "1"), ("nvjet_sm90_tst_256x128", "99")]
    back, meta_back = bvo.load_outputs(tmp_path)
    assert back[1]["idle_before"] == rows[1]["idle_before"] and back[1]["after"] == rows[1]["after"]
    assert bvo.readme_text(bvo.complete_rows(back, 800.0), meta_back) == text
    # the timeline's own launch counts and a name the kernel sums lack survive --replot
    rows[1]["idle_before"] = {**rows[1]["idle_before"], "Memset (Device)": (0.0003, 99), "only_on_timeline": (1e-6, 1)}
    bvo.write_outputs(rows, tmp_path / "own", meta)
    back = bvo.load_outputs(tmp_path / "own")[0]
    assert back[1]["idle_before"] == rows[1]["idle_before"]
    assert back[1]["kernels"]["only_on_timeline"] == (0.0, 0) and back[1]["launches"] == 300
    rows[1].pop("idle_before"), rows[1].pop("after")  # a run before the columns: no table, empty cells
    bvo.write_outputs(rows, tmp_path, meta)
    assert "GPU idle in front of kernels" not in (tmp_path / bvo.README_NAME).read_text()
    with open(tmp_path / bvo.KERNELS_CSV_NAME) as fh:
        assert {k["idle_before_s"] for k in csv.DictReader(fh)} == {""}
    assert "idle_before" not in bvo.load_outputs(tmp_path)[0][1]


def test_replot_rejects_a_folder_without_outputs(tmp_path):
    with pytest.raises(SystemExit, match="not a base_vs_official.py output folder"):
        bvo.main(["--replot", str(tmp_path)])
    with pytest.raises(SystemExit, match="usage"):
        bvo.main(["--replot"])


def test_gpu_busy_columns_only_where_measured(tmp_path):
    rows = _rows()
    rows[0].update(kernel_s=1.5, launches=120000, gpu_busy=0.5, executed_tflop=300.0)  # official SS: 1.5 s of kernels
    rows[1].update(kernel_s=0.95, launches=900, gpu_busy=0.95, executed_tflop=300.0)
    rows[0]["kernels"] = {"cudnn_generated_fort_native_sdpa_sm90_flash_fprop": (1.0, 100),
                          "nvjet_sm90_tst_256x128": (0.25, 200), "Memset (Device)": (0.25, 119700)}
    rows[0]["timeline"] = Timeline(4000.0, 2500.0, (1.0, 0.5) + (0.125,) * 8,
                                   (IdleGap(0.0, 400.0, "sampler > cudaStreamEndCapture"), IdleGap(2100.0, 2.5, "")))
    # values that round differently at a few decimals (--replot must give the same README and timeline)
    rows[1]["timeline"] = Timeline(2000.0004, 246.94999, (0.12504,) + (0.0,) * 9,
                                   tuple(IdleGap(9.6496 + i, 3.04999, f"op {i}") for i in range(8)))
    meta = {"device": "H100", "peak_tflops": 800.0, "host_cpu": "Some CPU, 16 logical cores"}
    bvo.write_outputs(rows, tmp_path, meta)
    text = (tmp_path / bvo.README_NAME).read_text()
    assert "| GPU busy | MFU (kernels) | launches |" in text and "Some CPU, 16 logical cores" in text
    # MFU (kernels) = executed TFLOP / summed kernel seconds / peak
    assert "| 50% | 25.0% | 120000 |" in text and "| 95% | 39.5% | 900 |" in text  # 300 / 1.5 / 800, 300 / 0.95 / 800
    # the kernel classes of the profiled unit: attention 1.0, matmul 0.25, copies 0.25, idle 4.0 - 1.5
    header = next(line for line in text.splitlines() if line.startswith("| stage | object | variant | fused"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in text.splitlines() if line.startswith("| SS generator sampler |  | official | "))
    vals = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
    assert (vals["attention"], vals["matmul"], vals["copy / memset"], vals["idle"]) == \
        ("1.0000", "0.2500", "0.2500", "2.5000")
    with open(tmp_path / bvo.KERNELS_CSV_NAME) as fh:
        kernels = list(csv.DictReader(fh))
    assert [(k["kernel"], k["class"], k["launches"]) for k in kernels] == [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention", "100"),
        ("nvjet_sm90_tst_256x128", "matmul", "200"), ("Memset (Device)", "copy / memset", "119700")]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / bvo.KERNEL_FIG_NAME).stat().st_size > 0
    # --replot: the files alone give back the same README
    again = tmp_path / "again"
    again.mkdir()
    for name in (bvo.CSV_NAME, bvo.KERNELS_CSV_NAME, bvo.IDLE_CSV_NAME, "meta.json"):
        (again / name).write_bytes((tmp_path / name).read_bytes())
    bvo.main(["--replot", str(again)])
    assert (again / bvo.README_NAME).read_text() == text
    assert "| SS generator sampler |  | official | 4000.0 | 2500.0 | 100 50 12 12 12 12 12 12 12 12 | " \
        "0.0: 400.0 (sampler > cudaStreamEndCapture); 2100.0: 2.5 (-) |" in text
    loaded, _ = bvo.load_outputs(again)
    assert loaded[0]["timeline"] == rows[0]["timeline"] and loaded[1]["timeline"] == rows[1]["timeline"]
    assert len(loaded[1]["timeline"].gaps) == 8 and "| 247.0 |" not in text and "| 246.9 |" in text
    assert loaded[0]["kernels"]["Memset (Device)"] == (0.25, 119700) and loaded[0]["launches"] == 120000
    assert "kernels" not in loaded[1] and loaded[2]["object"] == "007_tuna_fish_can"
    # committed results keep kernels.csv xz-compressed: read back the same
    import lzma
    (again / (bvo.KERNELS_CSV_NAME + ".xz")).write_bytes(lzma.compress((again / bvo.KERNELS_CSV_NAME).read_bytes()))
    (again / bvo.KERNELS_CSV_NAME).unlink()
    assert bvo.load_outputs(again)[0][0]["kernels"] == loaded[0]["kernels"]
    bvo.main(["--replot", str(again)])  # re-rendering keeps the compressed form, and no plain copy beside it
    assert not (again / bvo.KERNELS_CSV_NAME).exists() and (again / bvo.README_NAME).read_text() == text
    assert bvo.load_outputs(again)[0][0]["kernels"] == loaded[0]["kernels"]
    with open(tmp_path / bvo.CSV_NAME) as fh:
        got = list(csv.DictReader(fh))
    assert float(got[0]["gpu_busy"]) == 0.5 and got[2]["gpu_busy"] == ""
    # without the measurement the table has no such columns, and the folder keeps no stale file of the last run
    bvo.write_outputs(_rows(), tmp_path, meta)
    assert "GPU busy" not in (tmp_path / bvo.README_NAME).read_text()
    assert not (tmp_path / bvo.IDLE_CSV_NAME).exists() and not (tmp_path / bvo.KERNELS_CSV_NAME).exists()
    # an idle.csv naming a unit the run does not have, or without its 'call' row, is refused
    with open(again / bvo.IDLE_CSV_NAME) as fh:
        lines = fh.read().splitlines()
    (again / bvo.IDLE_CSV_NAME).write_text("\n".join([lines[0]] + [ln.replace("official,", "nosuch,", 1)
                                                                    for ln in lines[1:]]) + "\n")
    with pytest.raises(SystemExit, match="idle.csv names a unit missing"):
        bvo.load_outputs(again)
    (again / bvo.IDLE_CSV_NAME).write_text("\n".join([ln for ln in lines if ",call," not in ln]) + "\n")
    with pytest.raises(SystemExit, match="has no 'call' row"):
        bvo.load_outputs(again)


def test_ours_only_tiny_cpu_run(tmp_path):
    args = bvo.parse_args(TINY + ["--variants", "fp32,bf16-cfg-kv", "--rounds", "2", "--out", str(tmp_path)])
    rows = bvo.run(args)
    assert [(r["round"], r["variant"], r["stage"]) for r in rows] == [  # --order alternate: round 2 reversed
        (rnd, v, s) for rnd, order in ((1, ("fp32", "bf16-cfg-kv")), (2, ("bf16-cfg-kv", "fp32")))
        for v in order for s in ("ss", "slat", "mesh")]
    assert not any(r.get("error") for r in rows), [r.get("error") for r in rows]
    assert all(r["median_s"] > 0 and r["model_tflop"] > 0 for r in rows)
    assert all(r["N"] == 40 for r in rows if r["stage"] != "ss")
    assert all("graphs_recorded_per_call" in r for r in rows)  # the column exists (a CPU records no graphs)
    assert (tmp_path / bvo.CSV_NAME).exists() and (tmp_path / bvo.README_NAME).exists()
    assert "| graphs recorded / call |" in (tmp_path / bvo.README_NAME).read_text()
    # each unit against the process's first unit of its stage (and object): fp32 of round 1 is that unit, so it and
    # fp32 of round 2 (the same computation on the CPU) read 0; bf16 rounds differently
    first = {(r["round"], r["variant"], r["stage"]): r["max_abs_vs_first"] for r in rows}
    for stage in ("ss", "slat", "mesh"):
        assert first[(1, "fp32", stage)] == 0.0 and first[(2, "fp32", stage)] == 0.0, stage
        assert first[(1, "bf16-cfg-kv", stage)] > 0 and first[(2, "bf16-cfg-kv", stage)] > 0, stage
    assert "max abs diff vs first unit |" in (tmp_path / bvo.README_NAME).read_text()


def test_executed_flops_count_what_the_switches_skip(tmp_path, monkeypatch):
    """Executed FLOPs: counting a whole sampler run (batched CFG, nothing cached) gives the model count exactly
    (per-pass count x passes); the condition K/V cache executes fewer; the mesh decoder skips nothing."""
    monkeypatch.setattr(bvo, "FLOP_OPTIONS", ("batch_cfg",) + bvo.FLOP_OPTIONS)  # count bf16-cfg too
    # several steps: with one pass the cache (K/V of both CFG branches, once) would execute more than it saves
    tiny = [a if a != "1" or TINY[i - 1] != "--steps" else "4" for i, a in enumerate(TINY)]
    args = bvo.parse_args(tiny + ["--variants", "bf16-cfg,bf16-cfg-kv", "--out", str(tmp_path)])
    assert args.steps == 4
    rows = {(r["variant"], r["stage"]): r for r in bvo.run(args)}
    for stage in ("ss", "slat"):
        plain, cached = rows[("bf16-cfg", stage)], rows[("bf16-cfg-kv", stage)]
        assert plain["executed_tflop"] == pytest.approx(plain["model_tflop"], rel=1e-9), stage
        assert 0 < cached["executed_tflop"] < cached["model_tflop"], stage
    assert rows[("bf16-cfg-kv", "mesh")]["executed_tflop"] == rows[("bf16-cfg-kv", "mesh")]["model_tflop"]
    text = (tmp_path / bvo.README_NAME).read_text()
    assert "| MFU | MFU (executed) |" in text


def test_flops_only_counts_without_timing(tmp_path):
    """--flops-only: compiled variants are accepted on a CPU (nothing runs as them), the official variant needs
    no checkout, and the one-key K/V executes fewer FLOPs than the K/V cache alone, which executes fewer than the
    model count."""
    tiny = [a if a != "1" or TINY[i - 1] != "--steps" else "4" for i, a in enumerate(TINY)]
    args = bvo.parse_args(tiny + ["--flops-only", "--variants", "official,compile-all,compile-all-zkv",
                                  "--official", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    rows = {(r["variant"], r["stage"]): r for r in bvo.run(args)}
    for stage in ("ss", "slat"):
        off, kv, zkv = (rows[(v, stage)] for v in ("official", "compile-all", "compile-all-zkv"))
        assert off["executed_tflop"] == off["model_tflop"]
        assert zkv["executed_tflop"] < kv["executed_tflop"] < kv["model_tflop"] == off["model_tflop"]
    assert rows[("compile-all-zkv", "mesh")]["executed_tflop"] == rows[("compile-all-zkv", "mesh")]["model_tflop"]
    for stage in ("ss", "slat"):  # the counted samplers split their FLOPs into classes that add up to the total
        r = rows[("compile-all-zkv", stage)]
        parts = [r[f"executed_{c}_tflop"] for c in ("attention", "matmul", "conv")]
        assert all(p >= 0 for p in parts) and parts[0] > 0 and parts[1] > 0
        assert sum(parts) == pytest.approx(r["executed_tflop"], rel=1e-9)
    assert math.isnan(rows[("official", "ss")]["executed_attention_tflop"])  # only the model total is counted there
    with open(tmp_path / bvo.FLOPS_CSV_NAME) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 9
    official_ss = next(r for r in table if r["variant"] == "official" and r["stage"] == "ss")
    assert official_ss["executed_attention_tflop"] == "" and official_ss["executed_tflop"] != ""
    assert "executed / model" in (tmp_path / bvo.README_NAME).read_text()
    assert not (tmp_path / bvo.CSV_NAME).exists()  # no timing table


def test_counting_options_keep_only_what_changes_flops():
    from benchmarks.stage_latency import SHORT, VARIANTS
    opts = bvo.counting_options(VARIANTS[SHORT["compile-all-zkv-fa4-slat-ro"]])
    assert (opts.precision, opts.compile_ss, opts.compile_slat, opts.attention_kernel) == ("fp32", False, False, "sdpa")
    assert opts.cache_cond_kv and opts.collapse_zero_cond and opts.batch_cfg


def _official_skip() -> str | None:
    why = po.official_available(po.DEFAULT_OFFICIAL)
    if why:
        return why
    if not all((po.DEFAULT_HF / f).is_file() for f in bvo.HF_FILES):
        return f"official HF yamls not found in {po.DEFAULT_HF}"
    return None


@pytest.mark.skipif(_official_skip() is not None, reason=str(_official_skip()))
def test_official_tiny_cpu_run_matches_fp32(tmp_path):
    args = bvo.parse_args(TINY + ["--variants", "official,fp32", "--out", str(tmp_path)])
    rows = bvo.run(args)
    assert not any(r.get("error") for r in rows), [r.get("error") for r in rows]
    for r in rows:
        if r["variant"] == "fp32":
            assert r["rel_vs_official"] < 1e-5, r


def test_difference_of_mesh_outputs_requires_the_same_voxels():
    import torch
    keys = torch.tensor([1, 5, 9])
    feats = torch.tensor([[1.0, -2.0], [0.5, 0.0], [4.0, 1.0]])
    d, rel = bvo.difference((keys, feats), (keys.clone(), feats + torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.0, 0.0]])))
    assert d == pytest.approx(0.5) and rel == pytest.approx(0.5 / 4.0)
    with pytest.raises(ValueError, match="voxel sets differ: 3 voxels vs 3 official, 1 not among"):
        bvo.difference((keys, feats), (torch.tensor([1, 5, 8]), feats))
    assert math.isnan(bvo.difference(torch.zeros(3), torch.zeros(4))[0])


@pytest.mark.parametrize("busy", [False, True])
@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("round_peak", [False, True])
def test_readme_table_rows_have_the_header_cell_count(busy, multi, round_peak):
    """Error rows included: each row of the per-stage table has as many cells as its header."""
    rows = [{"round": 1, "variant": "official", "stage": "ss", "object": None, "N": None, "median_s": 1.0},
            {"round": 2 if multi else 1, "variant": "x", "stage": "ss", "object": None, "N": None, "error": "boom"}]
    if busy:
        rows[0].update(gpu_busy=0.9, launches=3, kernel_s=0.9)
    if round_peak:
        rows[0].update(round_peak_tflops=780.0, mfu_executed_round_peak=0.5)
    lines = bvo.readme_text(rows, {"device": "d", "variants": {}}).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| ") and "| stage |" in line)
    table = lines[start:start + 4]
    assert "ERROR: boom" in table[3]
    assert len({line.count("|") for line in table}) == 1, table


def test_measure_reports_cuda_graphs_recorded_per_call_after_the_first(monkeypatch):
    """The count is taken around the warm-up and timed calls only (not the first call) and divided by their number."""
    counter = iter(range(0, 100, 3))  # before the first call is not read; then 0 before the Timer, 3 after
    calls = []
    monkeypatch.setattr(bvo, "cuda_graph_recordings", lambda dev: next(counter))
    _, r = bvo.measure(lambda: calls.append(1), torch.device("cpu"), warmup=1, repeats=2)
    assert len(calls) == 4 and r["graphs_recorded_per_call"] == 1.0


def test_alternate_order_reverses_the_variants_in_even_rounds():
    variants = ["official", "a", "b"]
    assert [bvo.round_order(variants, r, "alternate") for r in (1, 2, 3)] == [
        ["official", "a", "b"], ["b", "a", "official"], ["official", "a", "b"]]
    assert bvo.round_order(variants, 2, "fixed") == variants
    assert variants == ["official", "a", "b"]  # not reversed in place
    with pytest.raises(ValueError, match="order must be one of"):
        bvo.round_order(variants, 1, "random")
    with pytest.raises(ValueError, match="rounds count from 1"):
        bvo.round_order(variants, 0, "fixed")
    ours = TINY + ["--variants", "fp32"]
    assert bvo.parse_args(ours + ["--order", "fixed"]).order == "fixed" and bvo.parse_args(ours).order == "alternate"


def test_a_units_fa4_kernel_calls_are_recorded_in_meta(monkeypatch):
    """Only the calls made since the unit began, and nothing for a unit that made none."""
    from collections import Counter
    from fs3d_accel.model import attention_kernels as ak
    monkeypatch.setattr(ak.FA4_KERNEL_CALL, "counts", Counter({"launched": 7, "primed": 1}))
    meta: dict = {}
    before = Counter(ak.FA4_KERNEL_CALL.counts)
    bvo.record_fa4_kernel_calls(meta, "1 v slat obj", before)
    assert meta == {}
    ak.FA4_KERNEL_CALL.counts.update({"launched": 48, "fell back": 2})
    bvo.record_fa4_kernel_calls(meta, "1 v slat obj", before)
    assert meta == {"fa4_kernel_call_counts": {"1 v slat obj": {"launched": 48, "fell back": 2}}}


def test_measure_records_the_collections_inside_the_warmup_and_timed_calls_only():
    """A full collection in the first call (compiling) is not counted; one in each later call is, per call."""
    import gc
    calls = []

    def fn():
        calls.append(1)
        gc.collect(2)

    _, r = bvo.measure(fn, torch.device("cpu"), warmup=1, repeats=2)
    assert len(calls) == 4
    assert r["gc_gen2_per_call"] >= 1.0 and r["gc_per_call"] >= r["gc_gen2_per_call"]
    assert r["gc_ms_per_call"] >= 0 and r["gc_longest_ms"] >= 0
    _, quiet = bvo.measure(lambda: None, torch.device("cpu"), warmup=1, repeats=2)
    assert quiet["gc_gen2_per_call"] < 1.0  # no collection of its own in every call


def test_measure_freezes_after_the_first_call_only_where_asked(monkeypatch):
    import gc
    order = []
    monkeypatch.setattr(bvo, "freeze_after_warmup", lambda: order.append("freeze"))
    bvo.measure(lambda: order.append("call"), torch.device("cpu"), warmup=1, repeats=1, freeze_gc=True)
    assert order == ["call", "freeze", "call", "call"]
    order.clear()
    bvo.measure(lambda: order.append("call"), torch.device("cpu"), warmup=1, repeats=1)
    assert order == ["call", "call", "call"]
    assert gc.get_freeze_count() == 0  # nothing real was frozen by these tests


def test_python_gc_argument():
    tiny = TINY + ["--variants", "fp32"]
    assert bvo.parse_args(tiny).python_gc == "on"
    assert bvo.parse_args(tiny + ["--python-gc", "frozen"]).python_gc == "frozen"
    with pytest.raises(SystemExit):
        bvo.parse_args(tiny + ["--python-gc", "off"])


def test_collections_are_tabled_written_and_read_back(tmp_path):
    rows = _rows()
    rows[0].update(gc_per_call=2.5, gc_gen2_per_call=0.25, gc_ms_per_call=3.125, gc_longest_ms=11.5,
                   host_probe_us=1.375)
    meta = {"device": "H100", "peak_tflops": 800.0, "python_gc": "frozen"}
    bvo.write_outputs(rows, tmp_path, meta)
    text = (tmp_path / bvo.README_NAME).read_text()
    assert "`--python-gc frozen`" in text
    assert f"| SS generator sampler |  | {rows[0]['variant']} | 2.50 | 0.25 | 3.12 | 11.50 | 1.38 |" in text
    back, back_meta = bvo.load_outputs(tmp_path)
    assert back[0]["gc_ms_per_call"] == 3.125 and back[0]["gc_gen2_per_call"] == 0.25
    assert back[0]["host_probe_us"] == 1.375
    assert bvo.gc_lines(back, back_meta) == bvo.gc_lines(rows, meta)
    assert bvo.gc_lines(_rows(), meta) == []  # older runs without the columns: no section


def test_moved_flops_take_off_what_the_compiled_only_switches_skip():
    """``split_cond_kv`` and ``slat_coarse_upsample`` cannot run in the counting run; ``moved_flops`` takes off what they
    skip: for the coarse up-sampling exactly the difference FlopCounterMode sees between the two paths run eagerly,
    and for the split K/V every counted ``to_kv`` projection but one of the condition's rows."""
    import dataclasses
    import types

    from conftest import mini_slat_setup, sample_slat
    from torch.utils.flop_counter import FlopCounterMode

    from fs3d_accel.stages.options import RunOptions
    stage, objects, sampler = mini_slat_setup((150,), steps=5)
    cond, coords, noise = objects[0]
    counting = RunOptions(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True)

    def total(options, switches=None):
        with bvo.moved_flops(stage, switches) as saved, FlopCounterMode(display=False) as counter:
            sample_slat(stage, cond, coords, noise, sampler, options)
        return counter.get_total_flops(), saved[0]

    plain, nothing = total(counting)
    assert nothing == 0.0
    # FlopCounterMode's module tracker installs global module hooks, under which the coarse path steps aside (so
    # observers see the steps they watch): the two paths' GEMMs are counted here by a dispatch mode without hooks
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulFlops(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                a, b = args[-2], args[-1]
                self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return out

    gemms = {}
    for on in (False, True):
        with MatmulFlops() as mode:
            sample_slat(stage, cond, coords, noise, sampler, dataclasses.replace(counting, slat_coarse_upsample=on))
        gemms[on] = mode.flops
    _, coarse_saved = total(counting, types.SimpleNamespace(split_cond_kv=False, slat_coarse_upsample=True))
    assert coarse_saved > 0 and gemms[False] - gemms[True] == coarse_saved
    counted, split_saved = total(counting, types.SimpleNamespace(split_cond_kv=True, slat_coarse_upsample=False))
    assert counted == plain
    length = cond.shape[1]
    per_row = sum(2 * length * b.cross_attn.to_kv.in_features * b.cross_attn.to_kv.out_features
                  for b in stage.flow.blocks)
    assert split_saved == 2 * per_row  # the pair's two rows and the batch-1 row counted, one row made
    assert "precompute_cond_kv" not in stage.flow.__dict__  # the recording wrapper is gone
