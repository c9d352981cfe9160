"""llama.cpp's quantizations of the dense model, scored on the protocol's windows through its own runtime.

    python benchmarks/llamacpp_baselines.py [--data-dir ../shared/data] [--out docs/results/llamacpp_baselines]
        [--configs F32 Q8_0 Q4_0 Q4_1 Q4_K_M Q4_K_M-imatrix] [--zero-shot 250] [--zero-shot-configs F32 ...]
        [--imatrix-calib wikitext2:3,ptb:3,demo:2]
        [--work ~/.cache/svdkit/llamacpp]

llama.cpp is vendored in PyPI's ``llama-cpp-python`` source package; the script downloads that package
(``pip download --no-binary``: the registry only), builds ``llama-quantize``, ``llama-imatrix`` and
``libllama`` from it with CMake (CPU, AVX2), converts the dense SmolLM2-135M folder to an F32 GGUF with the
vendored ``convert_hf_to_gguf.py``, quantizes it, and loads each file through the package's own Python
bindings (``llama_cpp``, pointed at the library just built). Everything is kept in --work; a rerun reuses it.
Q4_1 is the protocol model's own format (it ships as a Q4_1 GGUF, which the dense folder dequantizes), so
requantizing to Q4_1 finds the same grid: the row measures how close to lossless that is.
The build targets AVX2 (``GGML_NATIVE=OFF``), the instruction set of most users' CPUs: on this project's
machine (a VM whose CPU reports AVX-512 and AMX) the native build (``-march=native``, which turns ggml's AMX
and AVX-512 kernels on whatever the ``GGML_AMX_*`` options say) died with a general protection fault in
libggml-cpu on every quantized GGUF (F32 ran); the AVX2 build runs them.

Perplexity is computed on exactly the protocol's windows: the same token ids (svdkit's tokenizer; no BOS,
as in torch), fed whole to llama.cpp with every position's logits kept, so the numbers compare with the
ONNX Runtime and torch rows one to one. (llama.cpp's own ``llama-perplexity`` tokenizes the text itself and
scores only the second half of each window; it is not used.) The zero-shot mean goes through the scorecard's
lm-eval path with this runtime as the model; decode tokens/s (batch 1, 64 tokens after a 32-token prompt,
median of 3) is paired with the F32 GGUF in the same runtime. The importance matrix is computed on the
same calibration windows as ONNX Runtime's GPTQ row of ``quant_baselines.py`` (decoded to text, one
chunk per window). Rows already in OUT/results.json are kept (a rerun resumes; `--redo NAMES` measures them
again, `--redo-decode NAMES` only their decode).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from bytes_table import arguments, markdown, ordered, paired_decode, scored_row, stored_rows

import svdkit
from svdkit.bench.cells import protocol_spec
from svdkit.measure.scorecard import ScorecardSettings, domain_tokens
from svdkit.sources.mixture import mixture_windows
from svdkit.sources.models import cache_dir, smollm2_folder

HERE = Path(__file__).resolve().parent
VERSION = "0.3.36"
CONFIGS = ["F32", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "Q4_K_M-imatrix"]
TARGETS = ["llama-quantize", "llama-imatrix", "llama"]


def run(cmd: list[str], log: Path, **kw) -> None:
    """Run `cmd`, its output appended to `log`; its tail and the exit code on failure."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if rc:
        tail = log.read_text().splitlines()[-15:]
        sys.exit("\n".join(tail) + f"\n{cmd[0]} failed (exit {rc}); the whole log is {log}")


