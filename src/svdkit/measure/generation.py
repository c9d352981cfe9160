"""Generation quality beside perplexity: greedy continuations of fixed prompts, scored for repetition.

A compressed model can keep a fair perplexity and still loop. Prompts of `prompt_len` tokens are taken
at `prompts` evenly spaced offsets of a token stream; each is continued greedily by `new_tokens` tokens
(one batched ``generate`` call, KV cache on). Two scores of the continuations:

- repeated 3-grams: per continuation, the share of its 3-grams that already occurred earlier in it
  (``1 - distinct / total``), averaged over the prompts (0: no loop; near 1: one phrase repeated);
- distinct-2: distinct 2-grams over all 2-grams, pooled over every continuation (Li et al., 2016,
  "A diversity-promoting objective for neural conversation models").

The protocol's setting: 16 prompts of 64 tokens from the validation slice (WikiText-2 test tokens
[40960, 57344)), 64 new tokens, dense beside the compressed model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.device import model_device
from ..errors import SvdkitError

__all__ = ["GenerationResult", "distinct_n", "generation_quality", "repeated_ngrams"]


@dataclass
class GenerationResult:
    repeated_3grams: float
    distinct_2: float
    prompts: int
    new_tokens: int
    continuations: list[list[int]]

    def to_dict(self, tokens: bool = False) -> dict:
        out = asdict(self)
        return out if tokens else {k: v for k, v in out.items() if k != "continuations"}


def _ngrams(seq: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def repeated_ngrams(seq: list[int], n: int = 3) -> float:
    """Share of the n-grams of `seq` that occurred earlier in it (0 when it has none)."""
    grams = _ngrams(seq, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(seqs: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams over all n-grams, pooled over `seqs`."""
    grams = [g for s in seqs for g in _ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def generation_quality(
    model: nn.Module,
    ids: torch.Tensor,
    prompts: int = 16,
    prompt_len: int = 64,
    new_tokens: int = 64,
    device: torch.device | str | None = None,
) -> GenerationResult:
    """Greedy continuations of `prompts` prompts taken at evenly spaced offsets of the 1-D token stream `ids`."""
    if len(ids) < prompt_len * prompts:
        raise SvdkitError(
            f"the generation check takes {prompts} prompts of {prompt_len} tokens, but the text has only {len(ids)}"
        )
    step = (len(ids) - prompt_len) // max(1, prompts - 1)
    batch = torch.stack([ids[i * step : i * step + prompt_len] for i in range(prompts)])
    device = device or model_device(model)
    out = model.generate(
        input_ids=batch.to(device),
        attention_mask=torch.ones_like(batch, device=device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    continuations = out[:, prompt_len:].tolist()
    rep = sum(repeated_ngrams(c, 3) for c in continuations) / len(continuations)
    return GenerationResult(rep, distinct_n(continuations, 2), prompts, new_tokens, continuations)
