"""`qwerky` command line: thin subcommands over the library.

Every user-facing problem is printed as one line `qwerky: error: ...` with a non-zero exit status;
tracebacks are for bugs (set QWERKY_DEBUG=1 to see them for user errors too).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from qwerky.errors import QwerkyError


def _stages(text: str) -> list[int]:
    try:
        return sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stages expects a comma list like 1,2,3,4 or 0, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def cmd_convert(args: argparse.Namespace) -> int:
    from qwerky.train import ConvertJob, load_recipe, run_conversion

    overrides = [f"student.mixer={args.mixer}"] if args.mixer else []  # first: a new mixer starts from its
    overrides += list(args.set or [])  # default options, which --set student.mixer_options.KEY=... then changes
    if args.attention_layers is not None:
        overrides.append(f"student.attention_layers={','.join(map(str, args.attention_layers))}")
    if args.keep_attention:
        overrides.append(f"student.keep_attention={args.keep_attention}")
    recipe = load_recipe(args.recipe, overrides)
    job = ConvertJob(teacher=Path(args.teacher), out=Path(args.out), recipe=recipe, data=[Path(p) for p in args.data],
                     heldout=[Path(p) for p in args.heldout], stages=args.stages,
                     run_dir=Path(args.run_dir) if args.run_dir else None, resume=args.resume,
                     overwrite=args.overwrite, device=args.device, evaluate=not args.no_eval)
    with _print_notices():
        report = run_conversion(job)
    if report:
        from qwerky.eval.report import render_report_md

        print(render_report_md(report))
        print(f"student written to {job.out}; run directory {job.run_dir}")
    return 0


@contextlib.contextmanager
def _print_notices() -> Iterator[None]:
    """Print the conversion's lines for the user (its `qwerky.notice` log) to stdout as `qwerky: ...`."""
    from qwerky.train.pipeline import NOTICE_LOGGER

    logger = logging.getLogger(NOTICE_LOGGER)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("qwerky: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from qwerky.teacher import load_any_model, load_tokenizer

    model = load_any_model(args.model)
    tok = load_tokenizer(args.model)
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise QwerkyError(f"{args.model} has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]])
    streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
    kwargs = {"do_sample": args.temperature > 0, "max_new_tokens": args.max_new_tokens, "streamer": streamer}
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
        torch.manual_seed(args.seed)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id or tok.eos_token_id,
                       **kwargs)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A converted student as one file for another runtime (GGUF: llama.cpp, ollama, llama-cpp-python)."""
    from qwerky.surgery.gguf_export import export_gguf_folder

    path = export_gguf_folder(args.student, args.out, quant=args.quant)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.quant}, llama.cpp architecture arwkv7)")
    return 0


def cmd_mixers(args: argparse.Namespace) -> int:
    """List the registered student mixers and their options (the registry is the only list)."""
    from qwerky.modeling.mixer_base import get_mixer, mixer_names

    for name in mixer_names():
        cls = get_mixer(name)
        print(f"{name}: {cls.description or cls.__doc__ or ''}".rstrip())
        for opt, kind, default, doc in cls.Options.describe():
            shown = list(default) if isinstance(default, tuple) else default
            print(f"    {opt} ({kind}, default {shown}): {doc}")
    print("\nchoose with --mixer NAME; set an option with --set student.mixer_options.OPTION=VALUE")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qwerky.demo import run_demo

    with _print_notices():  # the conversion's lines for the user, as `qwerky convert` prints them
        return run_demo(out=Path(args.out), overwrite=args.overwrite, sets=args.set or [])


def cmd_plan(args: argparse.Namespace) -> int:
    from qwerky.plan import plan_main

    return plan_main(args)


class _RecipeHelp(argparse.Action):
    """`qwerky convert --help-recipe`: every recipe field (the typed sections in train/recipe.py) and its doc."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help=kwargs.get("help"))  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from qwerky.train.recipe import describe_recipe

        lines = ["recipe fields: YAML sections, or --set SECTION.FIELD=VALUE; a default is the value a recipe that "
                 "omits the field gets (the built-in recipes set their own: src/qwerky/recipes/*.yaml)"]
        section = None
        for name, kind, default, doc in describe_recipe():
            head, _, leaf = name.rpartition(".")
            if head in ("stage2", "stage3", "stage4"):
                continue  # the four stages share one section type: listed once, as stageN
            head = "stageN" if head == "stage1" else head
            if head != section:
                section = head
                lines.append(f"\n{head}:" + (" (stage1, stage2, stage3, stage4)" if head == "stageN" else "")
                             if head else "")
            shown = list(default) if isinstance(default, tuple) else default
            lines.append(f"  {head + '.' if head else ''}{leaf} ({kind}, default {shown!r}): {doc}")
        lines.append("\nmixer options (student.mixer_options.NAME): `qwerky mixers`")
        sys.stdout.write("\n".join(lines) + "\n")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwerky", description="Convert a Hugging Face transformer into an "
                                "attention-free RWKV model by distillation; evaluate and serve it.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="teacher folder + text -> converted student folder and report")
    c.add_argument("--teacher", required=True, help="Hugging Face causal LM folder (with tokenizer), or a .gguf file")
    c.add_argument("--out", required=True, help="output folder for the converted model")
    c.add_argument("--data", nargs="*", default=[], help=".txt/.jsonl/.jsonl.gz/.parquet files or saved datasets")
    c.add_argument("--heldout", nargs="*", default=[], help="held-out text for evaluation (default: a split of --data)")
    c.add_argument("--recipe", default="default",
                   help="built-in recipe name (default, long_context, published) or a YAML path")
    c.add_argument("--stages", type=_stages, default=[1, 2, 3, 4], help="0 = weight transfer only; default 1,2,3,4")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe field, e.g. stage2.tokens=2e5 (--help-recipe lists them)")
    c.add_argument("--help-recipe", action=_RecipeHelp, help="print every recipe field with its type, default and "
                   "meaning, and exit")
    c.add_argument("--mixer", help="student mixer (recipe student.mixer; `qwerky mixers` lists them)")
    c.add_argument("--attention-layers", type=_int_list, help="hybrid: layers keeping teacher attention, e.g. 3,7")
    c.add_argument("--keep-attention", metavar="auto:K",
                   help="hybrid chosen after stage 1: keep K layers as attention, picked greedily by held-out KL "
                        "(student.keep_attention)")
    c.add_argument("--run-dir", help="checkpoints, logs and reports (default: OUT.run)")
    c.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder / run")
    c.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    c.add_argument("--no-eval", action="store_true", help="skip held-out evaluation")
    c.set_defaults(func=cmd_convert)

    g = sub.add_parser("generate", help="stream a completion from a converted (or teacher) model")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="convert the embedded teacher end to end and print the report")
    d.add_argument("--out", default="qwerky-demo", help="output folder (default ./qwerky-demo)")
    d.add_argument("--overwrite", action="store_true", default=True)
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field")
    d.set_defaults(func=cmd_demo)

    ex = sub.add_parser("export", help="write a converted student as a GGUF file (llama.cpp); --mixer arwkv7 students")
    ex.add_argument("student", help="converted student folder")
    ex.add_argument("--format", choices=["gguf"], default="gguf", help="output format (gguf)")
    ex.add_argument("--out", required=True, help="output file, e.g. student-f16.gguf")
    ex.add_argument("--quant", default="f16", help="f32, f16 (default), bf16, q8_0, q5_0, q5_1, q4_0 or q4_1")
    ex.set_defaults(func=cmd_export)

    mx = sub.add_parser("mixers", help="list the student mixers and their options")
    mx.set_defaults(func=cmd_mixers)

    sw = sub.add_parser("sweep", help="convert one teacher with several mixers at one recipe; one comparison table")
    from qwerky.sweep import add_sweep_arguments, sweep_main

    add_sweep_arguments(sw)
    sw.set_defaults(func=sweep_main)

    pl = sub.add_parser("plan", help="estimate per-stage memory and time from a config, without loading weights")
    from qwerky.plan import add_plan_arguments

    add_plan_arguments(pl)
    pl.set_defaults(func=cmd_plan)

    _optional_subcommands(sub)
    return p


