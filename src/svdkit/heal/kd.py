"""Distillation (``--heal kd``): every factor of the compressed model trains together against the dense model's
next-token distribution on the calibration windows,

    min over all factors   E_tokens KL( p_dense(. | context) || p_compressed(. | context) ),

the teacher's logits computed on the fly (the dense linears swapped back in for a no-grad forward; caching them
would take windows x tokens x vocabulary floats, 6.4 GB for the protocol's calibration set on SmolLM2). The KL is
computed a chunk of positions at a time (:func:`chunked_kl`), so a 128k-262k vocabulary (Llama 3, Gemma 3) never
holds a whole window's logits: the gradient reaches the final hidden states chunk by chunk, then flows through the
model once. SVD-LLM's published version fine-tunes its factors after truncation the same way in spirit (LoRA on U,
then V; arXiv 2403.07378); here the factors themselves train. Adam, the learning rate falling linearly to 0 (after
an optional linear warm-up), gradients clipped; the held-out guard (:mod:`.guard`) measures the same KL on held-out
windows and keeps the best step, so the result is never further from the dense model there than the model it
started from.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..core.options import Options, integer, number, option
from ..core.report import Report, held_out_line
from ..errors import SvdkitError
from .base import HealContext, register
from .guard import Guard, cut_windows, split_windows, steps_for
from .logfile import open_log

__all__ = ["KDConfig", "chunked_kl", "distill", "head_of", "lr_schedule"]


@dataclass
class KDConfig(Options):
    epochs: float = option(1.0, "passes over the training windows", number(0, lo_open=True))
    max_steps: int = option(200, "at most this many steps", integer(1))
    lr: float = option(1e-4, "Adam learning rate of the factors (falls linearly to 0)", number(0, lo_open=True))
    warmup: float = option(
        0.0, "share of the steps over which the learning rate rises linearly to `lr`", number(0, 1, hi_open=True)
    )
    batch: int = option(1, "windows per step", integer(1))
    seqlen: int = option(512, "tokens per training window (calibration windows are cut to this length)", integer(2))
    held_out: float = option(
        0.125, "share of the calibration windows held out (at least one)", number(0, 1, lo_open=True, hi_open=True)
    )
    eval_windows: int = option(8, "held-out windows of `seqlen` measured each time (at most)", integer(1))
    every: int = option(16, "steps between held-out measurements", integer(1))
    patience: int = option(3, "stop after this many held-out measurements without improvement", integer(1))
    clip: float = option(1.0, "gradient norm clip", number(0, lo_open=True))
    seed: int = option(0, "order of the training windows", integer())
    chunk_mb: int = option(
        256, "megabytes of logits computed at once (positions per chunk: this / (vocabulary x 4 bytes))", integer(1)
    )
    log: str | None = option(None, "a file that receives one JSON line per step and per held-out measurement")


def _factors(model) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if hasattr(m, "rank") and hasattr(m, "A") for p in (m.A, m.B)]


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    vocab = student.shape[-1]
    s = F.log_softmax(student.float(), dim=-1).reshape(-1, vocab)
    t = F.log_softmax(teacher.float(), dim=-1).reshape(-1, vocab)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def head_of(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Final hidden states -> the model's logits: its output embeddings, then the tanh soft-capping of the logits
    where the config sets ``final_logit_softcapping`` (Gemma 2), as the model's own forward does."""
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is None:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap


