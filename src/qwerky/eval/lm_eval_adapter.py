"""lm-evaluation-harness model type "qwerky" for converted (recurrent) models and plain HF models.

Why not HFLM: it scores long documents in disjoint windows (the state is thrown away at every window),
left-pads generation batches (a recurrent state would absorb the padding) and left-truncates context.
Here a recurrent model reads a document in one pass carrying its state, every generation has its own
state (no padding at all), and the context is never truncated. A plain HF model (e.g. the teacher)
gets HFLM-like behaviour: full forwards up to its max length, lm-eval's rolling windows beyond it.

```bash
python -m qwerky.eval.lm_eval_launcher --model qwerky --model_args pretrained=out/student,dtype=bfloat16 \
    --tasks lambada_openai,arc_easy --device cuda --batch_size 16
```
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from torch import nn
from tqdm import tqdm

from .models import (
    Stream,
    eos_ids,
    greedy_generate,
    head_logits,
    hidden_states,
    is_recurrent,
    load_model,
    load_tokenizer,
    max_positions,
)

log = logging.getLogger(__name__)

__all__ = ["QwerkyLM"]


@register_model("qwerky")
class QwerkyLM(TemplateLM):
    """lm-eval LM over a qwerky folder (load_student) or any HF causal LM folder.

    Args:
        pretrained: folder path, or an already built model (then pass `tokenizer`).
        tokenizer: folder or tokenizer instance; defaults to `pretrained`'s folder.
        batch_size: continuations scored per forward (multiple choice shares one context state).
        device / dtype: where and in what precision the model runs ("bfloat16", "float32", ...).
        max_length: context limit of a non-recurrent model (default: its max_position_embeddings).
        max_gen_toks: default generation budget when a task does not give one.
        segment_len: tokens per forward when a recurrent model reads a long text.
    """

    def __init__(self, pretrained: str | nn.Module, tokenizer: Any = None, batch_size: int | str = 1,
                 device: str = "cpu", dtype: str | torch.dtype | None = "float32", max_length: int | None = None,
                 max_gen_toks: int = 256, segment_len: int = 2048, trust_remote_code: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            log.warning("qwerky lm-eval model ignores arguments: %s", ", ".join(sorted(kwargs)))
        if isinstance(pretrained, nn.Module):
            if tokenizer is None:
                raise ValueError("pass tokenizer= together with a model instance")
            self.model = pretrained.eval()
        else:
            self.model = load_model(pretrained, device=device, dtype=dtype, trust_remote_code=bool(trust_remote_code))
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer or pretrained, trust_remote_code=bool(trust_remote_code))
        self.tokenizer = tokenizer
        self._device = next(self.model.parameters()).device
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self.recurrent = is_recurrent(self.model)
        self._max_length = int(max_length) if max_length else (max_positions(self.model) or 2048)
        self._max_gen_toks = int(max_gen_toks)
        self.segment_len = int(segment_len)
        self._eos = eos_ids(self.model, tokenizer)

    # -- properties lm-eval reads ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        return int(self._eos[0]) if self._eos else 0

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def _read_batch(self, contexts: Sequence[Sequence[int]]) -> tuple[Any, torch.Tensor, nn.Module]:
        """Read several contexts into one state (left-padded, padding masked so it never enters the state).

        Returns the state (row r = contexts[r], each at its own position), the last real token's hidden
        state per row [R, 1, C] and the head module.
        """
        width = max(len(c) for c in contexts)
        pad = self.eot_token_id
        ids = torch.tensor([[pad] * (width - len(c)) + list(c) for c in contexts], device=self.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=self.device)
        state = self.model.init_state(len(contexts))
        hidden = head = None
        for s in range(0, width, self.segment_len):
            m = mask[:, s:s + self.segment_len]
            hidden, head, _ = hidden_states(self.model, ids[:, s:s + self.segment_len], state=state,
                                            attention_mask=None if bool(m.all()) else m)
        assert hidden is not None and head is not None
        return state, hidden[:, -1:], head

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              override_bs: int | None = None, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) per request.

        Recurrent models: each distinct context is read once (whole, never truncated; contexts batched
        with masked left padding), then its continuations are scored from copies of that state, right-padded
        (the copies are discarded afterwards, so padding after the last real token changes nothing).
        """
        if not self.recurrent:
            return self._loglikelihood_tokens_full(requests, disable_tqdm, override_bs)
        from qwerky.modeling.state_cache import QwerkyState

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if cont:
                groups[tuple(ctx)].append(i)
            else:
                results[i] = (0.0, True)
        bs = override_bs or self.batch_size
        contexts = sorted(groups, key=len, reverse=True)  # similar lengths together: less padding
        for c0 in tqdm(range(0, len(contexts), bs), disable=disable_tqdm or self.rank != 0,
                       desc="qwerky loglikelihood"):
            batch = contexts[c0:c0 + bs]
            state, last, head = self._read_batch(batch)
            first = head_logits(self.model, head, last)[:, 0].log_softmax(-1)  # [R, V]: continuation token 0
            pairs = [(row, i) for row, ctx in enumerate(batch) for i in groups[ctx]]
            for p0 in range(0, len(pairs), bs):
                chunk = pairs[p0:p0 + bs]
                conts = [requests[i][2] for _, i in chunk]
                width = max(len(c) for c in conts) - 1
                rest = None
                if width > 0:
                    sub = QwerkyState.stack([state.select([row]) for row, _ in chunk])
                    pad = self.eot_token_id
                    ids = torch.tensor([c[:-1] + [pad] * (width - len(c) + 1) for c in conts], device=self.device)
                    rest, head, _ = hidden_states(self.model, ids, state=sub)
                for r, ((row, i), c) in enumerate(zip(chunk, conts)):
                    lp = first[row:row + 1]
                    if len(c) > 1:
                        assert rest is not None
                        more = head_logits(self.model, head, rest[r:r + 1, :len(c) - 1])[0].log_softmax(-1)
                        lp = torch.cat([lp, more], 0)
                    target = torch.tensor(c, device=lp.device)
                    score = float(lp.gather(-1, target[:, None]).double().sum())
                    greedy = bool((lp.argmax(-1) == target).all())
                    results[i] = (score, greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
        return [r if r is not None else (0.0, True) for r in results]

    @torch.no_grad()
    def _loglikelihood_tokens_full(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool,
                                   override_bs: int | None) -> list[tuple[float, bool]]:
        """HF models: one right-padded parallel forward per batch; context left-truncated to max_length."""
        bs = override_bs or self.batch_size
        out: list[tuple[float, bool]] = []
        for b in tqdm(range(0, len(requests), bs), disable=disable_tqdm or self.rank != 0, desc="loglikelihood"):
            batch = requests[b:b + bs]
            seqs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in batch]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [self.eot_token_id] * (width - len(s)) for s in seqs], device=self.device)
            hidden, head, _ = hidden_states(self.model, ids)
            for r, ((key, _, cont), s) in enumerate(zip(batch, seqs)):
                n = len(cont)
                lp = head_logits(self.model, head, hidden[r:r + 1, len(s) - n:len(s)])[0].log_softmax(-1)
                target = torch.tensor(cont, device=lp.device)
                score = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                out.append((score, greedy))
                self.cache_hook.add_partial("loglikelihood", key, (score, greedy))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text given the prefix token.

        Recurrent models read the whole text in one pass (state carried across `segment_len` pieces):
        every token sees all of its context, no disjoint windows. HF models use lm-eval's rolling windows.
        """
        out: list[float] = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="loglikelihood_rolling"):
            (string,) = req.args
            tokens = [self.prefix_token_id] + self.tok_encode(string)
            if self.recurrent:
                total = self._rolling_recurrent(tokens)
            else:
                total = self._rolling_windows(tokens[1:])
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def _rolling_recurrent(self, tokens: list[int]) -> float:
        stream = Stream(self.model)
        total = 0.0
        for s in range(0, len(tokens) - 1, self.segment_len):
            piece = tokens[s:s + self.segment_len]
            hidden = stream.feed(piece)
            n = min(len(piece), len(tokens) - 1 - s)
            target = torch.tensor(tokens[s + 1:s + 1 + n], device=self.device)
            for a in range(0, n, 512):  # logits 512 positions at a time
                lp = stream.logits(hidden[:, a:min(n, a + 512)])[0].log_softmax(-1)
                total += float(lp.gather(-1, target[a:a + lp.shape[0], None]).double().sum())
        return total

    def _rolling_windows(self, tokens: list[int]) -> float:
        from lm_eval import utils

        windows = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)))
        scores = self._loglikelihood_tokens_full([(None, c, x) for c, x in windows], True, None)
        return float(sum(s for s, _ in scores))

    # -- generation ----------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, one sequence (one state or KV cache) per request, stopped at `until` strings."""
        out: list[str] = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="generate_until"):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature", 1.0) or 0) > 0:
                log.warning("qwerky lm-eval model decodes greedily; ignoring do_sample/temperature")
            prompt = self.tok_encode(context) or [self.prefix_token_id]
            if not self.recurrent and len(prompt) + max_new > self.max_length:
                prompt = prompt[-max(1, self.max_length - max_new):]

            def stop(generated: list[int], _until: list[str] = until) -> bool:
                if not _until:
                    return False
                text = self.tok_decode(generated[-64:]) if len(generated) > 64 else self.tok_decode(generated)
                return any(u in text for u in _until)

            ids = greedy_generate(self.model, prompt, max_new, eos_token_ids=self._eos, stop=stop,
                                  prefill_chunk=self.segment_len)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for u in until:
                if u and u in text:
                    text = text.split(u)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out
