"""Streamed compression (svdkit.pipeline.streaming): a folder compressed layer by layer from its checkpoint
into a sharded output equals the in-memory compression; an interrupted or killed run resumes to the very
same bytes; other settings, a second run and a plan that cannot stream are refused or fall back."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TEXT, assert_error, last_json, run_cli, tiny_config

import svdkit
from svdkit.errors import SvdkitError
from svdkit.pipeline.options import CalibrationSettings, CompressionOptions
from svdkit.pipeline.streaming import NotStreamable, Partial, compress_folder, partial_path
from svdkit.saved.shards import INDEX


def _folder(tmp_path, tokenizer, kind="llama", layers=2, dtype=torch.float32, name="dense"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, num_hidden_layers=layers), dtype=dtype)
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _options(text, **kw) -> CompressionOptions:
    calibration = CalibrationSettings(str(text), 4, 32)
    return CompressionOptions(**{"method": "svd-llm", "ratio": 0.4, "progress": False, **kw}, calibration=calibration)


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("llama", {}),
        ("mistral", {}),  # untied head
        ("gemma3", {}),  # per-layer masks and rotary embeddings
        ("qwen3", {"sequential": True}),
        ("llama", {"method": "svd"}),  # no statistics
        ("llama", {"update": "lstsq", "sequential": True}),  # two streams of hidden states
        ("llama", {"allocation": "v2"}),  # a summary pass, then the factoring pass
        ("qwen3", {"allocation": "v2", "sequential": True, "method": "svd-llm-v2"}),
        ("llama", {"heal": "block", "heal_options": {"block.max_steps": 4}}),  # each layer healed as it is factored
    ],
)
def test_streamed_equals_in_memory(tmp_path, tiny_tokenizer, text_file, kind, kw):
    folder = _folder(tmp_path, tiny_tokenizer, kind)
    model, tok = svdkit.load_model(folder)
    options = _options(text_file, **kw)
    expected = svdkit.compress(model, tok, **_api(options))
    result, skeleton = compress_folder(folder, tmp_path / "out", options)
    assert result.ranks == expected.ranks and result.params == expected.params
    assert all(p.is_meta for p in skeleton.parameters())  # the model never sat in memory
    streamed, _ = svdkit.load(tmp_path / "out")
    want, got = model.state_dict(), streamed.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)  # the same computation, to the bit
    assert result.healing.keys() == expected.healing.keys()
    assert all(result.healing[n].curves == expected.healing[n].curves for n in result.healing)
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard per layer and one outside them
    assert not partial_path(tmp_path / "out").exists()


def _api(options: CompressionOptions) -> dict:
    c = options.calibration
    return dict(
        method=options.method,
        ratio=options.ratio,
        sequential=options.sequential,
        update=options.update,
        allocation=options.allocation,
        heal=options.heal,
        heal_options=options.heal_options,
        calib=c.source,
        calib_samples=c.samples,
        calib_seqlen=c.seqlen,
        progress=False,
    )


def test_bfloat16_streams_in_its_dtype(tmp_path, tiny_tokenizer, text_file):
    folder = _folder(tmp_path, tiny_tokenizer, dtype=torch.bfloat16)
    compress_folder(folder, tmp_path / "out", _options(text_file))  # dtype auto: the checkpoint's bfloat16
    model, _ = svdkit.load(tmp_path / "out", dtype="auto")
    low = model.model.layers[0].self_attn.q_proj
    assert low.A.dtype == torch.bfloat16 and low.B.dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    logits = model(torch.randint(0, 300, (1, 16))).logits
    assert torch.isfinite(logits).all()
    compress_folder(folder, tmp_path / "f32", _options(text_file), dtype="float32")
    model32, _ = svdkit.load(tmp_path / "f32", dtype="auto")
    assert model32.model.layers[0].self_attn.q_proj.A.dtype == torch.float32


@pytest.mark.parametrize("kw", [{"sequential": True}, {"allocation": "v2"}])
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, tiny_tokenizer, text_file, monkeypatch, kw):
    folder = _folder(tmp_path, tiny_tokenizer, layers=4)
    options = _options(text_file, **kw)
    compress_folder(folder, tmp_path / "whole", options)
    caught = _interrupted_after(2, monkeypatch, folder, tmp_path / "out", options)
    assert "--resume" in caught.note
    kept = partial_path(tmp_path / "out")
    assert json.loads((kept / "state.json").read_text()) == {"layers_done": 2, "records": [{}, {}]}
    assert (kept / "summaries.safetensors").is_file() == (kw.get("allocation") == "v2")  # the first pass is kept
    assert not (tmp_path / "out").exists()
    with pytest.raises(SvdkitError, match="--resume to continue"):
        compress_folder(folder, tmp_path / "out", options)
    with pytest.raises(SvdkitError, match="other settings"):
        compress_folder(folder, tmp_path / "out", _options(text_file, **kw, ratio=0.5), resume=True)
    compress_folder(folder, tmp_path / "out", options, resume=True)
    assert _digest(tmp_path / "out") == _digest(tmp_path / "whole")
    assert not kept.exists()


def test_a_resume_notices_any_change_of_the_source_and_names_what_differs(
    tmp_path, tiny_tokenizer, text_file, monkeypatch
):
    folder = _folder(tmp_path, tiny_tokenizer, layers=3)
    _interrupted_after(1, monkeypatch, folder, tmp_path / "out", _options(text_file))
    with pytest.raises(SvdkitError) as e:
        compress_folder(folder, tmp_path / "out", _options(text_file, ratio=0.5), resume=True)
    assert "options.ratio: 0.4 -> 0.5" in str(e.value)
    changes = {
        "config.json": lambda b: b.replace(b'"rms_norm_eps"', b'"rms_norm_eps" '),  # same values, other bytes
        "model.safetensors": lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # one bit of the last weight
    }
    for name, change in changes.items():
        path = folder / name
        original, stat = path.read_bytes(), path.stat()
        path.write_bytes(change(original))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p or rsync -a would leave it
        with pytest.raises(SvdkitError, match=f"checkpoint.{name}: its content changed"):
            compress_folder(folder, tmp_path / "out", _options(text_file), resume=True)
        path.write_bytes(original)
    compress_folder(folder, tmp_path / "out", _options(text_file), resume=True)
    assert (tmp_path / "out" / INDEX).is_file()


def test_overwrite_starts_an_unfinished_run_over(tmp_path, tiny_tokenizer, text_file):
    folder = _folder(tmp_path, tiny_tokenizer)
    kept = partial_path(tmp_path / "out")
    kept.mkdir()
    (kept / "state.json").write_text('{"layers_done": 1}')
    compress_folder(folder, tmp_path / "out", _options(text_file), overwrite=True)
    assert not kept.exists() and (tmp_path / "out" / INDEX).is_file()


def test_a_plan_that_needs_the_whole_model_is_not_streamed(tmp_path, tiny_tokenizer, text_file):
    folder = _folder(tmp_path, tiny_tokenizer)
    options = _options(text_file, allocation="sensitivity", allocation_options={"windows": 1, "seqlen": 16})
    with pytest.raises(NotStreamable, match="allocation 'sensitivity' needs every matrix's statistics"):
        compress_folder(folder, tmp_path / "out", options)
    assert not partial_path(tmp_path / "out").exists()


def test_cli_falls_back_to_the_whole_model_and_refuses_resume(tmp_path, tiny_tokenizer, text_file, capsys):
    folder = _folder(tmp_path, tiny_tokenizer)
    common = ["compress", folder, "--calib", text_file, "--calib-samples", 2, "--calib-seqlen", 32]
    whole = ["--method", "soco", "--option", "steps=2"]
    code, out, err = run_cli(capsys, *common, *whole, "--output", tmp_path / "o", "--json")
    assert code == 0, err
    assert "loading the whole model into memory: method 'soco' trains all layers together" in out
    assert last_json(out)["params"] < last_json(out)["params_dense"]
    args = [*common, *whole, "--output", tmp_path / "p", "--resume"]
    assert_error(*run_cli(capsys, *args)[::2], "--resume continues a compression streamed layer by layer")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "svdkit", "compress", *map(str, args)]


@pytest.mark.parametrize("flags", [["--sequential"], ["--heal", "block"]])
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, tiny_tokenizer, flags):
    """kill -9 while layers are being written (and healed); the same command with --resume gives the same
    sha256s (the record's healing seconds aside)."""
    folder = _folder(tmp_path, tiny_tokenizer, layers=12)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 40)
    common = [folder, "--ratio", 0.4, "--calib", text, "--calib-samples", 16, "--calib-seqlen", 128, *flags]
    subprocess.run(_cli(*common, "--output", tmp_path / "whole"), check=True, capture_output=True)
    out = tmp_path / "out"
    state = partial_path(out) / "state.json"
    proc = subprocess.Popen(_cli(*common, "--output", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (state.is_file() and json.loads(state.read_text() or "{}").get("layers_done", 0) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and 3 <= json.loads(state.read_text())["layers_done"] < 12
    done = subprocess.run(_cli(*common, "--output", out, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _timeless(out) == _timeless(tmp_path / "whole")
    assert not partial_path(out).exists()


def _timeless(folder) -> dict:
    """The folder's sha256s, config.json and healing.json read without the healers' seconds."""
    digests = {k: v for k, v in _digest(folder).items() if k not in ("config.json", "healing.json")}
    config = json.loads((folder / "config.json").read_text())
    for row in config["svdkit"].get("heal", []):
        row.pop("seconds")
    healing = json.loads((folder / "healing.json").read_text()) if (folder / "healing.json").is_file() else {}
    for report in healing.values():
        report.pop("seconds")
    return {**digests, "config": config, "healing": healing}


def test_torchrun_two_gloo_processes_match_one(tmp_path, tiny_tokenizer):
    """torchrun --nproc-per-node 2 (gloo, CPU): each process calibrates half the windows, the statistics are
    all-reduced and the matrices factored in turns; ranks equal, factors equal to one process's up to the
    order of the float64 sums (1e-5 relative to each factor's largest entry, after the cast to float32),
    perplexity equal to 4 significant digits."""
    folder = _folder(tmp_path, tiny_tokenizer, layers=3)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 20)
    common = [folder, "--ratio", 0.4, "--calib", text, "--calib-samples", 6, "--calib-seqlen", 64, "--device", "cpu"]
    subprocess.run(_cli(*common, "--output", tmp_path / "one"), check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [*torchrun, "-m", "svdkit", *_cli(*common, "--output", tmp_path / "two", "--json")[3:]],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count('"output"') == 1  # one process reports
    one, _ = svdkit.load(tmp_path / "one")
    both, tok = svdkit.load(tmp_path / "two")
    assert (
        json.loads((tmp_path / "one" / "config.json").read_text())["svdkit"]["ranks"]
        == json.loads((tmp_path / "two" / "config.json").read_text())["svdkit"]["ranks"]
    )
    a, b = one.state_dict(), both.state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5 * float(a[key].abs().max())), key
    ppl = [svdkit.perplexity(m, tok, str(text), seqlen=64, max_windows=4, progress=False).ppl for m in (one, both)]
    assert f"{ppl[0]:.4g}" == f"{ppl[1]:.4g}"


def test_decompositions_are_shared_by_cost(monkeypatch):
    """Longest first, each to the least loaded process: 1B's three MLP matrices and four attention ones."""
    from svdkit.core import distributed

    monkeypatch.setattr(distributed, "size", lambda: 2)
    costs = [8.6, 0.5, 0.5, 8.6, 34.0, 34.0, 34.0]  # q k v o gate up down
    owners = distributed.assign(costs)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == p) for p in (0, 1)]
    assert max(loads) == 68.0 and owners[4] != owners[5]  # round-robin would give one process 77.1
    monkeypatch.setattr(distributed, "size", lambda: 1)
    assert distributed.assign(costs) == [0] * 7


KILL_RANK = """
import os, signal, sys
from svdkit.pipeline import streaming
real, seen = streaming.ReadLayers.load, [0]
def load(self, index, layer):
    real(self, index, layer)
    seen[0] += 1
    if os.environ.get("RANK") == sys.argv[1] and seen[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
streaming.ReadLayers.load = load
from svdkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("killed", ["1", "0"])
def test_a_torchrun_peer_killed_mid_run_ends_the_survivor_in_one_line_and_it_resumes(tmp_path, tiny_tokenizer, killed):
    folder = _folder(tmp_path, tiny_tokenizer, layers=3)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 20)
    script = tmp_path / "kill_rank.py"
    script.write_text(KILL_RANK)
    out = tmp_path / "two"
    common = [folder, "--ratio", 0.4, "--calib", text, "--calib-samples", 6, "--calib-seqlen", 64, "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    logs = tmp_path / "logs"
    argv = [*torchrun, "--log-dir", logs, "--redirects", "3", script, killed, *_cli(*common, "--output", out)[3:]]
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode != 0
    (survivor,) = [p for p in logs.rglob("stderr.log") if p.parent.name == str(1 - int(killed))]
    err = survivor.read_text()
    lines = [ln for ln in err.splitlines() if ln.startswith("svdkit:") or "Traceback" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(
        (f"svdkit: error: process {1 - int(killed)} of 2: another", "svdkit: interrupted by SIGTERM")
    )
    assert partial_path(out).is_dir() and not out.exists()  # the finished layers are kept for a resume
    resume = [*torchrun, "-m", "svdkit", *_cli(*common, "--output", out, "--resume")[3:]]
    again = subprocess.run(resume, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0 and (out / INDEX).is_file(), again.stderr[-3000:]


def _interrupted_after(layers: int, monkeypatch, folder, out, options) -> KeyboardInterrupt:
    """A streamed run into `out` stopped by Ctrl-C once `layers` layers are marked done (the interrupt)."""
    real = Partial.mark_done

    def interrupt(self, done, records):
        real(self, done, records)
        if done == layers:
            raise KeyboardInterrupt

    monkeypatch.setattr(Partial, "mark_done", interrupt)
    with pytest.raises(KeyboardInterrupt) as caught:
        compress_folder(folder, out, options)
    monkeypatch.setattr(Partial, "mark_done", real)
    return caught.value
