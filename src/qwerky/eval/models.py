"""Loading models for evaluation and running them the same way whatever they are.

Evaluation compares three kinds of model side by side: the teacher (a plain HF causal LM, KV cache),
the student and the window baseline (QwerkyForCausalLM, a fixed-size recurrent state). The helpers here
hide that difference: `is_recurrent`, `hidden_states` + `head_logits` (so logits can be made in chunks
and B x T x V never exists at once), `Stream` (feed tokens piece by piece, carrying the state or the
KV cache) and `greedy_generate`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": None}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / 'bf16' / torch.bfloat16 / None -> torch dtype (None: keep the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def is_qwerky_dir(path: str | Path) -> bool:
    """True when the folder holds a converted (model_type 'qwerky') model."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "qwerky"
    except (OSError, json.JSONDecodeError):
        return False


def _check_local(path: str | Path) -> None:
    """A model is a local folder or GGUF file: a missing one is named, not sent to the hub as a repo id."""
    from qwerky.model_paths import check_model_dir, is_gguf

    if not is_gguf(path):
        check_model_dir(path, "model")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               trust_remote_code: bool = False) -> nn.Module:
    """A qwerky folder through `load_student` (our own classes), anything else through AutoModelForCausalLM."""
    torch_dtype = parse_dtype(dtype)
    _check_local(path)
    if is_qwerky_dir(path):
        from qwerky.surgery import load_student

        return load_student(path, device=device, dtype=torch_dtype)
    from qwerky.model_paths import is_gguf

    if is_gguf(path):  # dequantised into a plain HF model (fp32 for 'auto')
        from qwerky.teacher_gguf import load_gguf_model

        return load_gguf_model(path, dtype=torch_dtype).to(device)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device).eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    from qwerky.model_paths import is_gguf

    _check_local(path)
    if is_gguf(path):
        from qwerky.teacher_gguf import gguf_tokenizer

        return gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def is_recurrent(model: nn.Module) -> bool:
    """Models with `init_state` carry a QwerkyState; the rest are HF models with a KV cache."""
    return callable(getattr(model, "init_state", None))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def max_positions(model: nn.Module) -> int | None:
    """The context length the model (or the teacher inside a student) was built for."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "teacher_config", None) or cfg
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if value else None


def _base_forward(model: nn.Module, input_ids: torch.Tensor, state: Any = None,
                  attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """Final hidden states [B, T, C] and the updated state/cache, without running the LM head."""
    if is_recurrent(model):
        if state is not None:
            return model.hidden_states(input_ids, attention_mask=attention_mask, state=state), state
        return model.hidden_states(input_ids, attention_mask=attention_mask), None
    base = getattr(model, model.base_model_prefix)
    kwargs: dict[str, Any] = {"use_cache": state is not None}
    if state is not None:
        kwargs["past_key_values"] = state
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = base(input_ids=input_ids, **kwargs)
    return out.last_hidden_state, getattr(out, "past_key_values", None)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, state: Any = None,
                  attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, nn.Module, Any]:
    """Final hidden states [B, T, C] (before the head), the head module, and the updated state/cache.

    The head is applied later by `head_logits` in chunks: for a 150k vocabulary, B x T x V fp32 logits
    of a whole batch would not fit next to the model.
    """
    hidden, new_state = _base_forward(model, input_ids, state, attention_mask)
    return hidden, model.get_output_embeddings(), new_state


def head_logits(model: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a slice of hidden states, with the family's own logit scaling / soft-capping."""
    from qwerky.modeling.layers_common import finalize_logits

    config = getattr(model, "config", None)
    config = getattr(config, "teacher_config", None) or config
    return finalize_logits(config, head(hidden).float())


def window_baseline(teacher: nn.Module) -> nn.Module:
    """The training-free window baseline: the teacher restricted to a 64-token window + 4 sinks
    (`convert_teacher(teacher, mixer="window")`, eval mode).

    Its RWKV-7 branches start gated by exactly zero, so they add nothing to the output; they are not run
    (`skip_zero_branches`), which made the baseline's forward ~2x faster on CPU (docs/evaluation.md).
    Meant for evaluation only: a model whose branch gates are later trained must not use it.
    """
    from qwerky.surgery import convert_teacher

    model = convert_teacher(teacher, mixer="window").eval()
    skip_zero_branches(model)
    return model


