"""Where a streamed `svdkit compress` reaches its peak memory: resident memory per phase, from the OS.

    python benchmarks/phase_memory.py [--layers 1] -- svdkit compress FOLDER --output OUT [flags ...]

Runs the command in this process with a thread that reads ``/proc/self/status`` every 5 ms, and marks a
phase boundary around the steps of the streamed path: opening the checkpoint, loading the input side,
capturing the first layer's inputs, loading each decoder layer, finishing its statistics, each matrix's
decomposition (and inside SVD-LLM's: the Cholesky factor, the SVD, the solve), writing its shard. Prints
one row per phase: the largest RSS (and anonymous RSS) seen during it and the RSS at its end, in MB
(2^20 bytes). Stops after ``--layers`` decoder layers (the partial folder is left for a resume; delete
it). Linux only. The phase hooks wrap svdkit's internal functions, so this script follows their names.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

MB = 2**20


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


class Phases:
    """The peak RSS between consecutive marks, printed as one row per phase."""

    def __init__(self) -> None:
        self.label, self.peak, self.anon = "start", 0, 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            s = status()
            if s["VmRSS"] > self.peak:
                self.peak, self.anon = s["VmRSS"], s["RssAnon"]
            time.sleep(0.005)

    def mark(self, label: str) -> None:
        time.sleep(0.02)  # let the sampler see the end of the phase
        now = status()
        print(f"| {self.label} | {self.peak / MB:.0f} | {self.anon / MB:.0f} | {now['VmRSS'] / MB:.0f} |", flush=True)
        self.label, self.peak, self.anon = label, now["VmRSS"], now["RssAnon"]


def wrap(phases: Phases, owner, name: str, label, after: str = "after {}") -> None:
    """Mark a phase around every call of ``owner.name``; `label(*args)` (or a string) names it, `after`
    (formatted with that name) the phase that follows it."""
    fn = getattr(owner, name)

    def marked(*args, **kwargs):
        text = label(*args, **kwargs) if callable(label) else label
        phases.mark(text)
        try:
            return fn(*args, **kwargs)
        finally:
            phases.mark(after.format(text))

    setattr(owner, name, marked)


def install(phases: Phases, layers: int) -> None:
    import svdkit.calibration.collect as collect
    import svdkit.engine.capture as capture
    import svdkit.methods.svd_llm as svd_llm
    import svdkit.pipeline.factor as factor
    import svdkit.pipeline.streaming as streaming

    wrap(phases, streaming, "open_checkpoint", "open the checkpoint (meta device)")
    wrap(phases, streaming, "materialize", lambda module, prefix, *a, **k: f"load {prefix or 'the input side'}",
         "after {} (for a layer: its calibration forwards)")  # fmt: skip
    wrap(phases, capture, "capture_layer_inputs", "capture layer 0's inputs")
    wrap(phases, factor, "factor_linear", lambda *a, **k: f"factor {a[6].split('.', 3)[-1]}")
    wrap(phases, svd_llm, "robust_cholesky", "  Cholesky of G")
    wrap(phases, svd_llm.torch.linalg, "svd", "  SVD of W L")
    wrap(phases, svd_llm.torch.linalg, "solve_triangular", "  A L^-1")
    wrap(phases, streaming, "write_shard", "write the shard")
    finish = collect._Collector.finish

    def finished(self, prefix=""):
        phases.mark(f"finish the statistics of {prefix or 'the layer'}")
        return finish(self, prefix)

    collect._Collector.finish = finished
    done = streaming.StreamedLayers.done

    def layer_done(self, index, *args):
        done(self, index, *args)
        if index + 1 >= layers:
            phases.mark("end")
            os._exit(0)

    streaming.StreamedLayers.done = layer_done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=1, help="decoder layers to run before stopping (1)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- svdkit compress FOLDER ... (the CLI's arguments)")
    a = p.parse_args()
    argv = a.command[1:] if a.command[:1] == ["--"] else a.command
    if argv[:1] == ["svdkit"]:
        argv = argv[1:]
    if argv[:1] != ["compress"]:
        p.error("give the command after --: svdkit compress FOLDER --output OUT ...")
    phases = Phases()
    print("| phase | peak RSS MB | its anonymous RSS MB | RSS at the end MB |\n|---|---|---|---|", flush=True)
    install(phases, a.layers)
    from svdkit.cli import main as cli

    sys.exit(cli(argv))


if __name__ == "__main__":
    main()
