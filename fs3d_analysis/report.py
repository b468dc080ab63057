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
              weights: str = "sam3d-mini", notebooks: tuple[str, ...] = STORY) -> Path:
    """Execute the story notebooks and write ``<out_dir>/report.md``; returns its path."""
    from tqdm.auto import tqdm

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available on this machine")
    if weights != "sam3d-mini":
        raise ValueError(f"the story notebooks use the embedded 'sam3d-mini' (or FS3D_CHECKPOINT for full); got {weights!r}")
    out_dir = Path(out_dir).resolve()
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    nb_dir = notebooks_dir()
    env = {"FS3D_QUICK": "1" if quick else "0", "FS3D_FIGURES": str(figures), "MPLBACKEND": "Agg",
           "FS3D_CONFIG": "full" if device == "cuda" else "mini", "FS3D_RUN_DIR": str(out_dir)}
    rows = []
    with _env(**env):
        for name in tqdm(notebooks, desc="reproduce", file=sys.stdout):
            src = nb_dir / f"{name}.ipynb"
            if not src.is_file():
                raise FileNotFoundError(f"notebook {src} is missing (regenerate with `make notebooks`)")
            executed, seconds = execute_notebook(src, out_dir)
            md = to_markdown(executed)
            rows.append({"notebook": name, "seconds": round(seconds, 1), "markdown": md.name})
    lines = ["# fs3d reproduce", "",
             f"Embedded model `{weights}`, device `{device}`, config `{env['FS3D_CONFIG']}`, "
             f"{'quick (CI) sizes' if quick else 'full notebook sizes'}. Every number below was measured in this run; "
             "CPU times are wall-clock times on this machine.", "",
             "| notebook | seconds | report |", "|---|---|---|"]
    lines += [f"| {r['notebook']} | {r['seconds']} | [{r['markdown']}]({r['markdown']}) |" for r in rows]
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}](figures/{p.name})" for p in sorted(figures.glob("*.png"))]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out_dir / "reproduce.json").write_text(json.dumps({"env": env, "notebooks": rows}, indent=2))
    print(f"report: {report}")
    return report
