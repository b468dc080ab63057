"""``fs3d reproduce``: the whole story as one report, by executing the story notebooks.

The notebooks are the single source of every figure and table (01 profiling, 02 SS trajectories,
03 SLaT sparsity, 04 mesh HFER, 05 method comparison + ablation); ``reproduce`` executes them
top to bottom with nbclient (same kernel as this Python), keeps the executed copies, converts each to
Markdown with its figures (nbconvert) and writes ``report.md`` linking them, with the time each took.
Figures go to ``<out>/figures`` (the notebooks read ``FS3D_FIGURES``), so a run never overwrites
the committed ``figures/``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

STORY = ("01_profiling", "02_ss_trajectories", "03_slat_sparsity", "04_mesh_hfer", "05_accelerate_and_compare")


def notebooks_dir() -> Path:
    from fs3d_analysis.notebook_utils import repo_root
    nb = repo_root() / "notebooks"
    if not nb.is_dir():
        raise FileNotFoundError(f"notebooks folder not found at {nb}: run `fs3d reproduce` from a checkout")
    return nb


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute_notebook(path: Path, out_dir: Path, timeout: int = 1800) -> tuple[Path, float]:
    """Execute one notebook (cwd = the notebooks folder); returns the executed copy and seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - t0
    out = out_dir / path.name
    nbformat.write(nb, out)
    return out, seconds


def to_markdown(executed: Path) -> Path:
    """Executed notebook -> Markdown with its images in ``<name>_files/``."""
    from nbconvert import MarkdownExporter
    from nbconvert.writers import FilesWriter

    body, resources = MarkdownExporter().from_filename(str(executed))
    resources["output_files_dir"] = f"{executed.stem}_files"
    FilesWriter(build_directory=str(executed.parent)).write(body, resources, notebook_name=executed.stem)
    return executed.with_suffix(".md")


def reproduce(out_dir: Path = Path("runs/reproduce"), device: str = "cpu", quick: bool = False,
              weights: str = "sam3d-mini", notebooks: tuple[str, ...] = STORY, config: str | None = None,
              allow_random: bool = False) -> Path:
    """Execute the story notebooks and write ``<out_dir>/report.md``; returns its path.

    ``config``: ``mini`` (the embedded trained sam3d-mini) or ``full`` (the SAM 3D dimensions, CUDA
    only, weights from ``FS3D_CHECKPOINT``); default ``mini`` on CPU and ``full`` on CUDA.
    ``allow_random``: without a checkpoint, run ``full`` on seeded random weights
    (``FS3D_ALLOW_RANDOM=1``): the timings and FLOPs are those of the full model, but the observation
    figures then say nothing about the paper's claims, and the report says so.
    """
    from tqdm.auto import tqdm

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    config = config or ("full" if device == "cuda" else "mini")
    if config not in ("mini", "full"):
        raise ValueError(f"config must be 'mini' or 'full', got {config!r}")
    if config == "full" and device != "cuda":
        raise ValueError("config 'full' needs --device cuda (the full model is far too slow on a CPU)")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available on this machine")
    if weights != "sam3d-mini":
        raise ValueError(f"the story notebooks use the embedded 'sam3d-mini' (or FS3D_CHECKPOINT for full); got {weights!r}")
    if allow_random and config != "full":
        raise ValueError("--allow-random only applies to config 'full' (the mini config has trained weights)")
    random_weights = config == "full" and not os.environ.get("FS3D_CHECKPOINT")
    if random_weights and not allow_random:
        raise ValueError("config 'full' needs FS3D_CHECKPOINT=<official checkpoint folder or model.safetensors>; "
                         "pass --allow-random to run the full-size model on random weights (timings only), "
                         "or --config mini for the embedded trained model")
    out_dir = Path(out_dir).resolve()
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    nb_dir = notebooks_dir()
    env = {"FS3D_QUICK": "1" if quick else "0", "FS3D_FIGURES": str(figures), "MPLBACKEND": "Agg",
           "FS3D_CONFIG": config, "FS3D_RUN_DIR": str(out_dir), "FS3D_ALLOW_RANDOM": "1" if random_weights else "0"}
    model = f"random weights at `{config}` size" if random_weights else (
        f"`{weights}`" if config == "mini" else f"checkpoint `{os.environ.get('FS3D_CHECKPOINT')}`")
    rows = []
    with _env(**env):
        for name in tqdm(notebooks, desc="reproduce", file=sys.stdout):
            src = nb_dir / f"{name}.ipynb"
            if not src.is_file():
                raise FileNotFoundError(f"notebook {src} is missing (regenerate with `make notebooks`)")
            executed, seconds = execute_notebook(src, out_dir)
            md = to_markdown(executed)
            rows.append({"notebook": name, "seconds": round(seconds, 1), "markdown": md.name})
    device_name = "CPU"
    if device == "cuda":
        import torch
        device_name = torch.cuda.get_device_name(0)
    lines = ["# fs3d reproduce", "",
             f"Model {model}, device `{device}` ({device_name}), config `{config}`, "
             f"{'quick (CI) sizes' if quick else 'full notebook sizes'}. Every number below was measured in this run; "
             "times are wall-clock times on this machine.", ""]
    if random_weights:
        lines += ["**Random weights**: no trained full-size weights were given (FS3D_CHECKPOINT). Timings, FLOPs and "
                  "memory are those of the full-size model, but the observation figures and quality tables do not "
                  "test the paper's claims.", ""]
    lines += ["| notebook | seconds | report |", "|---|---|---|"]
    lines += [f"| {r['notebook']} | {r['seconds']} | [{r['markdown']}]({r['markdown']}) |" for r in rows]
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}](figures/{p.name})" for p in sorted(figures.glob("*.png"))]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out_dir / "reproduce.json").write_text(json.dumps({"env": env, "device": device_name, "notebooks": rows},
                                                       indent=2))
    print(f"report: {report}")
    return report
