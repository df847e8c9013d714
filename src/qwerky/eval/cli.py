"""Subcommands `qwerky eval | longctx | compare | report` (wired into qwerky.cli by its owner).

Each pair `add_X_arguments(parser)` / `X_main(args) -> int` is independent of the main CLI; the library
functions log, these print.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .quality import DEFAULT_POSITION_TOKENS

__all__ = ["add_eval_arguments", "eval_main", "add_longctx_arguments", "longctx_main", "add_compare_arguments",
           "compare_main", "add_report_arguments", "report_main"]


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (the checkpoint's)")
    p.add_argument("--trust-remote-code", action="store_true", help="for HF models that need it")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the window baseline (teacher limited to 64 tokens + 4 sinks, built automatically)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: one per core the machine has free, as `qwerky convert` picks them; "
                        "on a busy CPU fewer threads are faster)")


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_all(args: argparse.Namespace, need_teacher: bool, teacher_tokenizer: bool) -> tuple[Any, Any, Any, Any]:
    """(model, teacher or None, baseline or None, tokenizer); the baseline is converted from the teacher.

    The tokenizer is the teacher's when `teacher_tokenizer` (eval data), else the model's own (long-context
    prompts are sized in the model's tokens), falling back to the other folder when one has none.
    """
    from qwerky.model_paths import check_model_dir, is_gguf

    from .models import load_model, load_tokenizer

    for path, what in ((args.model, "model"), (args.teacher, "teacher")):
        if path and not is_gguf(path):
            check_model_dir(path, what)  # before anything is printed: a wrong path is the one line shown
    device = _device(args.device)
    if device == "cpu":
        import torch

        if getattr(args, "threads", 0) > 0:
            torch.set_num_threads(args.threads)
            threads, why = torch.get_num_threads(), "--threads"
        else:
            from qwerky.threads import choose_threads

            threads, why = choose_threads(0)
        print(f"threads: {threads} ({why.replace('train.threads', '--threads')})", file=sys.stderr)
    model = load_model(args.model, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    teacher = None
    if args.teacher:
        teacher = load_model(args.teacher, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    elif need_teacher:
        raise ValueError("--teacher is required")
    paths = [args.teacher, args.model] if teacher_tokenizer else [args.model, args.teacher]
    paths = [p for p in paths if p]
    tokenizer = None
    for i, path in enumerate(paths):
        try:
            tokenizer = load_tokenizer(path, trust_remote_code=args.trust_remote_code)
            break
        except (OSError, ValueError):
            if i == len(paths) - 1:
                raise
    baseline = None
    if teacher is not None and not args.no_baseline:
        from .models import window_baseline

        baseline = window_baseline(teacher)
    return model, teacher, baseline, tokenizer


def _write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- qwerky eval ---------------------------------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", help="converted (qwerky) folder or any HF causal LM folder")
    p.add_argument("--teacher", required=True, help="teacher HF folder or .gguf file (its tokenizer reads --data)")
    p.add_argument("--data", required=True, nargs="+", help="held-out documents: txt / jsonl(.gz) / parquet / dir")
    p.add_argument("--seq-len", type=int, default=512, help="window length for ppl / KL / agreement")
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--max-windows", type=int, default=64, help="windows spread evenly over the token stream")
    p.add_argument("--position-max", type=int, default=4096,
                   help="loss by position out to this many tokens (0 skips loss by position)")
    p.add_argument("--position-tokens", type=_budget, default=DEFAULT_POSITION_TOKENS,
                   help="loss by position reads documents (longest first) until every position bucket has this "
                        "many tokens, or none is left that adds to one ('all': every document; default "
                        "%(default)s)")
    p.add_argument("--segment", type=int, default=512, help="tokens per forward when carrying the state")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--plot", default=None, help="PNG of loss against position")
    _add_model_options(p)
    return p


def _budget(text: str) -> int | None:
    if text.strip().lower() in ("all", "none", "0"):
        return None
    try:
        value = int(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a token count like 8192 or 'all', got {text!r}") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive token count, got {text!r}")
    return value


def _teacher_context(position: dict[str, Any] | None) -> dict[str, Any] | None:
    """The teacher's effective context from its own loss by position (eval/teacher_context); thin
    buckets give status "not_enough_data" instead of a number."""
    from .teacher_context import describe, effective_from_position

    if not position:
        return None
    result = effective_from_position(position, "teacher")
    if result is None:
        return None
    return result | {"message": describe(result)}


def eval_main(args: argparse.Namespace) -> int:
    from .quality import evaluate_quality, format_position_table, format_quality_table

    try:
        model, teacher, baseline, tokenizer = _load_all(args, need_teacher=True, teacher_tokenizer=True)
        result = evaluate_quality(model, teacher, tokenizer, args.data, seq_len=args.seq_len, max_docs=args.max_docs,
                                  max_windows=args.max_windows, position_max=args.position_max,
                                  segment=args.segment, batch_size=args.batch_size, baseline=baseline,
                                  position_tokens=args.position_tokens)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"qwerky eval: error: {e}", file=sys.stderr)
        return 2
    result |= {"model": str(args.model), "teacher": str(args.teacher), "baseline": None if args.no_baseline else
               "teacher with 64-token window + 4 sinks (convert_teacher(mixer='window'))"}
    result["teacher_context"] = _teacher_context(result["position"])
    _write_json(args.json, result)
    print(format_quality_table(result["quality"]))
    print(f"({result['quality']['windows']} windows x {result['quality']['seq_len']} tokens)\n")
    if result["position"]:
        print(format_position_table(result["position"]))
    if result["teacher_context"]:
        print(f"teacher context: {result['teacher_context']['message']}\n")
    if args.plot and result["position"]:
        from .plots import plot_loss_by_position

        plot_loss_by_position(result["position"], args.plot, train_len=args.seq_len)
        print(f"plot: {args.plot}")
    print(f"json: {args.json}")
    return 0


# -- qwerky longctx ------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(x.strip().lower().replace("k", "000")) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1024,4096, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive lengths, got {text!r}")
    return values


def add_longctx_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .longctx import TASKS

    p.add_argument("model", help="converted (qwerky) folder or any HF causal LM folder")
    p.add_argument("--teacher", default=None,
                   help="teacher HF folder or .gguf file: runs the teacher and the window baseline too")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--lengths", type=_int_list, default=[256, 1024, 4096], help="prompt lengths in model tokens")
    p.add_argument("--depths", type=int, default=11, help="number of evenly spaced needle depths 0..100%%")
    p.add_argument("--samples", type=int, default=10, help="samples per length and depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap the task's generation length")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together by recurrent models")
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--plot-dir", default=None, help="write one depth x length heatmap PNG per model here")
    _add_model_options(p)
    return p


def longctx_main(args: argparse.Namespace) -> int:
    from .longctx import spaced_depths
    from .longctx.runner import format_table, plot_heatmaps, run_longctx

    try:
        model, teacher, baseline, tokenizer = _load_all(args, need_teacher=False, teacher_tokenizer=False)
        models = {"teacher": teacher, "student": model, "baseline": baseline}
        if teacher is None:
            print("no --teacher: teacher and window baseline are not run", file=sys.stderr)
        result = run_longctx(models, tokenizer, args.task, args.lengths, spaced_depths(args.depths), args.samples,
                             seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             progress=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"qwerky longctx: error: {e}", file=sys.stderr)
        return 2
    result |= {"model": str(args.model), "teacher": args.teacher}
    _write_json(args.json, result)
    print(format_table(result))
    if args.plot_dir:
        for path in plot_heatmaps(result, args.plot_dir):
            print(f"heatmap: {path}")
    print(f"json: {args.json}")
    return 0


# -- qwerky compare ------------------------------------------------------------------------------------
def add_compare_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("teacher_results", help="lm-eval results JSON of the teacher")
    p.add_argument("student_results", help="lm-eval results JSON of the student")
    p.add_argument("--md", default=None, help="also write the markdown table here")
    p.add_argument("--metrics", default=None, help="comma-separated metrics to keep (default: all)")
    return p


def compare_main(args: argparse.Namespace) -> int:
    from .compare import compare_results, format_markdown, load_results

    try:
        teacher, student = load_results(args.teacher_results), load_results(args.student_results)
    except (ValueError, OSError) as e:
        print(f"qwerky compare: error: {e}", file=sys.stderr)
        return 2
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    rows = compare_results(teacher, student, metrics)
    if not rows:
        print("qwerky compare: error: the two files share no task/metric", file=sys.stderr)
        return 2
    table = format_markdown(rows)
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")
    return 0


# -- qwerky report -------------------------------------------------------------------------------------
def add_report_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("run_dir", help="a conversion run directory (log.jsonl, report.json, longctx/)")
    p.add_argument("--out", default=None, help="HTML file (default RUN_DIR/report.html)")
    return p


def report_main(args: argparse.Namespace) -> int:
    from .report import build_report

    try:
        path = build_report(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"qwerky report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m qwerky.eval.cli eval ...`) until qwerky.cli wires these in."""
    parser = argparse.ArgumentParser(prog="python -m qwerky.eval.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    table = {"eval": (add_eval_arguments, eval_main), "longctx": (add_longctx_arguments, longctx_main),
             "compare": (add_compare_arguments, compare_main), "report": (add_report_arguments, report_main)}
    for name, (add, _) in table.items():
        add(sub.add_parser(name))
    args = parser.parse_args(argv)
    return table[args.command][1](args)


if __name__ == "__main__":
    raise SystemExit(main())