def skip_zero_branches(model: nn.Module) -> int:
    """In every window mixer whose `branch_gate` is all zero, replace the RWKV-7 branch by zeros of its
    shape: `y + 0 * branch` is `y` whatever the branch holds. Returns how many mixers were changed."""
    changed = 0
    for mixer in getattr(model, "mixers", []):
        gate = getattr(mixer, "branch_gate", None)
        if gate is None or not callable(getattr(mixer, "_recurrent", None)) or bool(gate.detach().any()):
            continue
        heads, dim = mixer.num_heads, mixer.head_dim

        def zero_branch(x: torch.Tensor, *args: Any, _h: int = heads, _d: int = dim, **kwargs: Any) -> torch.Tensor:
            return x.new_zeros(x.shape[0], x.shape[1], _h, _d)

        mixer._recurrent = zero_branch
        changed += 1
    return changed


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar on stderr for a long evaluation phase (off when `enabled` is false and on distributed
    ranks other than 0); redrawn at most every 15 s when stderr is not a terminal (logs stay short)."""
    from tqdm import tqdm

    if enabled and torch.distributed.is_available() and torch.distributed.is_initialized():
        enabled = torch.distributed.get_rank() == 0
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                unit_scale=unit == "tok", mininterval=0.5 if tty else 15.0, leave=True)


def chunk_len(batch: int, vocab: int, budget_elems: int = 1 << 25, minimum: int = 1) -> int:
    """Sequence chunk so that one [batch, chunk, vocab] fp32 tensor stays under `budget_elems` (128 MiB)."""
    return max(minimum, budget_elems // max(1, batch * vocab))


class Stream:
    """Feed one sequence's tokens piece by piece; the recurrent state or the KV cache is carried.

    `feed(ids)` returns the final hidden states of those tokens; `logits(hidden)` turns a slice into fp32
    logits. Memory of a recurrent model stays constant; a teacher's KV cache grows with the context.
    """

    def __init__(self, model: nn.Module, batch_size: int = 1) -> None:
        self.model = model
        self.device = model_device(model)
        self.recurrent = is_recurrent(model)
        self.state: Any = model.init_state(batch_size) if self.recurrent else None
        self.position = 0
        self.head: nn.Module = model.get_output_embeddings()

    @torch.no_grad()
    def feed(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if self.recurrent:
            hidden, _ = _base_forward(self.model, ids, state=self.state)
        else:
            if self.state is None:
                from transformers import DynamicCache

                self.state = DynamicCache(config=self.model.config)
            hidden, self.state = _base_forward(self.model, ids, state=self.state)
        self.position += ids.shape[1]
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model, self.head, hidden)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompt: Sequence[int], max_new_tokens: int, *,
                    eos_token_ids: Sequence[int] = (), stop: Callable[[list[int]], bool] | None = None,
                    prefill_chunk: int = 2048) -> list[int]:
    """Greedy decoding of one sequence: the prompt is prefilled in chunks, then one token per step.

    A recurrent model keeps its fixed-size state, a HF model its KV cache; no padding is involved, so
    nothing can leak between requests. Stops at an eos id, when `stop(generated)` is true, or after
    `max_new_tokens`.
    """
    if not prompt:
        raise ValueError("greedy_generate needs a non-empty prompt")
    stream = Stream(model)
    hidden = None
    for i in range(0, len(prompt), prefill_chunk):
        hidden = stream.feed(list(prompt[i:i + prefill_chunk]))
    assert hidden is not None
    out: list[int] = []
    eos = set(int(e) for e in eos_token_ids)
    for _ in range(max_new_tokens):
        token = int(stream.logits(hidden[:, -1]).argmax(-1)[0])
        if token in eos:
            break
        out.append(token)
        if stop is not None and stop(out):
            break
        if len(out) == max_new_tokens:
            break
        hidden = stream.feed([token])
    return out


def eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: the tokenizer's eos and the generation config's eos ids."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None)
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, (list, tuple)):
        ids.update(int(v) for v in value)
    return sorted(ids)


@torch.no_grad()
def greedy_generate_many(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                         eos_token_ids: Sequence[int] = (), batch_size: int = 8,
                         prefill_chunk: int = 2048) -> list[list[int]]:
    """Greedy decoding of several prompts.

    Recurrent models decode `batch_size` prompts together: prompts are left-padded with the padding
    masked (it never enters the state; every row keeps its own position), then each step feeds one real
    token per row, so no padding is involved after the prefill. HF models decode one prompt at a time
    with their KV cache (no padding at all).
    """
    if not is_recurrent(model) or batch_size <= 1:
        return [greedy_generate(model, p, max_new_tokens, eos_token_ids=eos_token_ids, prefill_chunk=prefill_chunk)
                for p in prompts]
    device = model_device(model)
    eos = set(int(e) for e in eos_token_ids)
    results: list[list[int]] = []
    for b0 in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[b0:b0 + batch_size]]
        if any(not p for p in batch):
            raise ValueError("greedy_generate_many needs non-empty prompts")
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        state = model.init_state(len(batch))
        hidden = head = None
        for s in range(0, width, prefill_chunk):
            m = mask[:, s:s + prefill_chunk]
            hidden, head, _ = hidden_states(model, ids[:, s:s + prefill_chunk], state=state,
                                            attention_mask=None if bool(m.all()) else m)
        assert hidden is not None and head is not None
        outs: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for step in range(max_new_tokens):
            tokens = head_logits(model, head, hidden[:, -1]).argmax(-1)
            for r, tok in enumerate(tokens.tolist()):
                if done[r]:
                    continue
                if tok in eos:
                    done[r] = True
                else:
                    outs[r].append(tok)
            if all(done) or step == max_new_tokens - 1:
                break
            hidden, head, _ = hidden_states(model, tokens[:, None], state=state)
        results.extend(outs)
    return results
