"""The vLLM plugin's checks on a CUDA machine, in one go (installs nothing: vllm with CUDA, qwerky installed
with `pip install --no-deps -e .`, flash-linear-attention optional).

1. the plugin tests (tests/vllm) on CUDA: registration, weights, state spec, greedy = HF generate() for
   prompts of different lengths together (fp32; fla kernels when installed), vllm serve + openai client;
2. bf16 + CUDA graphs (no enforce_eager), for every mixer the plugin serves: greedy agreement with HF
   generate() in fp32, tokens matched (bf16 may drift on a random model; reported, not asserted), and that
   the engine runs at all;
3. prefix caching with CUDA graphs and bf16, for rwkv7, window and a hybrid: a 1,100-token prefix, then two
   prompts extending it: the 32 greedy tokens with caching on equal those with caching off, and how many
   prompt tokens vLLM served from its cache (asserted > 1,000: a hit);
4. benchmarks/serve_vllm.py at 512 / 2048 / 8192 (student vs teacher, same requests, bf16), the shared-prefix
   workload (TTFT and prefill tokens, caching on/off, student/teacher) and the packed-vs-looped prefill
   ratio (fla's varlen kernels against one call per request).

    python scripts/gpu_vllm_check.py --out results/            # everything lands in results/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GRAPH_CHECK = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[3])
from qwerky.surgery import convert_teacher, load_student, save_student
from qwerky_testing import build_tokenizer, tiny_teacher
out, mixer = sys.argv[1], sys.argv[2]
torch.manual_seed(1)
s = convert_teacher(tiny_teacher("qwen3", head_dim=64), mixer=mixer)
with torch.no_grad():
    for p in s.parameters():
        p.add_(torch.randn_like(p) * 0.05)
save_student(s, build_tokenizer(), out)
from vllm import LLM, SamplingParams
llm = LLM(model=out, dtype="bfloat16", max_model_len=2048, max_num_seqs=16, gpu_memory_utilization=0.3, seed=0)
prompts = ["Hello", "The quick brown fox jumps over the lazy dog. " * 3, "The pass key is 12345. " * 40]
outs = llm.generate(prompts * 4, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
ref = load_student(out)
agree = []
for o in outs:
    ids = torch.tensor([o.prompt_token_ids])
    r = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    got = list(o.outputs[0].token_ids)
    agree.append(next((i for i, (a, b) in enumerate(zip(got, r)) if a != b), 32))
same = len({tuple(o.outputs[0].token_ids) for o in outs[::3]}) == 1  # "Hello" 4 times: batch-invariant
print("RESULT " + json.dumps({"first_divergence": agree, "repeats_identical": same}))
"""

PREFIX_CHECK = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[4])
from qwerky.surgery import convert_teacher, save_student
from qwerky_testing import build_tokenizer, tiny_teacher
out, mixer, keep = sys.argv[1], sys.argv[2], tuple(int(x) for x in sys.argv[3].split(",") if x)
opts = {"window_size": 64, "num_sinks": 4} if mixer == "window" else None
torch.manual_seed(1)
s = convert_teacher(tiny_teacher("qwen3", head_dim=64), mixer=mixer, attention_layers=keep, mixer_options=opts)
with torch.no_grad():
    for p in s.parameters():
        p.add_(torch.randn_like(p) * 0.05)
save_student(s, build_tokenizer(), out)
from vllm import LLM, SamplingParams
g = torch.Generator().manual_seed(0)
prefix = torch.randint(3, 380, (1100,), generator=g).tolist()
prompts = [prefix] + [prefix + torch.randint(3, 380, (n,), generator=g).tolist() for n in (30, 7)]
res = {}
for caching in (False, True):
    llm = LLM(model=out, dtype="bfloat16", max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=512,
              gpu_memory_utilization=0.3, seed=0, enable_prefix_caching=caching)
    rows = []
    for ids in prompts:
        o = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                         use_tqdm=False)[0]
        rows.append((list(o.outputs[0].token_ids), o.num_cached_tokens))
    res[caching] = rows
    llm.llm_engine.engine_core.shutdown()
    del llm
equal = [a[0] == b[0] for a, b in zip(res[False], res[True])]
cached = [r[1] for r in res[True]]
print("RESULT " + json.dumps({"tokens_equal": equal, "cached_tokens": cached}))
sys.exit(0 if all(equal) and all(c > 1000 for c in cached[1:]) else 1)
"""


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: int = 1800) -> int:
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout).returncode
    print(f"  -> rc {rc}; tail of {log}:\n" + "\n".join(log.read_text().splitlines()[-6:]), flush=True)
    return rc


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_vllm_results")))
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    summary: dict[str, object] = {}
    summary["tests_rc"] = run([sys.executable, "-m", "pytest", "tests/vllm", "-q", "-p", "no:cacheprovider"],
                              args.out / "tests.log", env)
    from qwerky.vllm import SUPPORTED_MIXERS

    for mixer in SUPPORTED_MIXERS:
        with tempfile.TemporaryDirectory() as tmp:
            log = args.out / f"graphs_bf16_{mixer}.log"
            summary[f"graphs_{mixer}_rc"] = run([sys.executable, "-c", GRAPH_CHECK, f"{tmp}/s", mixer,
                                                 str(ROOT / "tests")], log, env)
            lines = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")]
            summary[f"graphs_bf16_{mixer}"] = json.loads(lines[-1][7:]) if lines else None
    for mixer, keep in (("rwkv7", ""), ("window", ""), ("rwkv7", "0")):
        name = f"prefix_{mixer}" + (f"_keep{keep}" if keep else "")
        with tempfile.TemporaryDirectory() as tmp:
            log = args.out / f"{name}.log"
            summary[f"{name}_rc"] = run([sys.executable, "-c", PREFIX_CHECK, f"{tmp}/s", mixer, keep,
                                         str(ROOT / "tests")], log, env)
            lines = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")]
            summary[name] = json.loads(lines[-1][7:]) if lines else None
    if not args.skip_bench:
        summary["shared_prefix_rc"] = run([sys.executable, "benchmarks/serve_vllm.py", "--workload", "shared-prefix",
                                           "--conversations", "16", "--turns", "4", "--first-len", "4096",
                                           "--turn-len", "128", "--max-tokens", "64", "--dtype", "bfloat16",
                                           "--cache-mb", "4096", "--max-num-batched-tokens", "8192",
                                           "--no-enforce-eager", "--json", str(args.out / "shared_prefix_gpu.json")],
                                          args.out / "shared_prefix.log", env)
        summary["prefill_rc"] = run([sys.executable, "benchmarks/serve_vllm.py", "--workload", "prefill",
                                     "--lengths", "512,2048,8192", "--streams", "32", "--dtype", "bfloat16",
                                     "--cache-mb", "4096", "--max-num-batched-tokens", "16384", "--no-enforce-eager",
                                     "--json", str(args.out / "prefill_gpu.json")], args.out / "prefill.log", env)
        summary["bench_rc"] = run([sys.executable, "benchmarks/serve_vllm.py", "--lengths", "512,2048,8192",
                                   "--streams", "64", "--max-tokens", "128", "--dtype", "bfloat16",
                                   "--cache-mb", "512", "--max-num-batched-tokens", "8192",
                                   "--no-enforce-eager", "--json", str(args.out / "serve_vllm_gpu.json")],
                                  args.out / "bench.log", env)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if all(v == 0 for k, v in summary.items() if k.endswith("_rc")) else 1


if __name__ == "__main__":
    sys.exit(main())
