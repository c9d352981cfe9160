"""Does a streamed compression's memory grow with depth? Resident memory after every decoder layer.

    python benchmarks/depth_memory.py [--layers 24] [--hidden 512] [--heal block] [--no-trim] [--work DIR]

Builds (once, in WORK) a random-weight bfloat16 Llama checkpoint of the given depth and width (MLP 4x hidden,
heads of 64, vocabulary 49152, one shard per layer, as benchmarks/scale.py builds them) and compresses it in
this process with :func:`svdkit.pipeline.streaming.compress_folder` (svd-llm at 0.4, 2 windows of 256 tokens
of the bundled text), reading ``RssAnon`` from /proc/self/status after each layer is written and the heap
trimmed. Prints the
anonymous resident memory per layer (MB, 2^20 bytes), its slope over the second half of the layers and the
process's peak (VmHWM). ``--no-trim`` turns off the engine's trim of the heap after each layer
(:func:`svdkit.core.memory.trim_heap`), to see what it prevents. Linux only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402  (the synthetic checkpoints' builder, beside this script)

import svdkit.engine.walk  # noqa: E402
from svdkit.pipeline import streaming  # noqa: E402
from svdkit.pipeline.options import CalibrationSettings, CompressionOptions  # noqa: E402

MB = 2**20


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def checkpoint(work: Path, layers: int, hidden: int) -> Path:
    """The random-weight checkpoint of this depth and width in `work` (built when missing)."""
    preset = scale.Preset(
        f"h{hidden}-d{layers}", family=f"h{hidden}", layers=layers, hidden=hidden, intermediate=4 * hidden,
        heads=hidden // 64, kv_heads=max(1, hidden // 128), head_dim=64, vocab=49152, tied=True,
    )  # fmt: skip
    folder = work / preset.name
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        config = preset.config()
        scale.write_shards(folder, scale.tensor_shapes(config), layers, 0, "cpu")
        scale.copy_tokenizer(folder, None)
        config.save_pretrained(folder)  # last: a folder with config.json is complete
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24, help="decoder layers (24)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size, a multiple of 128 (512)")
    p.add_argument("--heal", default="none", help="--heal of the compression (none)")
    p.add_argument("--no-trim", action="store_true", help="do not give the heap's free pages back after each layer")
    p.add_argument("--work", default="bench-output/depth_memory", help="checkpoints and outputs")
    a = p.parse_args()
    work = Path(a.work)
    folder = checkpoint(work, a.layers, a.hidden)
    if a.no_trim:
        svdkit.engine.walk.trim_heap = lambda: None
    after: list[int] = []
    done = streaming.StreamedLayers.done

    def measured(self, *args) -> None:
        done(self, *args)
        svdkit.engine.walk.trim_heap()  # as the engine does next (unless --no-trim)
        after.append(status("RssAnon"))

    streaming.StreamedLayers.done = measured
    calibration = CalibrationSettings("demo", 2, 256)
    options = CompressionOptions(ratio=0.4, progress=False, device="cpu", heal=a.heal, calibration=calibration)
    t = time.perf_counter()
    streaming.compress_folder(folder, work / "out", options, overwrite=True)
    seconds = time.perf_counter() - t
    half = len(after) // 2
    slope = (after[-1] - after[half]) / max(1, len(after) - 1 - half) / MB
    print(f"hidden {a.hidden}, {a.layers} layers, heal {a.heal}, trim {'off' if a.no_trim else 'on'}: {seconds:.0f} s")
    print("anonymous RSS after each layer (MB):", " ".join(str(round(x / MB)) for x in after))
    print(f"slope over the second half: {slope:+.1f} MB per layer; peak RSS (VmHWM) {status('VmHWM') / MB:.0f} MB")


if __name__ == "__main__":
    main()
