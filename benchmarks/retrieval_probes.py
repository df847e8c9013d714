"""Does a student read from beyond its window? Two graded probes, for the teacher, the window baseline and
any converted students, where exact-match passkey accuracy is 0 for everyone:

- key digits: on passkey prompts (key 10-50% deep), teacher-forced, the share of the key's digits the
  model predicts top-1 (chance about 10%);
- copy: top-1 on the second copy of a 48-token held-out passage written again `gap` tokens later (the
  baseline cannot see the first copy once the gap passes its window).

    python benchmarks/retrieval_probes.py --teacher T --students /tmp/a,/tmp/b --lengths 512,1024 --gaps 200,400
    python benchmarks/retrieval_probes.py --teacher T --students /tmp/a --by-distance 2048   # + digits by distance
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def digit_score(model: Any, tokenizer: Any, sample: Any) -> float:
    """Teacher-forced: the share of the key's tokens (spaces excluded) that `model` predicts top-1, given
    the prompt and the key's tokens before each one."""
    prompt = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(" " + sample.answers[0], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer], device=next(model.parameters()).device)
    pred = model(ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(answer)].argmax(-1).tolist()
    digits = [(p, a) for p, a in zip(pred, answer) if tokenizer.decode([a]).strip()]
    return sum(p == a for p, a in digits) / max(1, len(digits))


def key_digits(model: Any, tokenizer: Any, length: int, per_depth: int,
               depths: tuple[float, ...] = (0.1, 0.3, 0.5)) -> list[float]:
    """Key digits (%) at each depth, `per_depth` seeded prompts each (the same prompts for every model)."""
    from qwerky.eval.longctx import passkey

    rng = random.Random(0)
    out = []
    for depth in depths:
        scores = [digit_score(model, tokenizer, passkey.generate(tokenizer, length - 8, depth, rng))
                  for _ in range(per_depth)]
        out.append(100 * sum(scores) / len(scores))
    return out


DISTANCE_DEPTHS = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9)


@torch.no_grad()
def copy_accuracy(model: Any, stream: list[int], gap: int, rows: int = 8, passage: int = 48) -> float:
    seqs = []
    for i in range(rows):
        base = stream[i * 3000: i * 3000 + passage + gap]
        seqs.append(base + base[:passage])
    x = torch.tensor(seqs)
    pred = model(x).logits[:, -passage:-1].argmax(-1)
    return 100 * (pred == x[:, -passage + 1:]).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, help="teacher folder (default: the embedded teacher)")
    p.add_argument("--students", default="", help="comma-separated converted model folders")
    p.add_argument("--lengths", default="512,1024", help="passkey prompt lengths")
    p.add_argument("--gaps", default="200,400", help="tokens between a passage and its copy")
    p.add_argument("--per-depth", type=int, default=6, help="passkey prompts per depth (3 depths)")
    p.add_argument("--by-distance", type=int, default=0, metavar="LENGTH",
                   help="also: key digits at this prompt length for keys 5-90%% deep, i.e. by how far back the "
                        "key is (flat = the read is range-limited by nothing; falling = by the decays)")
    p.add_argument("--text", type=Path, help="held-out jsonl.gz with a 'text' field (default: the shipped one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "retrieval_probes.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qwerky.demo import HELDOUT_TEXT, TEACHER
    from qwerky.surgery import convert_teacher, load_student
    from qwerky.teacher import load_teacher, load_tokenizer

    teacher_dir = args.teacher or TEACHER
    tokenizer = load_tokenizer(teacher_dir)
    models: dict[str, Any] = {"teacher": load_teacher(teacher_dir).eval(),
                              "window baseline": convert_teacher(load_teacher(teacher_dir), mixer="window").eval()}
    for path in filter(None, args.students.split(",")):
        models[path] = load_student(path).eval()
    texts = [json.loads(line)["text"] for line in gzip.open(args.text or HELDOUT_TEXT, "rt")]
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    lengths = [int(x) for x in args.lengths.split(",")]
    gaps = [int(x) for x in args.gaps.split(",")]
    rows = {}
    for name, model in models.items():
        rows[name] = {"key_digits": {str(n): sum(key_digits(model, tokenizer, n, args.per_depth)) / 3 for n in lengths},
                      "copy": {str(g): copy_accuracy(model, stream, g) for g in gaps}}
        if args.by_distance:
            rows[name]["key_digits_by_depth"] = key_digits(model, tokenizer, args.by_distance, args.per_depth,
                                                           DISTANCE_DEPTHS)
        print(f"  {name}: done", file=sys.stderr)
    print("| model | " + " | ".join(f"key digits @{n}" for n in lengths) + " | "
          + " | ".join(f"copy, gap {g}" for g in gaps) + " |")
    print("|---|" + "---|" * (len(lengths) + len(gaps)))
    for name, r in rows.items():
        cells = [f"{r['key_digits'][str(n)]:.0f}%" for n in lengths] + [f"{r['copy'][str(g)]:.0f}%" for g in gaps]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.by_distance:
        n = args.by_distance
        print(f"\nkey digits at {n} tokens by how far back the key is (tokens before the question)")
        print("| model | " + " | ".join(f"~{int((1 - d) * n)}" for d in DISTANCE_DEPTHS) + " |")
        print("|---|" + "---|" * len(DISTANCE_DEPTHS))
        for name, r in rows.items():
            print(f"| {name} | " + " | ".join(f"{x:.0f}%" for x in r["key_digits_by_depth"]) + " |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"teacher": str(teacher_dir), "rows": rows, "per_depth": args.per_depth,
                                           "by_distance": {"length": args.by_distance, "depths": DISTANCE_DEPTHS}},
                                          indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
