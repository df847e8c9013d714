"""Greedy generation of a folder in vLLM in a fresh process (used for tensor parallelism: vLLM starts one
worker process per rank). Usage: generate_worker.py FOLDER TP OUT.json PROMPT [PROMPT ...]."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    folder, tp, out, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    llm = LLM(model=folder, enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=64, gpu_memory_utilization=0.3, kv_cache_memory_bytes=64 * 2**20, seed=0,
              tensor_parallel_size=tp, distributed_executor_backend="mp")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    with open(out, "w") as f:
        json.dump([{"prompt": o.prompt_token_ids, "tokens": list(o.outputs[0].token_ids)} for o in outs], f)


if __name__ == "__main__":  # vLLM's worker processes re-import this module
    main()
