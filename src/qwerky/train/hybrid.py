"""Which layers a hybrid keeps as the teacher's attention, chosen on held-out text after stage 1.

After stage 1 every mixer has learnt to imitate its own attention block. The choice is greedy on the
quantity that matters, the KL(teacher || model) of the model with every other layer converted: first the
one layer whose keeping lowers that KL most, then, with it kept, the next, and so on (K steps, L - s
candidates at step s): it scores what is kept, not a proxy. Ranking layers one at a time (the cost of
converting layer i alone) can miss how layers interact; measured so far the two agreed whenever stage 1
had trained the mixers (docs/evaluation.md). That one-at-a-time cost is still measured and reported,
and the curve K = 0, 1, 2, ... compares the greedy choice, the one-at-a-time ranking and a random choice
of the same K, priced in memory per sequence at 8k tokens.

All of it runs on the teacher with forward hooks (a mixer's output in place of its attention block's),
so no model is rebuilt to score a choice; once chosen, `rebuild_as_hybrid` builds the hybrid student and
moves the trained mixers into it through an explicit key map.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qwerky.eval.models import head_logits, hidden_states
from qwerky.surgery.families import inspect_teacher

MEMORY_AT = 8192  # the context at which the curve prices memory per sequence


def parse_keep_attention(text: str, num_layers: int | None = None) -> int | None:
    """"auto:K" -> K (None for ""); raises ValueError naming the form."""
    if not text:
        return None
    head, _, k = text.partition(":")
    if head != "auto" or not k.isdigit():
        raise ValueError(f"keep_attention must be auto:K (e.g. auto:2), got {text!r}")
    if num_layers is not None and int(k) >= num_layers:
        raise ValueError(f"keep_attention={text}: the teacher has {num_layers} layers; keep fewer than all")
    return int(k)


@contextmanager
def converted(teacher: nn.Module, mixers: dict[int, nn.Module]) -> Iterator[None]:
    """Within the block, the teacher's attention in layer i is replaced by `mixers[i]` (parallel form)."""
    layout = inspect_teacher(teacher)

    def fresh_pass(module: nn.Module, args: tuple) -> None:  # RWKV-7's value residual starts anew per forward
        for m in mixers.values():
            m.ctx.v_first = None

    handles = [getattr(teacher, teacher.base_model_prefix).register_forward_pre_hook(fresh_pass)]
    for i, mixer in mixers.items():
        attention = getattr(layout.layers[i], layout.attention_name)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, mixer: nn.Module = mixer) -> Any:
            x = kwargs.get("hidden_states", args[0] if args else None)
            y, _ = mixer(x, position_embeddings=kwargs.get("position_embeddings"))
            return (y, *output[1:]) if isinstance(output, tuple) else y

        handles.append(attention.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _kl_top1(teacher: nn.Module, windows: torch.Tensor, reference: list[torch.Tensor], batch_size: int
             ) -> tuple[float, float]:
    kl, agree, count = 0.0, 0, 0
    for j, b0 in enumerate(range(0, windows.shape[0], batch_size)):
        x = windows[b0:b0 + batch_size]
        h, head, _ = hidden_states(teacher, x)
        logp = head_logits(teacher, head, h[:, :-1]).float().log_softmax(-1)
        ref = reference[j]
        kl += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
        agree += int((logp.argmax(-1) == ref.argmax(-1)).sum())
        count += ref.shape[0] * ref.shape[1]
    return kl / count, agree / count


@torch.no_grad()
def _reference(teacher: nn.Module, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    out = []
    for b0 in range(0, windows.shape[0], batch_size):
        h, head, _ = hidden_states(teacher, windows[b0:b0 + batch_size])
        out.append(head_logits(teacher, head, h[:, :-1]).float().log_softmax(-1))
    return out


class HybridScorer:
    """score(keep) = (KL, top-1) of the teacher with every layer not in `keep` replaced by its mixer (in eval
    mode), on held-out windows, against the teacher's own logits computed once for all the scores."""

    def __init__(self, teacher: nn.Module, mixers: Sequence[nn.Module], windows: torch.Tensor,
                 batch_size: int = 4) -> None:
        self.teacher, self.mixers, self.batch_size = teacher, list(mixers), batch_size
        self.windows = windows.to(next(teacher.parameters()).device)
        self.reference = _reference(teacher, self.windows, batch_size)

    def __call__(self, keep: set[int]) -> tuple[float, float]:
        was = [m.training for m in self.mixers]
        for m in self.mixers:
            m.eval()
        try:
            with converted(self.teacher, {i: m for i, m in enumerate(self.mixers) if i not in keep}):
                return _kl_top1(self.teacher, self.windows, self.reference, self.batch_size)
        finally:
            for m, w in zip(self.mixers, was):
                m.train(w)


def layer_costs(teacher: nn.Module, mixers: Sequence[nn.Module], windows: torch.Tensor, batch_size: int = 4,
                scorer: HybridScorer | None = None) -> list[float]:
    """KL of the teacher with only layer i converted, for every layer i (mixers[i] is layer i's)."""
    scorer = scorer or HybridScorer(teacher, mixers, windows, batch_size)
    every = set(range(len(mixers)))
    return [scorer(every - {i})[0] for i in range(len(mixers))]


def choose(costs: Sequence[float], k: int) -> list[int]:
    """The k layers whose conversion alone costs the most, sorted (the one-at-a-time ranking)."""
    return sorted(sorted(range(len(costs)), key=lambda i: -costs[i])[:k])


def greedy_search(n: int, k: int, score: Callable[[set[int]], tuple[float, float]]) -> list[dict[str, Any]]:
    """Keep layers one at a time, each time the one whose keeping gives the lowest score(kept) = (KL, top-1);
    one entry per step: the kept layers so far, their KL / top-1, and every candidate's KL."""
    kept: list[int] = []
    steps = []
    for _ in range(k):
        trials = {cand: score(set(kept) | {cand}) for cand in range(n) if cand not in kept}
        best = min(trials, key=lambda i: trials[i][0])
        kept.append(best)
        steps.append({"layers": sorted(kept), "added": best, "kl": trials[best][0], "top1": trials[best][1],
                      "candidates": {str(i): kl for i, (kl, _) in trials.items()}})
    return steps


def greedy_choice(teacher: nn.Module, mixers: Sequence[nn.Module], windows: torch.Tensor, k: int,
                  batch_size: int = 4, scorer: HybridScorer | None = None) -> list[dict[str, Any]]:
    """`greedy_search` scored on the teacher: KL / top-1 with every layer not kept replaced by its mixer."""
    return greedy_search(len(mixers), k, scorer or HybridScorer(teacher, mixers, windows, batch_size))


def curve(teacher: nn.Module, mixers: Sequence[nn.Module], windows: torch.Tensor, costs: Sequence[float],
          bytes_per_token_per_layer: float, state_bytes_per_layer: float, seed: int = 0, batch_size: int = 4,
          greedy: Sequence[dict[str, Any]] = (), scorer: HybridScorer | None = None) -> list[dict[str, Any]]:
    """KL / top-1 for K = 0..L-1 kept layers: the one-at-a-time ranking ("ranked"), K random layers
    ("random") and, for the K the greedy search reached, its choice ("auto"; K = 0 is the all-converted
    model); memory per sequence at MEMORY_AT tokens (kept layers: KV cache; converted ones: their state)."""
    n = len(mixers)
    scorer = scorer or HybridScorer(teacher, mixers, windows, batch_size)
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        row: dict[str, Any] = {"keep": k, "memory_bytes_at_8k": k * bytes_per_token_per_layer * MEMORY_AT
                               + (n - k) * state_bytes_per_layer}
        for name, kept in (("ranked", choose(costs, k)), ("random", sorted(rng.sample(range(n), k)))):
            kl, top1 = scorer(set(kept))
            row[name] = {"layers": kept, "kl": kl, "top1": top1}
        if k == 0:
            row["auto"] = dict(row["ranked"])
        elif k <= len(greedy):
            step = greedy[k - 1]
            row["auto"] = {"layers": step["layers"], "kl": step["kl"], "top1": step["top1"]}
        rows.append(row)
    return rows


def choose_hybrid(teacher: nn.Module, student: Any, windows: torch.Tensor, k: int, seed: int) -> dict[str, Any]:
    """After stage 1: the k layers to keep, chosen greedily; the one-at-a-time costs and the curve for every K
    (the report's hybrid section)."""
    student.eval()
    mixers = list(student.mixers)
    scorer = HybridScorer(teacher, mixers, windows)  # the teacher's reference logits once, for every score
    costs = layer_costs(teacher, mixers, windows, scorer=scorer)
    cfg = student.config
    kv_per_token = 2 * cfg.num_kv_heads * cfg.head_dim * next(teacher.parameters()).element_size()
    state = mixers[0].init_state(1, "cpu")
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    greedy = greedy_choice(teacher, mixers, windows, k, scorer=scorer)
    rows = curve(teacher, mixers, windows, costs, kv_per_token, state_bytes, seed=seed, greedy=greedy,
                 scorer=scorer)
    return {"keep": k, "layers": greedy[-1]["layers"] if greedy else [], "method": "greedy", "greedy": greedy,
            "costs": costs, "curve": rows, "memory_context": MEMORY_AT}


def hybrid_key_map(old: Any, new: Any, layers: list[int]) -> dict[str, str]:
    """{new student key: old student key} for every mixer weight of the layers that stay converted.

    Raises when a trained mixer weight of those layers has no place in the new student, or a new mixer weight
    has no source: nothing is dropped or left untrained silently. Two things go on purpose: the mixers of
    `layers` (replaced by attention), and the value-residual mix of a layer that becomes the first converted
    one (RWKV-7's `v_first` source: it has no such mix)."""
    def layer_of(key: str) -> int:
        return int(key.split(".layers.")[1].split(".")[0])

    attn = f".{old.config.attention_name}."

    def mixer_keys(model: Any, skip: list[int]) -> dict[str, torch.Size]:
        return {key: value.shape for key, value in model.state_dict().items()
                if ".layers." in key and attn in key and layer_of(key) not in skip}

    def first_layers(model: Any) -> set[int]:
        return {m.layer_idx for m in model.mixers if getattr(m, "first_layer", False)}

    old_keys, new_keys = mixer_keys(old, layers), mixer_keys(new, layers)
    key_map = {key: key for key in new_keys if key in old_keys}
    now_first = first_layers(new) - first_layers(old)
    first_has = {k.split(attn, 1)[1] for k in mixer_keys(old, []) if layer_of(k) in first_layers(old)}

    def by_design(key: str) -> bool:  # a weight only a layer after the value-residual source has
        return layer_of(key) in now_first and key.split(attn, 1)[1] not in first_has

    dropped = sorted(k for k in set(old_keys) - set(key_map.values()) if not by_design(k))
    unfilled = sorted(set(new_keys) - set(key_map))
    wrong = sorted(k for k, src in key_map.items() if new_keys[k] != old_keys[src])
    if dropped or unfilled or wrong:
        raise RuntimeError(f"hybrid rebuild: trained weights without a place {dropped[:4]}, new weights without a "
                           f"source {unfilled[:4]}, shapes that differ {wrong[:4]}")
    return key_map


def rebuild_as_hybrid(old: Any, teacher: nn.Module, convert_kwargs: dict[str, Any], layers: list[int]) -> Any:
    """A new student (surgery with `convert_kwargs`) keeping `layers` as the teacher's attention, with the other
    mixers as stage 1 left them (loaded strictly through `hybrid_key_map`)."""
    from qwerky.surgery import convert_teacher, unshare_from_teacher

    new = convert_teacher(teacher, **{**convert_kwargs, "attention_layers": layers})
    unshare_from_teacher(new, teacher, modules=new.mixers)  # loading below must not write into the teacher
    trained = old.state_dict()
    state = new.state_dict()
    for key, src in hybrid_key_map(old, new, layers).items():
        state[key] = trained[src]
    new.load_state_dict(state, strict=True)
    return new
