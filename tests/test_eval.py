"""Evaluation harness: tidy rows, resumption, paper-style summary."""
import pandas as pd
import pytest

from fs3d_accel.accel import make_method
from fs3d_analysis.data import load_shipped_samples
from fs3d_analysis.eval import COLUMNS, KEY, METRICS, ablation_factories, append_row, evaluate, summarize


def test_evaluate_rows_resume_and_summary(tmp_path, mini_pipe):
    samples = list(load_shipped_samples())[:1]
    methods = {"base": lambda: None, "uniform-merge": lambda: make_method("uniform-merge", scale=2.0)}
    calls = []
    table = evaluate(mini_pipe, samples, methods, tmp_path, progress=False,
                     on_result=lambda m, s, r: calls.append(m))
    assert calls == ["base", "uniform-merge"]
    assert len(table) == 2 and set(METRICS) <= set(table.columns)
    assert table.set_index("method").loc["uniform-merge", "n_decoder_tokens"] < \
        table.set_index("method").loc["base", "n_decoder_tokens"]
    assert table.set_index("method").loc["uniform-merge", "aggregation_S"] == 2.0
    # resumed: nothing recomputed, same table
    again = evaluate(mini_pipe, samples, methods, tmp_path, progress=False, on_result=lambda m, s, r: calls.append(m))
    assert calls == ["base", "uniform-merge"]
    pd.testing.assert_frame_equal(again[KEY], table[KEY])
    summary = summarize(table).set_index("method")
    assert summary.loc["base", "speedup"] == 1.0
    assert summary.loc["base", "objects"] == 1


def test_ablation_has_eight_distinct_subsets():
    facs = ablation_factories()
    assert len(facs) == 8
    flags = {(a.ss_policy is not None, a.slat_policy is not None, a.decoder_transform is not None)
             for a in (f() for f in facs.values())}
    assert len(flags) == 8


def test_failed_reconstruction_is_a_zero_row_not_a_crash(tmp_path, mini_pipe):
    samples = list(load_shipped_samples())[:1]

    class EmptyStructure:
        def velocity(self, ctx, compute):
            raise ValueError("the SS stage produced no occupied voxel")

    from fs3d_accel.seams import Accelerator
    table = evaluate(mini_pipe, samples, {"broken": lambda: Accelerator(ss_policy=EmptyStructure())}, tmp_path,
                     progress=False)
    row = table.iloc[0]
    assert row["f_score"] == 0.0 and row["volume_iou"] == 0.0
    assert "no occupied voxel" in row["error"]


def test_failed_and_successful_rows_stay_aligned_in_either_order(tmp_path, mini_pipe):
    """A failed run's row lacks the run columns; it must land under the right columns whether it is
    written before or after a full row (pandas' plain append would shift the values)."""
    samples = list(load_shipped_samples())[:1]

    class EmptyStructure:
        def velocity(self, ctx, compute):
            raise ValueError("the SS stage produced no occupied voxel")

    from fs3d_accel.seams import Accelerator
    broken = lambda: Accelerator(ss_policy=EmptyStructure())  # noqa: E731
    for order in (("base", "broken"), ("broken", "base")):
        out = tmp_path / "-".join(order)
        methods = {m: (broken if m == "broken" else (lambda: None)) for m in order}
        table = evaluate(mini_pipe, samples, methods, out, progress=False)
        assert list(table.columns) == COLUMNS
        table = table.set_index("method")
        assert table.loc["broken", "device"] == "cpu" and table.loc["broken", "seed"] == 0
        assert "no occupied voxel" in table.loc["broken", "error"]
        assert pd.isna(table.loc["broken", "time_total"]) and table.loc["broken", "f_score"] == 0.0
        assert table.loc["base", "time_total"] > 0 and pd.isna(table.loc["base", "error"])
        assert table.loc["base", "n_voxels"] > 0 and table.loc["base", "device"] == "cpu"


def test_append_row_rejects_a_column_the_file_lacks(tmp_path):
    csv = tmp_path / "results.csv"
    append_row(csv, {"object": "a", "method": "base", "setting": "default", "f_score": 1.0})
    import pytest
    with pytest.raises(ValueError, match="columns \\['surprise'\\]"):
        append_row(csv, {"object": "b", "method": "base", "setting": "default", "surprise": 2})
    assert len(pd.read_csv(csv)) == 1


def test_eval_cli_rejects_bad_arguments_before_loading_a_model():
    import pytest

    from fs3d_accel.cli import main

    cases = [(["--workers", "2"], "--workers 2 needs --ray"),
             (["--ray", "--workers", "0"], "--workers must be >= 1, got 0"),
             (["--limit", "0"], "--limit must be >= 1, got 0"),
             (["--methods", " , "], "--methods names no method")]
    for argv, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            main(["eval", *argv, "--weights", "no-such-weights"])
    with pytest.raises(ValueError, match="no-such-method"):
        main(["eval", "--methods", "base,no-such-method", "--weights", "no-such-weights"])


def test_load_dataset_reads_a_sample_folder_and_rejects_unknown_names(tmp_path):
    from pathlib import Path

    from fs3d_analysis.eval import load_dataset
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "ycb_scale" / "scene"
    samples = load_dataset(str(folder), limit=2)
    assert [s.name for s in samples] == [s.name for s in load_dataset(str(folder))][:2]
    assert len(samples) == 2
    with pytest.raises(ValueError, match="folder holding samples.npz"):
        load_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'ycbb'"):
        load_dataset("ycbb")
