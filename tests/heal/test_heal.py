"""Healing (svdkit.heal): block-wise output matching and distillation lower what they optimise, keep every
rank, save and reload exactly, and the held-out guard never returns a model worse than its start."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model
from torch.nn import functional as F

import svdkit
from svdkit.errors import SvdkitError
from svdkit.heal import parse_heal, split_windows, steps_for
from svdkit.heal.guard import cut_windows
from svdkit.heal.kd import chunked_kl, head_of, lr_schedule

SAMPLES, SEQLEN = 8, 64


def _calib() -> torch.Tensor:
    return random_tokens(SAMPLES * SEQLEN, seed=1)


def _compress(heal: str = "none", **heal_options):
    model = tiny_model()
    result = svdkit.compress(
        model,
        method="svd-llm",
        ratio=0.4,
        calib=_calib(),
        calib_samples=SAMPLES,
        calib_seqlen=SEQLEN,
        device="cpu",
        progress=False,
        heal=heal,
        heal_options=heal_options or None,
    )
    return model, result


def _windows() -> torch.Tensor:
    return svdkit.sources.text.calibration_windows(_calib(), SAMPLES, SEQLEN, 0, 0)


def _layer0_error(model, dense, windows) -> float:
    """Relative error of decoder layer 0's output against the dense layer's, on the same embeddings."""
    errors = []
    with torch.no_grad():
        for ids in windows:
            x = dense.model.embed_tokens(ids[None])
            pos = torch.arange(ids.shape[0])[None]
            rotary = dense.model.rotary_emb(x, pos)
            y = dense.model.layers[0](x, position_embeddings=rotary, attention_mask=None)
            z = model.model.layers[0](x, position_embeddings=rotary, attention_mask=None)
            y, z = (t[0] if isinstance(t, tuple) else t for t in (y, z))
            errors.append(float((z - y).pow(2).mean() / y.pow(2).mean()))
    return sum(errors) / len(errors)


def _kl(model, dense, windows) -> float:
    with torch.no_grad():
        t = F.log_softmax(dense(input_ids=windows).logits, -1).flatten(0, 1)
        s = F.log_softmax(model(input_ids=windows).logits, -1).flatten(0, 1)
    return float(F.kl_div(s, t, log_target=True, reduction="batchmean"))


def test_block_healing_lowers_the_block_output_error_it_optimises():
    dense = tiny_model()
    plain, _ = _compress()
    healed, result = _compress("block", **{"block.epochs": 8})
    windows = _windows()
    before, after = _layer0_error(plain, dense, windows), _layer0_error(healed, dense, windows)
    assert after < 0.9 * before
    report = result.healing["block"]
    rows = report.curves["layers"]
    assert len(rows) == 2 and all(r["held_out_best"] <= r["held_out_start"] for r in rows)
    assert any(r["best_step"] > 0 for r in rows) and report.steps == sum(r["steps_run"] for r in rows)
    assert report.held_out_best == pytest.approx(sum(r["held_out_best"] for r in rows) / 2)
    assert report.summary.startswith(f"2 layers, {report.steps} steps, held-out loss")


def test_distillation_lowers_the_kl_on_its_windows():
    dense = tiny_model()
    plain, _ = _compress()
    healed, result = _compress(
        "kd", **{"kd.lr": 2e-4, "kd.seqlen": SEQLEN, "kd.every": 4, "kd.epochs": 16, "kd.patience": 99}
    )
    train, _ = split_windows(_windows(), 0.125, "test")
    assert _kl(healed, dense, train) < 0.9 * _kl(plain, dense, train)
    report = result.healing["kd"]
    assert report.held_out_best < report.held_out_start and report.facts["best_step"] > 0
    assert report.curves["held_out_curve"][0] == {"step": 0, "held_out": report.held_out_start}


def test_healing_keeps_every_rank_and_is_recorded():
    _, plain = _compress()
    model, healed = _compress("block,kd", **{"kd.seqlen": SEQLEN})
    assert healed.ranks == plain.ranks and healed.params == plain.params
    record = model.config.svdkit["heal"]
    assert [h["name"] for h in record] == ["block", "kd"]
    assert record[1]["config"]["seqlen"] == SEQLEN and "held_out_curve" not in record[1]
    assert record[0]["summary"] == healed.healing["block"].summary and "layers" not in record[0]
    assert set(healed.timings) >= {"healing"} and healed.timings["healing"] > 0


def test_a_saved_healed_model_reloads_with_identical_logits(tmp_path, tiny_tokenizer):
    model, _ = _compress("block,kd", **{"kd.seqlen": SEQLEN, "kd.lr": 1e-3})
    svdkit.save(model, tiny_tokenizer, tmp_path / "healed")
    loaded, _ = svdkit.load(tmp_path / "healed")
    ids = _windows()[:2]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert [h["name"] for h in svdkit.saved.contents.folder_info(tmp_path / "healed")["heal"]] == ["block", "kd"]


@pytest.mark.parametrize("heal", ["block", "kd"])
def test_the_guard_rejects_an_overfitted_run(heal):
    """A learning rate far too large makes every step worse on held-out windows: the guard keeps the start, so
    the healed model equals the closed-form one exactly."""
    plain, _ = _compress()
    options = {f"{heal}.lr": 0.5, f"{heal}.every": 1, f"{heal}.patience": 2}
    if heal == "kd":
        options["kd.seqlen"] = SEQLEN
    healed, result = _compress(heal, **options)
    report = result.healing[heal]
    rows = report.curves.get("layers") or [report.facts]
    assert all(r["best_step"] == 0 for r in rows) and report.held_out_best == report.held_out_start
    for (name, a), (_, b) in zip(plain.named_parameters(), healed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_divergence_stops_with_a_clear_error():
    with pytest.raises(SvdkitError, match="distillation diverged at step .*lower the learning rate"):
        _compress("kd", **{"kd.lr": 1e30, "kd.seqlen": SEQLEN, "kd.clip": 1e30, "kd.every": 100})


def test_heal_names_and_options_are_checked():
    assert [h.name for h, _ in parse_heal("block,kd", {"kd.lr": 1e-4})] == ["block", "kd"]
    assert parse_heal("none", None) == [] and parse_heal(None, None) == []
    for heal, options, message in [
        ("blocks", None, "unknown healing 'blocks'; known healings: block, kd"),
        ("kd,kd", None, "names a healing twice"),
        ("block", {"kd.lr": 1e-4}, "is for healing 'kd', which this run does not do"),
        ("kd", {"lr": 1e-4}, "heal_options keys are NAME.KEY"),
        ("kd", {"kd.rate": 1e-4}, "healing 'kd' has no option rate"),
        ("kd", {"kd.lr": -1}, "healing 'kd'"),
    ]:
        with pytest.raises(SvdkitError, match=message.replace("(", r"\(")):
            parse_heal(heal, options)
    with pytest.raises(SvdkitError, match="at least 2"):
        svdkit.compress(tiny_model(), calib=_calib(), calib_samples=1, calib_seqlen=SEQLEN, heal="kd", progress=False)


def test_windows_split_and_steps():
    w = torch.arange(40).reshape(8, 5)
    train, held = split_windows(w, 0.125, "x")
    assert train.shape == (7, 5) and torch.equal(held, w[7:])
    assert len(split_windows(w, 0.3, "x")[1]) == 3
    with pytest.raises(SvdkitError, match="needs at least one more"):
        split_windows(w[:1], 0.125, "x")
    assert steps_for(2.0, 7, 1, 64) == 14 and steps_for(2.0, 70, 1, 64) == 64 and steps_for(0.01, 3, 2, 9) == 1
    assert cut_windows(w, 2).shape == (16, 2)


def test_the_distillation_schedule_warms_up_then_falls_to_zero():
    plain, warm = lr_schedule(10, 0), lr_schedule(10, 3)
    assert [plain(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert [warm(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0] and warm(10) == 0.0
    assert lr_schedule(10, 10)(10) == 0.0  # KDConfig(warmup=0.99) on 10 steps rounds to 10 warm-up steps


@pytest.mark.parametrize("kind, cap", [("llama", None), ("gemma3", 2.0)])
def test_the_distillation_head_gives_the_models_own_logits(kind, cap):
    model = tiny_model(kind).eval()
    if cap is not None:
        model.config.final_logit_softcapping = cap  # tanh-capped logits (Gemma 2 and 3)
    ids = random_tokens(24, seed=3)[None]
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits
    assert torch.equal(head_of(model)(hidden), logits)
    assert cap is None or float(logits.abs().max()) <= cap


def test_the_kl_in_chunks_of_positions_equals_the_whole_one_with_its_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    student, teacher = torch.randn(2, 7, 8, requires_grad=True), torch.randn(2, 7, 8)
    whole = _kl_logits(head(student), head(teacher))
    whole.backward()
    expected, student.grad = student.grad.clone(), None
    for rows in (1, 3, 14, 100):
        loss = chunked_kl(student, teacher, head, rows, backward=True)
        assert torch.allclose(loss, whole.detach(), atol=1e-6) and not loss.requires_grad
        assert torch.allclose(student.grad, expected, atol=1e-6)
        student.grad = None
        assert torch.allclose(chunked_kl(student, teacher, head, rows), whole, atol=1e-6)


def _kl_logits(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = (F.log_softmax(x, -1).flatten(0, 1) for x in (student, teacher))
    return F.kl_div(s, t, log_target=True, reduction="batchmean")
