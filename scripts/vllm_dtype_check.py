"""What a student's tokens can differ by when its weights run in bf16 instead of fp32 (the state stays fp32
either way): KL(fp32 || bf16) of the next-token distributions and top-1 agreement on held-out text, and
optionally greedy tokens under vLLM at both dtypes. The numbers docs/vllm.md and the plugin's load-time log
quote come from this script.

    python scripts/vllm_dtype_check.py --student /work/data/real_run/window \
        --data /work/shared/data/python-docs-validation.jsonl.gz --windows 8 --length 512     # main env
    venv-vllm/bin/python scripts/vllm_dtype_check.py --student S --vllm --prompts 4           # + vLLM greedy

qwerky's HF model is the measuring instrument: with bf16 weights its activations and projections are bf16
while the state ops compute in fp32 and keep an fp32 state, the same policy as the vLLM plugin's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path
from typing import Any

import torch


def held_out_windows(path: Path, tokenizer: Any, windows: int, length: int) -> list[torch.Tensor]:
    """`windows` token windows of `length` from the documents of a jsonl(.gz) file, one per document."""
    opener = gzip.open if path.suffix == ".gz" else open
    out: list[torch.Tensor] = []
    with opener(path, "rt") as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"], return_tensors="pt").input_ids[0]
            if len(ids) >= length:
                out.append(ids[:length])
            if len(out) == windows:
                break
    if not out:
        raise SystemExit(f"{path}: no document has {length} tokens")
    return out


@torch.no_grad()
def compare_hf(student: Path, windows: list[torch.Tensor]) -> dict[str, float]:
    """KL(fp32 || bf16) per token, top-1 agreement and each dtype's perplexity over the windows."""
    from qwerky.surgery import load_student

    fp32 = load_student(student)
    bf16 = load_student(student, dtype=torch.bfloat16)
    kl_sum = agree = n = 0.0
    nll = {"fp32": 0.0, "bf16": 0.0}
    for ids in windows:
        x = ids[None]
        lp32 = torch.log_softmax(fp32(x).logits[0, :-1].float(), -1)
        lp16 = torch.log_softmax(bf16(x).logits[0, :-1].float(), -1)
        kl_sum += float((lp32.exp() * (lp32 - lp16)).sum(-1).sum())
        agree += float((lp32.argmax(-1) == lp16.argmax(-1)).sum())
        target = ids[1:]
        nll["fp32"] -= float(lp32.gather(-1, target[:, None]).sum())
        nll["bf16"] -= float(lp16.gather(-1, target[:, None]).sum())
        n += len(target)
    ppl = {f"ppl_{k}": float(torch.tensor(v / n).exp()) for k, v in nll.items()}
    return {"tokens": int(n), "kl_fp32_bf16": kl_sum / n, "top1_agreement": agree / n, **ppl}


def compare_vllm(student: Path, windows: list[torch.Tensor], prompts: int, max_tokens: int) -> dict[str, Any]:
    """Greedy tokens of vLLM at fp32 and bf16 for the first `prompts` windows: where they first differ."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    tokens = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(model=str(student), dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0,
                  gpu_memory_utilization=0.3, kv_cache_memory_bytes=512 * 2**20)
        outs = llm.generate([{"prompt_token_ids": w[:256].tolist()} for w in windows[:prompts]],
                            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        tokens[dtype] = [list(o.outputs[0].token_ids) for o in outs]
        llm.llm_engine.engine_core.shutdown()
        del llm
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), max_tokens)
             for x, y in zip(tokens["float32"], tokens["bfloat16"])]
    same = sum(a == b for x, y in zip(tokens["float32"], tokens["bfloat16"]) for a, b in zip(x, y))
    return {"prompts": prompts, "max_tokens": max_tokens, "first_divergence": first,
            "tokens_equal": same, "tokens_total": prompts * max_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/python-docs-validation.jsonl.gz"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--vllm", action="store_true", help="also greedy tokens under vLLM at fp32 and bf16")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(args.student))  # the exported tokenizer.json, no remote code
    windows = held_out_windows(args.data, tok, args.windows, args.length)
    result: dict[str, Any] = {"student": str(args.student), "data": str(args.data), "windows": len(windows),
                              "length": args.length}
    t0 = time.perf_counter()
    if not args.skip_hf:
        result["hf"] = compare_hf(args.student, windows)
    if args.vllm:
        result["vllm_greedy"] = compare_vllm(args.student, windows, args.prompts, args.max_tokens)
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
