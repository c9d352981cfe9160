"""The markdown report of a benchmark run (:mod:`.grid`): settings, quality and time, speed and memory."""

from __future__ import annotations

__all__ = ["markdown", "cell_label", "alloc_label"]


def cell_label(cell: dict) -> str:
    """method[+lstsq][+seq][+heal:NAMES[:OPTIONS]] of a result cell."""
    update = cell.get("update", "none")
    extra = ("" if update == "none" else f"+{update}") + ("+seq" if cell.get("sequential") else "")
    heal = cell.get("heal", "none")
    options = ",".join(f"{k}={v}" for k, v in (cell.get("heal_options") or {}).items())
    return cell["method"] + extra + (f"+heal:{heal}" if heal != "none" else "") + (f":{options}" if options else "")


def alloc_label(cell: dict) -> str:
    opts = cell.get("allocation_options") or {}
    extra = ", ".join(f"{k}={v}" for k, v in opts.items())
    return cell["allocation"] + (f" ({extra})" if extra else "")


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return ""
    return f"{x:.{digits}f}" if x < 1e4 else f"{x:.3g}"


def _domains(c: dict) -> str:
    """The third domain's perplexity and the generation scores (blank where a cell predates them)."""
    return f"{_fmt(c.get('pydoc'))} | {_fmt(c.get('repeated_3grams'), 3)} | {_fmt(c.get('distinct_2'), 3)}"


def _ranks_line(multiple: int) -> str:
    if multiple == 1:
        return "the allocation's exact ranks"
    return f"rounded to multiples of {multiple} within the allocation's parameter budget"


def _perplexity_texts(report: dict) -> str:
    if not report.get("perplexity", True):
        return "no perplexity (`--no-perplexity`)"
    return (
        f"WikiText-2 test, first {report['eval_windows']} windows of {report['seqlen']}; PTB validation, first "
        f"{report['ptb_windows']} windows; Python docs (`pydoc_data.topics`), last 8 windows"
    )


def _calibration_text(calib: dict) -> str:
    """What the calibration windows were: the protocol's text, or the spec (and the healing cells' own)."""
    source = calib.get("source", "wikitext2")
    if source == "wikitext2":
        text = f"{calib['samples']} x {calib['seqlen']} WikiText-2 test tokens at seeded offsets from {calib['offset']}"
    else:
        text = f"`--calib {source}`: {calib['samples']} windows of {calib['seqlen']} tokens, named texts in the "
        text += "protocol's calibration ranges"
    heal = calib.get("heal_calib")
    return text + (f"; healing cells on `--heal-calib {heal}`" if heal else "")


def _settings(report: dict) -> list[str]:
    calib = report["calibration"]
    return [
        f"# Protocol results: {report['model']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}",
        f"- date: {report['date']}; svdkit {report['svdkit']}, torch {report['torch']}",
        f"- calibration: {_calibration_text(calib)} (seed {calib['seed']}); one pass shared by every cell: "
        f"{calib.get('seconds', 0):.1f} s",
        f"- evaluation: {_perplexity_texts(report)}; generation: greedy continuations of 64 tokens from 16 "
        "prompts of 64 in the validation slice (WikiText-2 test tokens [40960, 57344)), the share of repeated "
        "3-grams per continuation and pooled distinct-2",
        f"- ranks: {_ranks_line(report.get('rank_multiple', 1))}",
    ]


def _quality_table(report: dict) -> list[str]:
    dense = report["dense"]
    lines = [
        "## Quality and compression time",
        "",
        "| method | allocation | ratio | WikiText-2 ppl | PTB ppl | Python docs ppl | rep. 3-grams | distinct-2 "
        "| parameters | statistics s | allocation s "
        "| decomposition s | training s | healing s | total s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | | 0 | {_fmt(dense.get('wikitext2'))} | {_fmt(dense.get('ptb'))} | {_domains(dense)} "
        f"| {dense['params']:,} | | | | | | | |",
    ]
    for c in report["cells"]:
        training, healing = c.get("training_s", 0.0), c.get("healing_s", 0.0)
        total = c["statistics_s"] + c["allocation_s"] + c["decomposition_s"] + training + healing
        rss = c.get("compress_peak_rss_mb")
        lines.append(
            f"| {cell_label(c)} | {alloc_label(c)} | {c['ratio']} | {_fmt(c.get('wikitext2'))} | "
            f"{_fmt(c.get('ptb'))} | {_domains(c)} | {c['params']:,} | {c['statistics_s']:.0f} | "
            f"{c['allocation_s']:.0f} | {c['decomposition_s']:.1f} | "
            f"{training:.0f} | {healing:.0f} | {total:.0f} | {_fmt(rss, 0)} |"
        )
    return lines


