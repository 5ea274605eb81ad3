"""What checkpoint checksums cost: save (manifest included) and `load_model` at each verification level.

    .venv/bin/python bench/checksums.py                # a tiny model and a ~100 MB one, fp32, CPU

Prints per size: bytes on disk, the save time and the part of it spent hashing into checksums.json, and the load
time with verify="none", "size" (the default) and "full" (SHA-256 of every file; what resuming always does).
Best of three; the files are in the page cache, so "full" measures hashing, not the disk.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import r1forge
from r1forge.checkpoint.manifest import VERIFY_LEVELS, write_manifest
from r1forge.config import ModelConfig
from r1forge.model import build_model

SIZES = {"tiny": {}, "100MB": {"vocab_size": 32768, "hidden_size": 384, "num_hidden_layers": 4}}


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    for name, overrides in SIZES.items():
        model = build_model(ModelConfig.from_preset("tiny", **overrides))
        root = Path(tempfile.mkdtemp())
        ckpt = root / "ckpt"
        try:
            save = best_of(lambda: model.save_pretrained(ckpt))
            size = sum(p.stat().st_size for p in ckpt.iterdir())
            hashing = best_of(lambda: write_manifest(ckpt))
            loads = {level: best_of(lambda level=level: r1forge.load_model(ckpt, verify=level))
                     for level in VERIFY_LEVELS}
        finally:
            shutil.rmtree(root)
        print(f"{name}: {size / 1e6:.1f} MB; save {save * 1e3:.0f} ms (hashing {hashing * 1e3:.0f} ms); load "
              + ", ".join(f"verify={level} {t * 1e3:.0f} ms" for level, t in loads.items()))


if __name__ == "__main__":
    main()
