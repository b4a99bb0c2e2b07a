"""Fashion-MNIST shards for the benchmarks, written by the project's own shard writer.

The idx.gz files come from ../shared/data beside the checkout, or from Debian's
dataset-fashion-mnist package; nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = next(
    (p for p in (REPO.parent / "shared" / "data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))
     if (p / "train-images-idx3-ubyte.gz").exists()),
    None,
)  # fmt: skip


def write_shards(split: str, out: Path, *options: str) -> Path:
    """Shards of Fashion-MNIST's ``train`` or ``t10k`` images in ``out`` (kept if already there);
    ``options`` go to pipeline-shards (--limit, --heldout-fraction, ...). Returns the manifest."""
    if FASHION_MNIST is None:
        raise SystemExit("Fashion-MNIST not found in ../shared/data or /usr/share/datasets (dataset-fashion-mnist)")
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline.data.shards", str(FASHION_MNIST / f"{split}-images-idx3-ubyte.gz"),
                        str(out), "--workers", "2", *options], check=True, cwd=REPO, capture_output=True)  # fmt: skip
    return out / "manifest.json"