def _scorecard_table(report: dict) -> list[str]:
    """Every cell's scorecard beside dense: the three domains, generality, the zero-shot accuracies and
    their mean (with its difference from dense), the generation scores; [] when no cell has zero-shot scores."""
    dense = report["dense"]
    if "zero_shot" not in dense:
        return []
    tasks = list(dense["zero_shot"]["tasks"])
    metrics = [f"{t} {dense['zero_shot']['tasks'][t]['metric']}" for t in tasks]
    limit = report.get("zero_shot_limit")
    lines = [
        "## Scorecard",
        "",
        f"Zero-shot: lm-eval's tasks on the first {limit} documents of each (accuracy in %; the mean's standard "
        f"error {100 * dense['zero_shot']['mean_stderr']:.2f} points for dense). Generality: the geometric mean "
        "over WikiText-2, PTB and Python docs of ppl / dense ppl.",
        "",
        "| method | ratio | WikiText-2 | PTB | Python docs | generality | "
        + " | ".join(metrics)
        + " | mean | vs dense | rep. 3-grams | distinct-2 |",
        "|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|",
    ]
    for label, ratio, c in [("dense", 0, dense), *((cell_label(c), c["ratio"], c) for c in report["cells"])]:
        zs = c.get("zero_shot")
        if zs is None:
            continue
        accs = " | ".join(_fmt(100 * zs["tasks"][t]["value"], 1) if t in zs["tasks"] else "" for t in tasks)
        drop = 100 * (zs["mean"] - dense["zero_shot"]["mean"])
        lines.append(
            f"| {label} | {ratio} | {_fmt(c.get('wikitext2'))} | {_fmt(c.get('ptb'))} | {_fmt(c.get('pydoc'))} | "
            f"{_fmt(c.get('generality', 1.0 if c is dense else None), 3)} | {accs} | {_fmt(100 * zs['mean'], 1)} | "
            f"{drop:+.1f} | {_fmt(c.get('repeated_3grams'), 3)} | {_fmt(c.get('distinct_2'), 3)} |"
        )
    return lines


def markdown(report: dict) -> str:
    """The results as markdown: settings, a quality-and-time table, the scorecard (with zero-shot scores),
    a speed-and-memory table."""
    dense = report["dense"]
    calib = report["calibration"]
    lines = [*_settings(report), "", *_quality_table(report)]
    scorecard = _scorecard_table(report)
    lines += ["", *scorecard] if scorecard else []
    lines += ["", "## Speed and memory (dense measured in the same run)", ""]
    lines += [
        "| method | allocation | ratio | prefill tok/s | vs dense | forward tok/s | vs dense | decode tok/s | vs dense "
        "| weights MB | prefill peak MB | file MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def speed_row(label: str, alloc: str, ratio, c: dict) -> str:
        def vs(key: str) -> str:
            ref = c.get("reference", dense)  # the dense model timed alongside the cell, if it was
            if c.get(key) is None or not ref.get(key):
                return ""
            return f"{c[key] / ref[key]:.2f}x"

        return (
            f"| {label} | {alloc} | {ratio} | {_fmt(c.get('prefill_tok_s'), 0)} | {vs('prefill_tok_s')} | "
            f"{_fmt(c.get('forward_tok_s'), 0)} | {vs('forward_tok_s')} | "
            f"{_fmt(c.get('decode_tok_s'), 1)} | {vs('decode_tok_s')} | {_fmt(c.get('weights_mb'), 0)} | "
            f"{_fmt(c.get('prefill_peak_mb'), 0)} | {_fmt(c.get('file_mb'), 0)} |"
        )

    lines.append(speed_row("dense", "", 0, dense))
    for c in report["cells"]:
        lines.append(speed_row(cell_label(c), alloc_label(c), c["ratio"], c))
    passes = ", ".join(f"{k} {v:.0f} s" for k, v in calib.get("passes", {}).items())
    lines += [
        "",
        f"Statistics passes (shared by all cells): {passes or 'none'}. 'statistics s' is the time of the passes "
        "a cell's method needs ('inputs' collects every input statistic at once, so it is an upper bound for a "
        "method that needs only mean |x|); 'total s' adds allocation, decomposition and training (soco). "
        "'peak RSS MB' is the process's peak resident memory while the cell compressed (it includes the "
        "harness's dense model and shared statistics). Prefill: a generation prefill of "
        f"{report['seqlen']} tokens (KV cache filled, logits of the last position only, as generate() runs it); "
        "forward: one forward of the same window with every position's logits (as perplexity runs it); decode: "
        "batch-1 greedy generation with the KV cache; all medians of 3. 'vs dense' divides by the dense "
        "model timed in alternation with the cell (same minutes, so the drift of a shared machine cancels); "
        "the dense row is the first measurement. 'prefill peak MB' is the memory one prefill adds above what "
        "is resident (on CPU: pages the process had to take from the system; memory its allocator reuses "
        "does not show, so 0 means the prefill fit in memory already held).",
        "",
        f"Peak resident memory of the whole run: {report.get('peak_rss_mb', 0):.0f} MB.",
        "",
    ]
    return "\n".join(lines)