def chunked_kl(
    student: torch.Tensor, teacher: torch.Tensor, head: Callable, rows: int, backward: bool = False
) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) from final hidden states (... x d), the logits computed
    `rows` positions at a time. With `backward`, each chunk's gradient reaches the student's hidden states at
    once and the model's graph is walked once at the end, so at most one chunk's logits exist at any time; the
    loss returned is then detached."""
    s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    n = len(s)
    leaf = s.detach().requires_grad_(True) if backward else s
    total = torch.zeros((), device=s.device)
    for i in range(0, n, rows):
        with torch.no_grad():
            target = head(t[i : i + rows])
        part = _kl(head(leaf[i : i + rows]), target)
        part = part if rows >= n else part * (len(target) / n)
        if backward:
            part.backward()
            part = part.detach()
        total = total + part
    if backward:
        s.backward(leaf.grad)
    return total


def _held(ratio: float) -> float:
    """The dense modules the factors replaced (at most the model), then the factors' gradients and Adam's two
    moments (3 x the factors, at most 1 - ratio of the model each)."""
    return 1 + 3 * (1 - ratio)


@register(
    "kd", KDConfig, "distil the dense model's next-token distribution into all factors", "SVD-LLM (2024)", held=_held
)
def distill(context: HealContext, config: KDConfig) -> Report:
    """Train every factor on KL(dense || compressed); the report: steps, held-out KL at the start and the best
    step, its curve, time."""
    model, device = context.model, context.device
    train_w, held_w = split_windows(context.windows, config.held_out, "distillation")
    train, held = cut_windows(train_w, config.seqlen), cut_windows(held_w, config.seqlen)[: config.eval_windows]
    if len(train) < config.batch:
        raise SvdkitError(f"distillation needs at least batch={config.batch} training windows, got {len(train)}")
    params = _factors(model)
    steps = steps_for(config.epochs, len(train), config.batch, config.max_steps)
    home = next(model.parameters()).device
    frozen = {p: p.requires_grad for p in model.parameters()}
    log = open_log(config.log, "distillation")
    t0 = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.to(device)
        context.dense.to(device)
        report = _Loop(context, config, params, train, held, steps, log).run(t0)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.to(home)
        context.dense.to(home)
        if log is not None:
            log.close()
    seconds, run = round(time.perf_counter() - t0, 2), report["steps_run"]
    start, best = report["held_out_start"], report["held_out_best"]
    facts = {k: report[k] for k in ("best_step", "stopped_early")}
    return Report(
        seconds,
        run,
        f"{run} of {steps} steps" + held_out_line(start, best),
        start,
        best,
        {"held_out_curve": report["held_out_curve"]},
        {"steps_planned": steps, "train_windows": len(train), "objective": "kl", **facts},
    )


def lr_schedule(steps: int, warmup: int) -> Callable[[int], float]:
    """The learning rate's factor at step s (0-based): rising linearly over `warmup` steps, then falling linearly
    to 0 at `steps` (a warm-up of every step is cut to steps - 1, so the fall is never 0 / 0)."""
    warmup = min(warmup, steps - 1)
    return lambda s: (s + 1) / (warmup + 1) if s < warmup else (steps - s) / (steps - warmup)


class _Loop:
    def __init__(self, context: HealContext, config: KDConfig, params, train, held, steps: int, log) -> None:
        self.context, self.config, self.params, self.train, self.held = context, config, params, train, held
        self.steps, self.log = steps, log
        self.head = head_of(context.model)
        vocab = context.model.get_output_embeddings().weight.shape[0]
        self.rows = max(1, config.chunk_mb * 2**20 // (4 * vocab))
        self.opt = torch.optim.Adam(params, lr=config.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_schedule(steps, round(config.warmup * steps)))
        g = torch.Generator().manual_seed(config.seed)
        passes = -(-steps * config.batch // len(train))
        self.order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(passes)])

    def held_out(self) -> float:
        """Mean KL divergence of the compressed model's next-token distributions from the dense model's on the
        held-out windows (the objective, measured where it does not train)."""
        with torch.no_grad():
            losses = [float(self.kl(ids[None].to(self.context.device))) for ids in self.held]
        return sum(losses) / len(losses)

    def kl(self, ids: torch.Tensor, backward: bool = False) -> torch.Tensor:
        """KL(dense || compressed) on `ids`; with `backward`, its gradient accumulated in the factors."""
        body = self.context.model.base_model
        with torch.no_grad(), self.context.dense.swapped(self.context.model):
            teacher = body(input_ids=ids, use_cache=False).last_hidden_state
        return chunked_kl(
            body(input_ids=ids, use_cache=False).last_hidden_state, teacher, self.head, self.rows, backward
        )

    def run(self, t0: float) -> dict[str, Any]:
        model, config, device = self.context.model, self.config, self.context.device
        model.eval()  # no dropout; the factors still get gradients
        with torch.enable_grad():
            guard = Guard(self.params, self.held_out, config.every, config.patience)
            bar = tqdm(range(1, self.steps + 1), desc="distilling", unit="step", disable=not self.context.progress)
            step = 0
            for step in bar:
                ids = self.train[self.order[(step - 1) * config.batch : step * config.batch]].to(device)
                loss = self.step(ids, step)
                self._write(
                    {
                        "step": step,
                        "loss": loss,
                        "lr": self.sched.get_last_lr()[0],
                        "seconds": round(time.perf_counter() - t0, 3),
                    }
                )
                bar.set_postfix(kl=f"{loss:.4f}", held_out=f"{guard.best:.4f}")
                if guard.check(step, last=step == self.steps):
                    break
            bar.close()
            report = guard.finish(step)
        self._write({"held_out_curve": report["held_out_curve"]})
        return report

    def step(self, ids: torch.Tensor, step: int) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.kl(ids, backward=True)
        if not math.isfinite(float(loss)):
            raise SvdkitError(
                f"distillation diverged at step {step}: the loss is {float(loss)}; lower the learning rate "
                f"(now {self.config.lr}, heal option kd.lr)"
            )
        torch.nn.utils.clip_grad_norm_(self.params, self.config.clip)
        self.opt.step()
        self.sched.step()
        return float(loss)

    def _write(self, row: dict) -> None:
        if self.log is not None:
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
