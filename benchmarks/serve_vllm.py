"""vLLM serving benchmark: a converted student (qwerky's vLLM plugin) against its teacher (vLLM's own model),
same run, same requests, same cache budget.

Each model runs in its own subprocess (one vLLM engine per process, in-process engine core); for each prompt
length it receives the same `--streams` requests at once (random token prompts of exactly that length,
greedy, eos ignored, `--max-tokens` each) and the engine is stepped until all finish. Per (model, length):

- decode tokens/s: tokens produced by steps in which every unfinished request had already started
  decoding (no prefill in the step), over those steps' time; also overall generated tokens/s;
- peak concurrent sequences: the most requests that produced a token in one step;
- memory per sequence: state bytes (student: the layers' state spec; constant) or KV-cache bytes at
  prompt + max_tokens (teacher: 2 x layers x kv_heads x head_dim x bytes x tokens), and how many sequences
  of that length the cache budget (`--cache-mb`, the same for both) holds;
- student / teacher ratios. Ratios are the result; absolute times depend on the machine.

    python benchmarks/serve_vllm.py                                  # embedded teacher + its stage-0 student
    python benchmarks/serve_vllm.py --lengths 128,512 --streams 8 --max-tokens 32      # a 2-core CPU
    python benchmarks/serve_vllm.py --student out/student --teacher path/to/teacher \
        --lengths 512,2048,8192 --streams 64 --max-tokens 128 --cache-mb 20000 --dtype bfloat16   # a GPU

Needs vLLM with qwerky installed beside it (scripts/test_vllm.sh builds such a venv). JSON goes to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def build_default_models(out: Path, max_len: int, mixer: str = "rwkv7", keep: tuple[int, ...] = ()
                         ) -> tuple[Path, Path]:
    """The embedded teacher (4-layer Qwen2, assets/teacher) and its stage-0 student (weight transfer);
    the teacher's copy allows positions up to max_len (its RoPE extends; it was trained at 8192)."""
    import shutil

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from qwerky.surgery import convert_teacher, save_student

    teacher_dir = out / "teacher"
    shutil.copytree(ROOT / "src" / "qwerky" / "assets" / "teacher", teacher_dir)
    cfg = json.loads((teacher_dir / "config.json").read_text())
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max_len)
    (teacher_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="float32")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher_dir)
    student_dir = out / "student"
    save_student(convert_teacher(teacher, mixer=mixer, attention_layers=keep), tokenizer, student_dir)
    return student_dir, teacher_dir


def state_bytes(llm: Any) -> int:
    """Bytes of recurrent state per sequence, read from the layers' state spec inside the engine (0 for a
    model without state layers); the same whatever the context length."""
    import math

    def count(model: Any) -> int:
        total = 0
        for m in model.modules():
            if hasattr(m, "get_state_shape"):
                for shape, dtype in zip(m.get_state_shape(), m.get_state_dtype()):
                    total += math.prod(shape) * dtype.itemsize
        return total

    return sum(llm.apply_model(count))


def kv_bytes_per_sequence(model_dir: Path, tokens: int, dtype_bytes: int) -> int:
    """The KV cache of one sequence of `tokens` tokens: every layer of the teacher, the kept attention layers
    of a hybrid student (none of a fully converted one)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") == "qwerky":
        layers = len(cfg.get("attention_layers") or [])
        cfg = {**cfg["teacher_config"], "num_hidden_layers": layers}
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv * head_dim * dtype_bytes * tokens


def worker(args: argparse.Namespace) -> None:
    """One model, all lengths, in this process; prints one JSON line per length."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import random

    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from vllm import LLM, SamplingParams

    lengths = [int(x) for x in args.lengths.split(",")]
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=args.enforce_eager,
              max_model_len=max(lengths) + args.max_tokens, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_bytes=args.cache_mb * 2**20,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False, seed=0)
    engine = llm.llm_engine
    print("STATE " + json.dumps({"state_bytes": state_bytes(llm)}), flush=True)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    for L in lengths:
        rng = random.Random(L)  # the same prompts for both models
        prompts = [[rng.randrange(1, vocab) for _ in range(L)] for _ in range(args.streams)]
        if args.warmup:
            llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:16])], SamplingParams(max_tokens=2),
                         use_tqdm=False)
        started: set[str] = set()
        unfinished = {f"{L}-{i}" for i in range(args.streams)}
        for i, p in enumerate(prompts):
            engine.add_request(f"{L}-{i}", TokensPrompt(prompt_token_ids=p), params)
        t0 = time.perf_counter()
        decode_tokens = decode_time = total = peak = 0
        while unfinished:
            decode_only = started >= unfinished
            ts = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - ts
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            total += n
            peak = max(peak, sum(1 for o in outs if o.outputs[0].token_ids))
            if decode_only and n:
                decode_tokens += n
                decode_time += dt
            for o in outs:
                if o.outputs[0].token_ids:
                    started.add(o.request_id)
                if o.finished:
                    unfinished.discard(o.request_id)
        wall = time.perf_counter() - t0
        print("RESULT " + json.dumps({"length": L, "generated": total, "wall_s": wall,
                                      "tokens_per_s": total / wall, "decode_tokens_per_s":
                                      decode_tokens / decode_time if decode_time else None,
                                      "decode_tokens": decode_tokens, "peak_concurrent": peak}), flush=True)