def build(work: Path) -> Path:
    """The llama.cpp source tree of llama-cpp-python VERSION, built in work/build; returns the source root."""
    src = work / f"llama_cpp_python-{VERSION}"
    log = work / "build.log"
    if not src.is_dir():
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"llama-cpp-python=={VERSION}",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-d",
                str(work),
            ],
            log,
        )
        with tarfile.open(work / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            tar.extractall(work, filter="data")
    if not (work / "site" / "sentencepiece").is_dir():  # what the bindings and the converter need beyond svdkit's
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(work / "site")]
        run([*pip, "diskcache", "sentencepiece"], log)
    lib = work / "build" / "bin" / "libllama.so"
    if not all((work / "build" / "bin" / t).exists() for t in TARGETS[:2]) or not lib.exists():
        flags = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=ON",
            "-DLLAMA_CURL=OFF",
            "-DGGML_NATIVE=OFF",  # AVX2, no AVX-512 / AMX: see the module's docstring
            *(f"-DGGML_{isa}=ON" for isa in ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2")),
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
        ]
        run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(work / "build"), *flags], log)
        run(["cmake", "--build", str(work / "build"), "-j", str(os.cpu_count()), "--target", *TARGETS], log)
    return src


def gguf_files(src: Path, work: Path, configs: list[str], calib_text: str) -> dict[str, Path]:
    """The F32 GGUF of the dense folder and its quantizations (made once each): config -> file."""
    vendor, bin_ = src / "vendor" / "llama.cpp", work / "build" / "bin"
    log, f32 = work / "convert.log", work / "smollm2-135m-F32.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(vendor / "gguf-py"), str(work / "site")])}
    if not f32.exists():
        convert = [sys.executable, str(vendor / "convert_hf_to_gguf.py"), str(smollm2_folder()), "--outtype", "f32"]
        run([*convert, "--outfile", str(f32)], log, env=env)
    files = {"F32": f32}
    for name in configs:
        if name == "F32":
            continue
        kind, *extra = name.split("-")
        out = work / f"smollm2-135m-{name}.gguf"
        args = []
        if extra:
            matrix = work / "imatrix.gguf"
            if not matrix.exists():
                (work / "calib.txt").write_text(calib_text)
                run(
                    [
                        str(bin_ / "llama-imatrix"),
                        "-m",
                        str(f32),
                        "-f",
                        str(work / "calib.txt"),
                        "-c",
                        "512",
                        "-o",
                        str(matrix),
                        "-t",
                        str(os.cpu_count()),
                    ],
                    log,
                )
            args = ["--imatrix", str(matrix)]
        if not out.exists():
            run([str(bin_ / "llama-quantize"), *args, str(f32), str(out), kind], log)
        files[name] = out
    return files


class LlamaCppLM:
    """A GGUF in llama.cpp (its Python bindings), with the parts of the model interface svdkit measures call:
    logits of whole rows, greedy decode timing, config, device."""

    def __init__(self, path: Path, config, threads: int, parameters: int):
        from llama_cpp import Llama

        self.path = path
        self.llm = Llama(
            str(path),
            n_ctx=2048,
            n_batch=2048,
            n_ubatch=512,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.config = config
        self.device = torch.device("cpu")
        self.training = False
        self.parameter_count = parameters
        self.runtime = "llama.cpp"

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def to(self, device):
        return self

    def logits(self, ids) -> np.ndarray:
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return np.array(self.llm.scores[: len(ids)])

    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.from_numpy(np.stack([self.logits(row) for row in input_ids])))

    def decode(self, prompt: torch.Tensor, new_tokens: int) -> list[int]:
        self.llm.reset()
        self.llm.eval([int(t) for t in prompt])
        out = []
        for _ in range(new_tokens):
            out.append(int(self.llm.scores[self.llm.n_tokens - 1].argmax()))
            self.llm.eval(out[-1:])
        return out

    def timed_runs(self, ids: torch.Tensor, new_tokens: int, prompt: int) -> dict[str, tuple]:
        return {"decode_tok_s": (lambda: self.decode(ids[:prompt], new_tokens), new_tokens)}


