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

Two more workloads (`--workload`):

- `shared-prefix`: N conversations x M turns (`--conversations`, `--turns`); turn 1 sends a `--first-len`
  token prompt, every later turn resends the whole history (previous prompt + the reply + a new
  `--turn-len` token message), all conversations' turn k together. Student and teacher, each with prefix
  caching off and on (four engines, same run): time to first token of turns 2.. and the prompt tokens
  actually prefilled (prompt - vLLM's cached tokens), as ratios caching on/off and student/teacher;
- `prefill`: the student alone, `--streams` prompts of mixed lengths (up to each of `--lengths`) at once,
  one token each, its prefills packed in one varlen pass per step (default) or one request at a time
  (QWERKY_VLLM_PREFILL=loop), the two in turn on one engine; prompt tokens/s packed / looped (median of
  the repeats' ratios).

    python benchmarks/serve_vllm.py --workload shared-prefix --conversations 4 --turns 4 --first-len 1024
    python benchmarks/serve_vllm.py --workload prefill --lengths 512 --streams 32

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
    if args.workload == "shared-prefix":
        max_len = args.first_len + args.turns * (args.turn_len + args.max_tokens)
    else:
        max_len = max(lengths) + args.max_tokens
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=args.enforce_eager,
              max_model_len=max_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_bytes=args.cache_mb * 2**20,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=args.prefix_caching,
              seed=0)
    engine = llm.llm_engine
    print("STATE " + json.dumps({"state_bytes": state_bytes(llm)}), flush=True)
    if args.workload == "shared-prefix":
        shared_prefix_worker(llm, args)
        return
    if args.workload == "prefill":
        prefill_worker(llm, args, lengths)
        return
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


def _run_until_done(engine: Any, requests: dict[str, list[int]], params: Any) -> dict[str, dict[str, Any]]:
    """Submit every request at once and step the engine until all finish: per request the generated tokens,
    time to first token (from submission) and vLLM's cached prompt tokens."""
    from vllm.inputs import TokensPrompt

    for rid, ids in requests.items():
        engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), params)
    t0, c0 = time.perf_counter(), time.process_time()
    done: dict[str, dict[str, Any]] = {rid: {"tokens": [], "ttft_s": None, "ttft_cpu_s": None, "cached": 0}
                                       for rid in requests}
    unfinished = set(requests)
    while unfinished:
        for o in engine.step():
            row = done[o.request_id]
            if o.outputs and o.outputs[0].token_ids:
                if row["ttft_s"] is None:
                    row["ttft_s"] = time.perf_counter() - t0
                    row["ttft_cpu_s"] = time.process_time() - c0  # this process's CPU time: robust to a busy machine
                row["tokens"] += list(o.outputs[0].token_ids)
            row["cached"] = max(row["cached"], o.num_cached_tokens or 0)
            if o.finished:
                unfinished.discard(o.request_id)
    return done