def run_model(name: str, model: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--lengths", args.lengths,
           "--streams", str(args.streams), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
           "--cache-mb", str(args.cache_mb), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    cmd += ["--enforce-eager"] if args.enforce_eager else []
    cmd += ["--warmup"] if args.warmup else []
    print(f"[{name}] {model}", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    rows = [json.loads(line[7:]) for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    state = [json.loads(line[6:]) for line in res.stdout.splitlines() if line.startswith("STATE ")]
    if res.returncode != 0 or not rows or not state:
        raise SystemExit(f"{name} worker failed (rc {res.returncode}):\n{res.stderr[-4000:]}")
    return [{**row, **state[0]} for row in rows]


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", type=Path)
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--mixer", default="rwkv7", help="student mixer when the student is built here (no --student)")
    ap.add_argument("--keep-attention", default="", help="layers the built student keeps as attention (e.g. 0)")
    ap.add_argument("--lengths", default="512,2048,8192", help="prompt lengths (comma-separated)")
    ap.add_argument("--streams", type=int, default=16, help="requests submitted together per length")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cache-mb", type=int, default=256, help="vLLM cache budget (kv_cache_memory_bytes), both models")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "serve_vllm.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher = args.student, args.teacher
        if student is None or teacher is None:
            max_len = max(int(x) for x in args.lengths.split(",")) + args.max_tokens
            keep = tuple(int(i) for i in args.keep_attention.split(",") if i)
            built_student, built_teacher = build_default_models(Path(tmp), max_len, args.mixer, keep)
            student, teacher = student or built_student, teacher or built_teacher
        results = {"student": run_model("student", student, args), "teacher": run_model("teacher", teacher, args)}
        rows = _rows(results, student, teacher, args)
    _report(rows, args)
    out = {"args": {k: str(v) for k, v in vars(args).items() if k not in ("worker", "model")}, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")
    return out


def _rows(results: dict[str, list[dict[str, Any]]], student: Path, teacher: Path,
          args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype_bytes = 2 if args.dtype in ("bfloat16", "float16", "half") else 4
    rows = []
    for s, t in zip(results["student"], results["teacher"]):
        L = s["length"]
        s_bytes = s["state_bytes"] + kv_bytes_per_sequence(student, L + args.max_tokens, dtype_bytes)
        t_bytes = kv_bytes_per_sequence(teacher, L + args.max_tokens, dtype_bytes)
        budget = args.cache_mb * 2**20
        ratio = (s["decode_tokens_per_s"] / t["decode_tokens_per_s"]
                 if s["decode_tokens_per_s"] and t["decode_tokens_per_s"] else None)
        rows.append({"length": L, "student": {**s, "bytes_per_seq": s_bytes, "capacity": budget // s_bytes},
                     "teacher": {**t, "bytes_per_seq": t_bytes, "capacity": budget // t_bytes},
                     "decode_tps_ratio": ratio, "tps_ratio": s["tokens_per_s"] / t["tokens_per_s"],
                     "memory_ratio": s_bytes / t_bytes})
    return rows


def _report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nstreams={args.streams} max_tokens={args.max_tokens} dtype={args.dtype} cache={args.cache_mb} MB")
    head = (f"{'prompt':>7} | {'decode tok/s S/T':>17} | {'ratio':>5} | {'all tok/s ratio':>15} | "
            f"{'peak conc. S/T':>14} | {'bytes/seq S/T':>21} | {'fits in cache S/T':>17}")
    print(head)
    print("-" * len(head))
    for r in rows:
        s, t = r["student"], r["teacher"]
        dec = f"{s['decode_tokens_per_s'] or 0:.0f}/{t['decode_tokens_per_s'] or 0:.0f}"
        print(f"{r['length']:>7} | {dec:>17} | {r['decode_tps_ratio'] or 0:>5.2f} | {r['tps_ratio']:>15.2f} | "
              f"{str(s['peak_concurrent']) + '/' + str(t['peak_concurrent']):>14} | "
              f"{str(s['bytes_per_seq']) + '/' + str(t['bytes_per_seq']):>21} | "
              f"{str(s['capacity']) + '/' + str(t['capacity']):>17}")


if __name__ == "__main__":
    main()