def _optional_subcommands(sub: argparse._SubParsersAction) -> None:
    """Subcommands whose modules live in eval/ and serve/."""
    try:
        from qwerky.eval import cli as eval_cli
    except ImportError:
        eval_cli = None
    if eval_cli is not None:
        for name, helptext in (("eval", "held-out quality against the teacher and the window baseline"),
                               ("longctx", "long-context suite: passkey, NIAH, VT, FWE"),
                               ("compare", "ratio table from two lm-eval result files"),
                               ("report", "one HTML page for a conversion run")):
            sp = sub.add_parser(name, help=helptext)
            getattr(eval_cli, f"add_{name}_arguments")(sp)
            sp.set_defaults(func=getattr(eval_cli, f"{name}_main"))
    from qwerky import serve as serve_pkg

    sp = sub.add_parser("serve", help="OpenAI-compatible server with continuous batching")
    try:
        serve_pkg.add_serve_arguments(sp)  # imports FastAPI
    except ImportError as exc:  # every other command must work without the serving extras (e.g. on a GPU box)
        sp.add_argument("args", nargs=argparse.REMAINDER)
        sp.set_defaults(func=_needs_package("serve", exc))
        return
    sp.set_defaults(func=serve_pkg.serve_main)


def _needs_package(command: str, exc: ImportError):  # noqa: ANN202 - an argparse handler
    def handler(_args: argparse.Namespace) -> int:
        raise QwerkyError(f"qwerky {command} needs the Python package {exc.name!r}, which is not installed: "
                          f"pip install {exc.name} (or reinstall qwerky with its dependencies)")

    return handler


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:  # transformers' own notices drown the CLI's output; -v brings them back
        import transformers

        transformers.logging.set_verbosity_error()
    try:
        return int(args.func(args) or 0)
    except QwerkyError as err:
        if os.environ.get("QWERKY_DEBUG"):
            raise
        message = " ".join(str(err).split())
        print(f"qwerky: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qwerky: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
