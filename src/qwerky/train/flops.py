"""Model FLOPs of a training step, counted analytically from the module trees (no timing, no tracing).

One FLOP is a multiply or an add: a matmul of [m, k] by [k, n] costs 2mkn. Only matmuls are counted (the
linear layers, attention's two T x T products, the chunked recurrences' batched products and triangular
solve); elementwise work (norms, activations, softmax, RoPE, the KL itself) is not, so "achieved FLOP/s"
compares directly with the machine's dense matmul rate.

Per token, at training length T, with H query heads of size D:

    linear layer      2 * (weight elements)                      (biases are adds: not counted)
    teacher attention 2 * attention-projection weights + 4 * H * D * (T + 1) / 2   (causal QK^T and AV)
    MLP               2 * MLP weights (everything linear in the decoder layer outside attention)
    LM head           2 * hidden * vocab
    mixer             2 * mixer linear weights + core(mixer, T)  (core: see `mixer_core_flops`)

A step runs (executed FLOPs = forward + backward + recomputation):

    stage 1  teacher layers forward (no head: stage 1 never computes logits)
             + converted mixers forward + backward (2x forward)
             + the mixers' forward again if they are recomputed in backward (activation checkpointing)
             (+ the student's other layers forward when stage 1 runs through the student's own forward,
              as it does under FSDP2: `stage1_student_forward`)
    stage 2  teacher forward + teacher head, student forward + head,
             backward: mixers 2x forward; the frozen layers and the head that the gradient passes through
             1x forward (input gradients only), from the first converted layer up
             + recomputation: the student's layers from the first converted one (per-layer checkpointing),
               and the head once more (the chunked KL recomputes each chunk's student logits)
    stage 3  as 2, with every layer trained (2x forward in backward, the head too); with LoRA on the MLPs
             the MLPs' backward is 1x (input gradients; the adapters are small and not counted)
    stage 4  as 3; with loss "ce" there is no teacher

The backward convention (2x forward for what trains, 1x for frozen parts the gradient crosses) is the usual
one for model FLOPs; autograd skips a few input gradients it does not need (the stage-1 mixers' input
comes from the teacher), so backward counts are an upper bound by a few percent.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

RWKV7_CHUNK = 64  # chunk sizes of the PyTorch forms in modeling/ops_*.py
GATED_DELTANET_CHUNK = 64
RWKV6_CHUNK = 16
WINDOW_BLOCK = 256  # modeling/ops_window.window_attention's query block


def _padded(T: int, chunk: int) -> float:
    """Tokens actually processed per real token when T is padded to whole chunks."""
    return math.ceil(T / chunk) * chunk / T


def rwkv7_core(T: int, heads: int, head_dim: int, chunk: int = RWKV7_CHUNK) -> float:
    """FLOPs per token of `chunk_rwkv7_torch` (K = V = D, chunk c). Per chunk and head, in multiply-adds:
    four c x c x D products (A_ab, A_ak, P_b, P_k), A_ak v, the triangular solve with 2D right-hand sides
    (c^2 D), Q, R (2), i.e. 9 c^2 D; the chunk transition T_n, E_n (3 c D^2) and the output Q S_0 (c D^2);
    the state step D^3. Per token: 9 c D + 4 D^2 + D^3 / c."""
    c, D = chunk, head_dim
    return 2 * heads * (9 * c * D + 4 * D * D + D**3 / c) * _padded(T, c)


def gated_deltanet_core(T: int, heads: int, head_dim: int, chunk: int = GATED_DELTANET_CHUNK) -> float:
    """`chunk_gated_delta_rule_torch`: k k^T, the solve (2D columns, c^2 D), q k^T, P W, P U (5 c^2 D per
    chunk); T_n, E_n and the output (3 c D^2); the state step D^3. Per token: 5 c D + 3 D^2 + D^3 / c."""
    c, D = chunk, head_dim
    return 2 * heads * (5 * c * D + 3 * D * D + D**3 / c) * _padded(T, c)


def rwkv6_core(T: int, heads: int, head_dim: int, chunk: int = RWKV6_CHUNK) -> float:
    """`chunk_rwkv6_torch`: r k^T and A v (2 c^2 D per chunk), E_n and the output (2 c D^2). Per token:
    2 c D + 2 D^2 (the state step is elementwise)."""
    c, D = chunk, head_dim
    return 2 * heads * (2 * c * D + 2 * D * D) * _padded(T, c)


def softmax_core(keys_per_query: float, heads: int, head_dim: int) -> float:
    """QK^T and AV for one query over `keys_per_query` keys."""
    return 4 * heads * head_dim * keys_per_query


def window_keys(T: int, window: int, sinks: int, block: int = WINDOW_BLOCK) -> float:
    """Keys per query that `window_attention` computes: every key up to 2 blocks (one masked T x T product),
    beyond that each block of queries against its own block, the window before it and the sinks."""
    if T <= 2 * block:
        return float(T)
    return min(T, block + window - 1 + sinks)


def mixer_core_flops(mixer: str, T: int, heads: int, head_dim: int, options: dict[str, Any] | None = None) -> float:
    """FLOPs per token of a mixer's sequence-mixing part (everything but its linear layers), as its
    PyTorch form runs on CPU. An unknown (user-registered) mixer counts 0 here: its linear layers still count."""
    options = options or {}
    if mixer in ("rwkv7", "arwkv7"):
        return rwkv7_core(T, heads, head_dim)
    if mixer == "gated_deltanet":
        return gated_deltanet_core(T, heads, head_dim)
    if mixer == "rwkv6":
        return rwkv6_core(T, heads, head_dim)
    if mixer == "window":
        keys = window_keys(T, int(options.get("window_size", 64)), int(options.get("num_sinks", 4)))
        return softmax_core(keys, heads, head_dim) + rwkv7_core(T, heads, head_dim)
    if mixer == "attention":  # a kept attention layer in the student: one masked T x T product
        return softmax_core(T, heads, head_dim)
    return 0.0


def linear_weights(module: nn.Module) -> int:
    """Weight elements of every nn.Linear inside `module` (shared weights once)."""
    seen, total = set(), 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


@dataclass
class FlopModel:
    """Per-layer weight counts of a teacher and its student; everything `step_flops` needs."""

    hidden: int
    vocab: int
    heads: int
    head_dim: int
    attention: list[int]  # per layer: the teacher attention's projection weights
    mlp: list[int]  # per layer: the rest of the decoder layer's linear weights (same in the student)
    mixers: list[int]  # per layer: the student's mixer linear weights there (a kept layer: its attention's)
    converted: list[bool]  # per layer: a recurrent mixer (True) or kept attention (False)
    mixer: str = "rwkv7"
    mixer_options: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return len(self.attention)

    @classmethod
    def from_models(cls, teacher: nn.Module, student: nn.Module) -> FlopModel:
        """Count from the module trees (real or on the meta device)."""
        from qwerky.modeling.mixer_attention import AttentionMixer
        from qwerky.modeling.modeling_qwerky import find_decoder_layers
        from qwerky.surgery.families import inspect_teacher

        layout = inspect_teacher(teacher)
        attention, mlp = [], []
        for layer in layout.layers:
            attn = linear_weights(getattr(layer, layout.attention_name))
            attention.append(attn)
            mlp.append(linear_weights(layer) - attn)
        cfg = student.config
        s_layers = find_decoder_layers(student.model, cfg.num_hidden_layers)
        mixers = [linear_weights(getattr(layer, cfg.attention_name)) for layer in s_layers]
        converted = [not isinstance(m, AttentionMixer) for m in student.mixers]
        head = teacher.get_output_embeddings()
        return cls(hidden=cfg.hidden_size, vocab=head.weight.shape[0], heads=cfg.num_heads, head_dim=cfg.head_dim,
                   attention=attention, mlp=mlp, mixers=mixers, converted=converted, mixer=cfg.mixer,
                   mixer_options=dict(cfg.mixer_options or {}))

    # --- per token, forward ---
    def head(self) -> float:
        return 2.0 * self.hidden * self.vocab

    def teacher_layer(self, i: int, T: int) -> float:
        return 2.0 * (self.attention[i] + self.mlp[i]) + softmax_core((T + 1) / 2, self.heads, self.head_dim)

    def teacher_forward(self, T: int, head: bool = True) -> float:
        return sum(self.teacher_layer(i, T) for i in range(self.layers)) + (self.head() if head else 0.0)

    def mixer_forward(self, i: int, T: int) -> float:
        kind = self.mixer if self.converted[i] else "attention"
        return 2.0 * self.mixers[i] + mixer_core_flops(kind, T, self.heads, self.head_dim, self.mixer_options)

    def student_layer(self, i: int, T: int) -> float:
        return self.mixer_forward(i, T) + 2.0 * self.mlp[i]

    def student_forward(self, T: int, head: bool = True) -> float:
        return sum(self.student_layer(i, T) for i in range(self.layers)) + (self.head() if head else 0.0)

    def first_converted(self) -> int:
        return next((i for i, c in enumerate(self.converted) if c), self.layers)

    def step_flops(self, stage: int, T: int, loss: str = "kl", lora: bool = False, recompute_layers: bool = False,
                   recompute_head: bool = True, recompute_mixers: bool = False,
                   stage1_student_forward: bool = False) -> dict[str, float]:
        """FLOPs per training token of one stage, by part; "total" is what runs (recomputation included),
        "model" leaves recomputation out. See the module docstring for what each stage runs."""
        L = range(self.layers)
        conv = [i for i in L if self.converted[i]]
        parts: dict[str, float] = {}
        if stage == 1:
            mix = sum(self.mixer_forward(i, T) for i in conv)
            parts["teacher_forward"] = self.teacher_forward(T, head=False)
            parts["student_forward"] = mix
            if stage1_student_forward:  # the student's own layers run (no grad) around the mixers
                parts["student_forward"] += sum(self.student_layer(i, T) for i in L if i not in conv)
                parts["student_forward"] += sum(2.0 * self.mlp[i] for i in conv)
            parts["student_backward"] = 2 * mix
            parts["recompute"] = mix if recompute_mixers else 0.0
        else:
            first = self.first_converted() if stage == 2 else 0
            grad_layers = [i for i in L if i >= first]
            parts["teacher_forward"] = 0.0 if loss == "ce" else self.teacher_forward(T, head=True)
            parts["student_forward"] = self.student_forward(T, head=True)
            back = 0.0
            for i in grad_layers:
                mixer_trains = stage >= 3 or self.converted[i]
                back += (2 if mixer_trains else 1) * self.mixer_forward(i, T)
                back += (2 if stage >= 3 and not lora else 1) * 2.0 * self.mlp[i]
            back += (2 if stage >= 3 else 1) * self.head()
            parts["student_backward"] = back
            recompute = self.head() if recompute_head else 0.0
            if recompute_layers:
                recompute += sum(self.student_layer(i, T) for i in grad_layers)
            parts["recompute"] = recompute
        parts["model"] = parts["teacher_forward"] + parts["student_forward"] + parts["student_backward"]
        parts["total"] = parts["model"] + parts["recompute"]
        return parts

    def eval_flops(self, T: int) -> float:
        """Per token of held-out evaluation: teacher and student forward with their heads."""
        return self.teacher_forward(T) + self.student_forward(T)


def matmul_gflops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5, budget_s: float = 10.0,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """This CPU's dense fp32 matmul rate at the current thread count: the median over `repeats` timed torch.mm
    of n x n by n x n for each size (after one warm-up), the best size's median, in GFLOP/s. Stops early when
    `budget_s` is spent. `clock=time.process_time` gives the rate per CPU second of this process instead."""
    best, start = 0.0, time.perf_counter()
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        rates = []
        for _ in range(repeats):
            t = clock()
            torch.mm(a, b)
            rates.append(2 * n**3 / max(clock() - t, 1e-9) / 1e9)
            if time.perf_counter() - start > budget_s and rates:
                break
        best = max(best, statistics.median(rates))
        if time.perf_counter() - start > budget_s:
            break
    return best
