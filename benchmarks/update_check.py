"""Quick check of the least-squares update with and without sequential calibration on SmolLM2-135M.

    python benchmarks/update_check.py [path/to/wiki.test.raw]

svd-llm at 0.2, 8 x 1024 calibration tokens from offset 150000, perplexity on the first 4 x 1024
WikiText-2 test tokens; prints one line per (sequential, update) pair.
"""

import copy
import sys

import svdkit
from svdkit.sources.text import load_text, tokenize


def main() -> None:
    model, tok = svdkit.load_model("smollm2-135m")
    path = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/wikitext-2-raw/wiki.test.raw"
    wiki = tokenize(tok, load_text(path))
    ev = wiki[: 4 * 1024]

    def ppl(m):
        return svdkit.perplexity(m, None, ev, seqlen=1024, progress=False).ppl

    print("dense", ppl(model), flush=True)
    for seq, upd in [(False, "none"), (True, "none"), (False, "lstsq"), (True, "lstsq")]:
        w = copy.deepcopy(model)
        svdkit.compress(
            w,
            tok,
            method="svd-llm",
            ratio=0.2,
            calib=wiki,
            calib_samples=8,
            calib_seqlen=1024,
            calib_offset=150000,
            device="cpu",
            progress=False,
            sequential=seq,
            update=upd,
            rank_multiple=1,  # exact ranks, as in the published check
        )
        print(seq, upd, ppl(w), flush=True)


if __name__ == "__main__":
    main()
