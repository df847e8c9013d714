"""Serving load benchmark: a converted student vs its teacher, served the same way, same run.

For each prompt length, each model is served by a fresh `python -m qwerky.serve.app` subprocess on a
free 127.0.0.1 port (student: continuous batching over fixed-size states; teacher: one KV cache per
request), then N concurrent httpx clients send `--requests-per-client` completions each (random token
prompts of that length, greedy, eos ignored so every request generates exactly --max-tokens).

Reported per (model, length): generated tokens/s, p50/p99 request latency, peak RSS of the server
process, state/KV bytes per sequence (student: QwerkyState.nbytes()/rows as measured by the engine;
teacher: measured KV cache bytes, plus the formula 2 x layers x T x kv_heads x head_dim x bytes), and
the student/teacher ratios. A fresh server per length keeps peak RSS attributable to that length.

    python benchmarks/serve_load.py                                   # tiny in-process teacher + student
    python benchmarks/serve_load.py --student out/student --teacher Qwen/Qwen2.5-0.5B-local-dir \
        --lengths 512,2048,8192 --clients 16 --max-tokens 64 --json benchmarks/results/serve_load.json

The tiny default (2 layers, hidden 64, vocab 384, random weights) measures the serving machinery, not a
real model: use --student/--teacher for meaningful numbers. Loopback only; prefix cache off by default
so the student gets no reuse advantage (--prefix-cache-mb to turn it on).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]


def build_tiny_models(out: Path, mixer: str = "rwkv7") -> tuple[Path, Path]:
    """Save the test suite's tiny Qwen2 teacher (positions up to 16k) and its stage-0 student."""
    spec = importlib.util.spec_from_file_location("_qwerky_bench_conftest", ROOT / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from qwerky.surgery import convert_teacher, save_student

    teacher = mod.tiny_teacher("qwen2", max_position_embeddings=16384)
    tokenizer = mod.build_tokenizer()
    teacher_dir, student_dir = out / "teacher", out / "student"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    save_student(convert_teacher(teacher, mixer=mixer), tokenizer, student_dir)
    return student_dir, teacher_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m qwerky.serve.app DIR` on loopback, with a thread sampling its peak RSS."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, max_prompt: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "qwerky.serve.app", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--max-concurrent", str(args.max_concurrent),
               "--max-prompt-tokens", str(max_prompt), "--prefix-cache-mb", str(args.prefix_cache_mb),
               "--served-model-name", "bench", "--threads", str(args.threads), "--dtype", args.dtype]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        try:
            p = psutil.Process(self.proc.pid)
            while not self._stop.is_set():
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                self.peak_rss = max(self.peak_rss, rss)
                time.sleep(0.05)
        except psutil.Error:
            return

    def __enter__(self) -> ServerProcess:
        self._sampler.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("server did not become healthy in 300 s")

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/stats", timeout=30).json()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def drive(url: str, length: int, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """N clients, each sending its requests one after another; returns latencies and token counts."""
    rng = random.Random(args.seed + length)
    latencies: list[float] = []
    tokens = 0
    errors = 0

    async def client(http: httpx.AsyncClient, cid: int) -> None:
        nonlocal tokens, errors
        for _ in range(args.requests_per_client):
            prompt = [rng.randrange(3, vocab) for _ in range(length)]
            body = {"model": "bench", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True}
            t0 = time.perf_counter()
            resp = await http.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                errors += 1
                continue
            tokens += resp.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, i) for i in range(args.clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"wall_s": wall, "generated_tokens": tokens, "errors": errors, "requests": len(latencies),
            "tokens_per_s": tokens / wall if wall else 0.0, "p50_s": _pct(latencies, 50), "p99_s": _pct(latencies, 99)}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def model_facts(model_dir: Path) -> dict[str, Any]:
    """Layers, kv heads, head dim and vocab from config.json (a qwerky config nests the teacher's)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    inner = cfg.get("teacher_config", cfg)
    heads = inner["num_attention_heads"]
    head_dim = inner.get("head_dim") or inner["hidden_size"] // heads
    return {"model_type": cfg.get("model_type"), "layers": inner["num_hidden_layers"],
            "kv_heads": inner.get("num_key_value_heads", heads), "head_dim": head_dim,
            "vocab_size": inner["vocab_size"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    lengths = [int(x) for x in args.lengths.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="qwerky-serve-bench-") as tmp:
        if args.student and args.teacher:
            student_dir, teacher_dir = Path(args.student), Path(args.teacher)
            default = False
        elif args.student or args.teacher:
            raise SystemExit("pass both --student and --teacher, or neither (tiny in-process models)")
        else:
            student_dir, teacher_dir = build_tiny_models(Path(tmp), args.mixer)
            default = True
        facts = {"student": model_facts(student_dir), "teacher": model_facts(teacher_dir)}
        vocab = min(facts["teacher"]["vocab_size"], facts["student"]["vocab_size"])
        bytes_per_el = {"float32": 4, "bfloat16": 2, "float16": 2}.get(args.dtype, 4)
        rows = []
        for length in lengths:
            for name, model_dir in (("student", student_dir), ("teacher", teacher_dir)):
                with ServerProcess(model_dir, args, length + 16) as server:
                    load = asyncio.run(drive(server.url, length, args, vocab))
                    stats = server.stats()
                    rss = server.peak_rss
                row = {"model": name, "prompt_tokens": length, **load, "peak_rss_bytes": rss,
                       "state_bytes_per_seq": stats["peak_state_bytes_per_seq"], "peak_active": stats["peak_active"]}
                if name == "teacher":
                    f = facts["teacher"]
                    T = length + args.max_tokens - 1  # positions cached when the last token is sampled
                    row["kv_formula_bytes_per_seq"] = 2 * f["layers"] * T * f["kv_heads"] * f["head_dim"] * bytes_per_el
                rows.append(row)
                print(f"  {name:7s} L={length:5d}: {load['tokens_per_s']:.1f} tok/s, p50 {load['p50_s']:.2f} s, "
                      f"state/seq {row['state_bytes_per_seq']}", flush=True)
        decode = None
        if args.decode_batch > 0:
            decode = decode_only(student_dir, teacher_dir, lengths, args.decode_batch, args.decode_steps, args.threads,
                                 vocab)
    ratios = []
    for length in lengths:
        s = next(r for r in rows if r["model"] == "student" and r["prompt_tokens"] == length)
        t = next(r for r in rows if r["model"] == "teacher" and r["prompt_tokens"] == length)
        ratios.append({"prompt_tokens": length,
                       **{k: (s[k] / t[k] if t[k] else None) for k in
                          ("tokens_per_s", "p50_s", "p99_s", "peak_rss_bytes", "state_bytes_per_seq")}})
    return {"default_tiny_models": default, "decode_only": decode,
            "student": str(student_dir) if not default else "tiny in-process",
            "teacher": str(teacher_dir) if not default else "tiny in-process", "facts": facts,
            "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "cpu_count": os.cpu_count(), "results": rows, "ratios_student_over_teacher": ratios}


@torch.no_grad()
def decode_only(student_dir: Path, teacher_dir: Path, lengths: list[int], batch: int, steps: int, threads: int,
                vocab: int) -> list[dict[str, Any]]:
    """Decode tokens/s with `batch` sequences already holding `length` tokens of context: the serving cost
    that grows with context for a KV cache and stays flat for a recurrent state (prefill not timed)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from qwerky.surgery import load_student

    torch.set_num_threads(threads)
    student = load_student(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in lengths:
        prompt = torch.randint(3, vocab, (batch, length), generator=gen)
        tok = torch.randint(3, vocab, (batch, 1), generator=gen)
        state = student.init_state(batch)
        for piece in prompt.split(1024, dim=1):
            student(piece, past_key_values=state, use_cache=True, logits_to_keep=1)
        t0 = time.perf_counter()
        for _ in range(steps):
            student(tok, past_key_values=state, use_cache=True)
        s_rate = batch * steps / (time.perf_counter() - t0)
        cache = DynamicCache(config=teacher.config)
        for piece in prompt.split(1024, dim=1):
            teacher(piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
        t0 = time.perf_counter()
        for _ in range(steps):
            teacher(tok, past_key_values=cache, use_cache=True)
        t_rate = batch * steps / (time.perf_counter() - t0)
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) // batch
        rows.append({"context": length, "batch": batch, "student_decode_tok_s": s_rate, "teacher_decode_tok_s": t_rate,
                     "decode_ratio": s_rate / t_rate, "student_state_bytes_per_seq": state.nbytes() // batch,
                     "teacher_kv_bytes_per_seq": kv, "memory_ratio": state.nbytes() / batch / kv})
        print(f"  decode-only L={length}: student {s_rate:.0f} tok/s, teacher {t_rate:.0f} tok/s", flush=True)
    return rows


def print_table(report: dict[str, Any]) -> None:
    head = (f"{'model':7s} {'prompt':>6s} {'tok/s':>8s} {'p50 s':>7s} {'p99 s':>7s} {'RSS MiB':>8s} "
            f"{'state/seq KiB':>13s}")
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        print(f"{r['model']:7s} {r['prompt_tokens']:6d} {r['tokens_per_s']:8.1f} {r['p50_s']:7.2f} {r['p99_s']:7.2f} "
              f"{r['peak_rss_bytes'] / 2**20:8.1f} {r['state_bytes_per_seq'] / 1024:13.1f}")
    print("\nstudent / teacher")
    for r in report["ratios_student_over_teacher"]:
        cells = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "prompt_tokens" and v is not None)
        print(f"  prompt {r['prompt_tokens']}: {cells}")
    if report.get("decode_only"):
        print("\ndecode only (context already prefilled, batch of sequences decoding together)")
        print("| context | batch | student tok/s | teacher tok/s | ratio | state KiB/seq | teacher KV KiB/seq "
              "| mem ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for r in report["decode_only"]:
            print(f"| {r['context']} | {r['batch']} | {r['student_decode_tok_s']:.0f} | "
                  f"{r['teacher_decode_tok_s']:.0f} | "
                  f"{r['decode_ratio']:.2f}x | {r['student_state_bytes_per_seq'] / 1024:.0f} | "
                  f"{r['teacher_kv_bytes_per_seq'] / 1024:.0f} | {r['memory_ratio']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", help="converted qwerky folder (default: tiny in-process student)")
    p.add_argument("--teacher", help="its HF teacher folder (default: tiny in-process teacher)")
    p.add_argument("--mixer", default="rwkv7", help="mixer of the tiny default student")
    p.add_argument("--lengths", default="512,2048,8192", help="comma-separated prompt lengths in tokens")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-concurrent", type=int, default=64, help="server --max-concurrent")
    p.add_argument("--prefix-cache-mb", type=float, default=0, help="student prefix cache (0 = off, fair)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-batch", type=int, default=8, help="decode-only measurement batch (0 = skip)")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed per context length")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args(argv)
    report = run(args)
    print()
    print_table(report)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