def shared_prefix_worker(llm: Any, args: argparse.Namespace) -> None:
    """N conversations x M turns, each turn resending the history; one JSON line per turn."""
    import random

    from vllm.sampling_params import RequestOutputKind

    from vllm import SamplingParams

    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)  # the same conversations for every model and setting
    history = [[rng.randrange(1, vocab) for _ in range(args.first_len)] for _ in range(args.conversations)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    # warm-up on unrelated prompts of the first turn's size (the first long prefills of a fresh process run
    # several times slower, CPU time too), so turn 1 is not measured cold
    warm = random.Random(1)
    for _ in range(args.warmup_rounds):
        llm.generate([{"prompt_token_ids": [warm.randrange(1, vocab) for _ in range(args.first_len)]}
                      for _ in range(args.conversations)], SamplingParams(max_tokens=2), use_tqdm=False)
    for turn in range(args.turns):
        if turn:
            for h in history:
                h += [rng.randrange(1, vocab) for _ in range(args.turn_len)]
        done = _run_until_done(llm.llm_engine, {f"t{turn}-c{c}": list(h) for c, h in enumerate(history)}, params)
        prompt = sum(len(h) for h in history)
        cached = sum(d["cached"] for d in done.values())
        ttft = [d["ttft_s"] for d in done.values()]
        ttft_cpu = [d["ttft_cpu_s"] for d in done.values()]
        print("RESULT " + json.dumps({"turn": turn + 1, "prompt_tokens": prompt, "cached_tokens": cached,
                                      "prefill_tokens": prompt - cached, "ttft_mean_s": sum(ttft) / len(ttft),
                                      "ttft_max_s": max(ttft), "ttft_cpu_mean_s": sum(ttft_cpu) / len(ttft_cpu)}),
              flush=True)
        for c, h in enumerate(history):  # the reply joins the history (the same for caching on and off)
            h += done[f"t{turn}-c{c}"]["tokens"]


def prefill_worker(llm: Any, args: argparse.Namespace, lengths: list[int]) -> None:
    """Prompts of mixed lengths at once, one token each, prefills packed and looped in turn on the same engine
    (the plugin reads QWERKY_VLLM_PREFILL per step; the engine is in this process): each repeat times both,
    so a busy machine slows both alike; the median of the per-repeat ratios is the result."""
    import random
    import statistics

    from vllm import SamplingParams

    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    warm = random.Random(1)  # warm-up: the first long prefills of a fresh process run several times slower
    for _ in range(args.warmup_rounds):
        llm.generate([{"prompt_token_ids": [warm.randrange(1, vocab) for _ in range(max(lengths))]}
                      for _ in range(4)], params, use_tqdm=False)
    for L in lengths:
        rng = random.Random(L)
        prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(max(1, L // 8), L))]
                   for _ in range(args.streams)]
        walls: dict[str, list[float]] = {"packed": [], "loop": []}
        cpu: dict[str, list[float]] = {"packed": [], "loop": []}
        for rep in range(args.repeats):
            for mode in ("packed", "loop") if rep % 2 == 0 else ("loop", "packed"):
                os.environ["QWERKY_VLLM_PREFILL"] = mode
                t0, c0 = time.perf_counter(), time.process_time()
                _run_until_done(llm.llm_engine, {f"{L}-{rep}-{mode}-{i}": p for i, p in enumerate(prompts)}, params)
                walls[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
        os.environ.pop("QWERKY_VLLM_PREFILL", None)
        tokens = sum(len(p) for p in prompts)
        ratios = [lo / pa for pa, lo in zip(walls["packed"], walls["loop"])]
        cpu_ratios = [lo / pa for pa, lo in zip(cpu["packed"], cpu["loop"])]
        print("RESULT " + json.dumps({"length": L, "prompt_tokens": tokens, "walls_s": walls, "cpu_s": cpu,
                                      "packed_tokens_per_s": tokens / min(walls["packed"]),
                                      "loop_tokens_per_s": tokens / min(walls["loop"]),
                                      "packed_over_loop_median": statistics.median(ratios),
                                      "packed_over_loop_each": ratios,
                                      "packed_over_loop_cpu_median": statistics.median(cpu_ratios),
                                      "packed_over_loop_cpu_each": cpu_ratios}), flush=True)


def run_model(name: str, model: Path, args: argparse.Namespace, prefix_caching: bool = False,
              env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--lengths", args.lengths,
           "--streams", str(args.streams), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
           "--cache-mb", str(args.cache_mb), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    cmd += ["--enforce-eager"] if args.enforce_eager else []
    cmd += ["--warmup"] if args.warmup else []
    cmd += ["--prefix-caching"] if prefix_caching else []
    cmd += ["--workload", args.workload, "--conversations", str(args.conversations), "--turns", str(args.turns),
            "--first-len", str(args.first_len), "--turn-len", str(args.turn_len), "--repeats", str(args.repeats),
            "--warmup-rounds", str(args.warmup_rounds)]
    print(f"[{name}] {model}", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
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
    ap.add_argument("--workload", choices=("throughput", "shared-prefix", "prefill"), default="throughput")
    ap.add_argument("--conversations", type=int, default=4, help="shared-prefix: conversations at once")
    ap.add_argument("--turns", type=int, default=4, help="shared-prefix: turns per conversation")
    ap.add_argument("--first-len", type=int, default=1024, help="shared-prefix: tokens of the first message")
    ap.add_argument("--turn-len", type=int, default=64, help="shared-prefix: tokens of each later message")
    ap.add_argument("--repeats", type=int, default=6, help="prefill: repeats, each timing packed and looped")
    ap.add_argument("--warmup-rounds", type=int, default=3, help="shared-prefix, prefill: warm-up batches")
    ap.add_argument("--prefix-caching", action="store_true", help=argparse.SUPPRESS)
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
        if args.workload == "shared-prefix":
            results = {f"{name}_{'on' if pc else 'off'}": run_model(f"{name}, prefix caching {'on' if pc else 'off'}",
                                                                   path, args, prefix_caching=pc)
                       for name, path in (("student", student), ("teacher", teacher)) for pc in (False, True)}
            rows = _shared_prefix_rows(results)
            _shared_prefix_report(rows, args)
        elif args.workload == "prefill":
            results = {"student": run_model("student, prefill packed and looped in turn", student, args)}
            rows = results["student"]
            print(f"\nprefill, student alone: {args.streams} prompts of mixed lengths at once, one token each, "
                  f"{args.repeats} repeats")
            for r in rows:
                each = ", ".join(f"{x:.2f}" for x in r["packed_over_loop_each"])
                each_cpu = ", ".join(f"{x:.2f}" for x in r["packed_over_loop_cpu_each"])
                print(f"  up to {r['length']} tokens ({r['prompt_tokens']} prompt tokens): prompt tokens/s packed / "
                      f"looped = {r['packed_over_loop_median']:.2f} by wall time (median; each repeat: {each}), "
                      f"{r['packed_over_loop_cpu_median']:.2f} by process CPU time ({each_cpu})")
        else:
            results = {"student": run_model("student", student, args),
                       "teacher": run_model("teacher", teacher, args)}
            rows = _rows(results, student, teacher, args)
            _report(rows, args)
    out = {"args": {k: str(v) for k, v in vars(args).items() if k not in ("worker", "model")}, "rows": rows,
           "raw": results}
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


def _shared_prefix_rows(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per model: turns 2.. summed (turn 1 has nothing to reuse), caching on / off ratios; then student /
    teacher ratios of those."""
    rows = []
    for name in ("student", "teacher"):
        on, off = (results[f"{name}_{s}"][1:] for s in ("on", "off"))
        row = {"model": name, "turns": len(on) + 1,
               "prompt_tokens": sum(r["prompt_tokens"] for r in on),
               "prefill_tokens_off": sum(r["prefill_tokens"] for r in off),
               "prefill_tokens_on": sum(r["prefill_tokens"] for r in on),
               "ttft_off_s": sum(r["ttft_mean_s"] for r in off) / len(off),
               "ttft_on_s": sum(r["ttft_mean_s"] for r in on) / len(on),
               "ttft_cpu_off_s": sum(r["ttft_cpu_mean_s"] for r in off) / len(off),
               "ttft_cpu_on_s": sum(r["ttft_cpu_mean_s"] for r in on) / len(on)}
        row["prefill_ratio_on_off"] = row["prefill_tokens_on"] / row["prefill_tokens_off"]
        row["ttft_ratio_on_off"] = row["ttft_on_s"] / row["ttft_off_s"]
        row["ttft_cpu_ratio_on_off"] = row["ttft_cpu_on_s"] / row["ttft_cpu_off_s"]
        rows.append(row)
    s, t = rows
    rows.append({"model": "student/teacher", "ttft_off": s["ttft_off_s"] / t["ttft_off_s"],
                 "ttft_on": s["ttft_on_s"] / t["ttft_on_s"],
                 "ttft_cpu_off": s["ttft_cpu_off_s"] / t["ttft_cpu_off_s"],
                 "ttft_cpu_on": s["ttft_cpu_on_s"] / t["ttft_cpu_on_s"],
                 "prefill_ratio_on_off": s["prefill_ratio_on_off"] / t["prefill_ratio_on_off"],
                 "ttft_ratio_on_off": s["ttft_ratio_on_off"] / t["ttft_ratio_on_off"]})
    return rows


def _shared_prefix_report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nshared prefix: {args.conversations} conversations x {args.turns} turns, first message "
          f"{args.first_len} tokens, then {args.turn_len} per turn, {args.max_tokens}-token replies, "
          f"dtype={args.dtype}; turns 2..{args.turns}")
    head = (f"{'model':>8} | {'prompt tokens':>13} | {'prefilled off':>13} | {'prefilled on':>12} | "
            f"{'prefill on/off':>14} | {'TTFT on/off':>11} | {'TTFT CPU-time on/off':>20}")
    print(head)
    print("-" * len(head))
    for r in rows[:2]:
        print(f"{r['model']:>8} | {r['prompt_tokens']:>13} | {r['prefill_tokens_off']:>13} | "
              f"{r['prefill_tokens_on']:>12} | {r['prefill_ratio_on_off']:>14.3f} | {r['ttft_ratio_on_off']:>11.3f} | "
              f"{r['ttft_cpu_ratio_on_off']:>20.3f}")
    st = rows[2]
    print(f"student / teacher TTFT: caching off {st['ttft_off']:.2f} (CPU time {st['ttft_cpu_off']:.2f}), "
          f"caching on {st['ttft_on']:.2f} (CPU time {st['ttft_cpu_on']:.2f})")


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
