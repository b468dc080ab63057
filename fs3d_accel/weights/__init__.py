"""Weights shipped inside the package (loaded with no network access)."""
from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
#: name -> (folder, config name)
SHIPPED = {"sam3d-mini": ("sam3d-mini", "mini")}
#: the shipped file: model.safetensors compressed with xz (lossless; the package stays under 20 MB)
WEIGHTS_FILE = "model.safetensors.xz"


def shipped_weights(name: str) -> tuple[Path, str]:
    """Path of the shipped (xz-compressed) safetensors file of ``name`` and its config name."""
    if name not in SHIPPED:
        raise ValueError(f"unknown pretrained model {name!r}; shipped: {sorted(SHIPPED)}")
    folder, cfg = SHIPPED[name]
    path = WEIGHTS_DIR / folder / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"weights of {name!r} are not in this installation ({path})")
    return path, cfg


def safetensors_bytes(path: Path) -> bytes:
    """The safetensors bytes of ``path`` (decompressed when it ends in ``.xz``)."""
    data = Path(path).read_bytes()
    if str(path).endswith(".xz"):
        import lzma
        data = lzma.decompress(data)
    return data


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
