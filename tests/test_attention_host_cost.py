"""``benchmarks/attention_host_cost.py``: the host-time measurement's mechanics and arguments on the CPU (the FA4 paths
and the recorded mode need the GPU machine)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import attention_host_cost as ahc  # noqa: E402


def test_each_repeat_makes_the_calls_and_the_time_is_per_call():
    made = []
    fn = lambda: made.append(1)  # noqa: E731
    t = ahc.host_times(fn, calls=5, repeats=3, device=torch.device("cpu"), mode="issued")
    assert len(made) == 15 and 0 < t["per_call_s"] < 0.01 and t["end_s"] is None


def test_bad_measurement_arguments_are_refused():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="mode must be one of"):
        ahc.host_times(lambda: None, 1, 1, cpu, "launched")
    with pytest.raises(ValueError, match=">= 1"):
        ahc.host_times(lambda: None, 0, 1, cpu, "issued")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ahc.host_times(lambda: None, 1, 1, cpu, "recorded")


@pytest.mark.parametrize("argv, message", [
    (["--modes", "launched"], "unknown ['launched']"),
    (["--calls", "0"], "must be >= 1"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--device", "cpu", "--modes", "recorded"], "records CUDA graphs"),
])
def test_bad_arguments_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit):
        ahc.parse_args(argv + ["--out", "x"])
    assert message in capsys.readouterr().err


def test_a_cpu_run_times_every_sampler_site_and_writes_its_table(tmp_path):
    ahc.main(["--device", "cpu", "--dtype", "fp32", "--modes", "issued", "--calls", "2", "--repeats", "2",
              "--max-tokens", "8", "--out", str(tmp_path)])
    with open(tmp_path / "attention_host_cost.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["site"] for r in rows} == {s.site for s in ahc.SITE_SHAPES}
    assert all(r["path"] == "SDPA math" and r["mode"] == "issued" and float(r["host_us"]) > 0 for r in rows)
    assert all(int(r["Lq"]) <= 8 and int(r["Lk"]) <= 8 for r in rows)
    text = (tmp_path / "attention_host_cost.md").read_text()
    assert "lengths cut to 8 tokens" in text and "SDPA math" in text


def test_a_failing_path_is_a_row_and_the_others_still_run():
    def broken(q, k, v):
        raise RuntimeError("this kernel refuses the shape\nsecond line")
    paths, _ = ahc.call_paths(torch.device("cpu"))
    paths = {"broken": (broken, ahc.contextlib.nullcontext), **paths}
    written = []
    rows = ahc.measure(torch.device("cpu"), calls=1, repeats=1, modes=("issued",), max_tokens=4,
                       dtype=torch.float32, paths=paths, done=lambda r: written.append(len(r)))
    broken_rows = [r for r in rows if r["path"] == "broken"]
    assert len(broken_rows) == len(ahc.SITE_SHAPES)
    assert all(r["error"] == "warm-up: RuntimeError: this kernel refuses the shape" for r in broken_rows)
    assert all(r["host_us"] > 0 for r in rows if r["path"] == "SDPA math")
    assert written == list(range(1, len(rows) + 1))  # written after every path (one mode: one row per path)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_recording_times_the_calls_without_growing_memory():
    dev = torch.device("cuda")
    q = torch.randn(1, 64, 2, 32, device=dev, dtype=torch.bfloat16)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)  # noqa: E731
    ahc.warm(fn, dev)
    ahc.host_times(fn, 4, 2, dev, "recorded")
    reserved = torch.cuda.memory_reserved(dev)
    t = ahc.host_times(fn, 4, 3, dev, "recorded")
    assert t["per_call_s"] > 0 and t["end_s"] > 0
    assert torch.cuda.memory_reserved(dev) <= reserved


@cuda
def test_the_fa4_paths_give_flash_attn_funcs_output():
    from fs3d_accel.model.attention_kernels import flash_attn_cute_unavailable
    why = flash_attn_cute_unavailable(torch.device("cuda"))
    if why:
        pytest.skip(why)
    from flash_attn.cute import flash_attn_func
    paths, missing = ahc.call_paths(torch.device("cuda"))
    assert missing is None
    q, k, v = (torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = flash_attn_func(q, k, v)
    out = out[0] if isinstance(out, tuple) else out
    for name in ("fs3d direct op", "fs3d custom op", "FA4 _flash_attn_fwd"):
        assert torch.equal(paths[name][0](q, k, v), out), name