def gguf_bytes(path: Path) -> tuple[int, dict[str, int]]:
    """File bytes, and the tensors' bytes by part: embedding (token_embd, which a tied head reads too), head
    (output.weight where stored apart) and layers (every other tensor: the blocks and the final norm)."""
    from gguf import GGUFReader

    parts = {"embedding": 0, "head": 0, "layers": 0}
    for t in GGUFReader(path).tensors:
        part = {"token_embd.weight": "embedding", "output.weight": "head"}.get(t.name, "layers")
        parts[part] += int(t.n_bytes)
    return path.stat().st_size, parts


def measure(name, path, reference, tok, config, tokens, settings, data_dir, threads) -> dict:
    model = LlamaCppLM(path, config, threads, reference.parameter_count)
    return scored_row(name, model, gguf_bytes(path), tok, tokens, settings, ("F32", reference), data_dir)


def calibration_text(spec: str, seqlen: int, tok, model, tokens) -> str:
    """The calibration windows (drawn as the bench and quant_baselines.py's GPTQ draw them) as text, one
    paragraph per window."""
    texts = {"wikitext2": tokens["wikitext2"], "ptb": tokens["ptb"], "demo": tokens["pydoc"]}
    windows = mixture_windows(protocol_spec(spec, 150000), None, seqlen, 150000, 0, tok, model, texts)
    return "\n\n".join(tok.decode(w) for w in windows) + "\n"


def main() -> None:
    p = arguments(__doc__, "llamacpp_baselines", CONFIGS)
    p.add_argument("--imatrix-calib", default="wikitext2:3,ptb:3,demo:2")
    p.add_argument("--work", default=str(cache_dir() / "llamacpp"))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--redo-decode", nargs="*", default=[], help="stored rows whose paired decode is measured again")
    args = p.parse_args()
    os.environ["SVDKIT_DATA"] = args.data_dir
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rows = stored_rows(out, args.redo)
    model, tok = svdkit.load_model("smollm2-135m", dtype="float32")
    tokens = domain_tokens(tok, args.data_dir)
    src = build(work)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(work / "build" / "bin")
    sys.path[:0] = [str(src), str(src / "vendor" / "llama.cpp" / "gguf-py"), str(work / "site")]
    files = gguf_files(src, work, args.configs, calibration_text(args.imatrix_calib, 512, tok, model, tokens))
    no_tasks = ScorecardSettings(tasks=(), generation=False)
    settings = ScorecardSettings(limit=args.zero_shot, generation=False) if args.zero_shot else no_tasks
    scored = set(args.zero_shot_configs if args.zero_shot_configs is not None else ["F32", *args.configs])
    config = SimpleNamespace(**model.config.to_dict())
    reference = LlamaCppLM(files["F32"], config, args.threads, svdkit.count_parameters(model))
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, llama.cpp of llama-cpp-python {VERSION} (AVX2 build), "
        f"{args.threads} threads"
    )

    def save() -> None:
        record = {"command": command, "machine": machine, "rows": ordered(rows, CONFIGS)}
        (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")

    for name in args.redo_decode:  # decode again only (a paired run disturbed by other work on the machine)
        model = LlamaCppLM(files[name], config, args.threads, reference.parameter_count)
        rows[name].update(paired_decode(name, model, ("F32", reference), tokens), decode_command=command)
        print(name, "decode", json.dumps(rows[name]["decode_vs_f32"]), flush=True)
        save()
    for name in ["F32", *args.configs]:
        if name in rows:
            continue
        print(f"{name} ...", flush=True)
        t = time.perf_counter()
        how = settings if name in scored else no_tasks
        rows[name] = measure(name, files[name], reference, tok, config, tokens, how, args.data_dir, args.threads)
        rows[name].update(measure_s=time.perf_counter() - t, command=command)
        print(json.dumps(rows[name]), flush=True)
        save()
    text = markdown(ordered(rows, CONFIGS), rows["F32"]["ppl"], command, machine, ("decode_vs_f32", "vs F32"))
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
