"""How much memory a training stage needs beside the weights, and whether it must checkpoint activations.

Activation memory is measured, not guessed: one student decoder layer runs forward (and backward) on fake
tensors (no memory, no compute) at the stage's micro-batch and length, and the tensors autograd keeps are added
up. The conversion uses it for `train.activation_checkpointing=auto` on a CPU; `qwerky plan` for its estimates.
"""

from __future__ import annotations

import os
from typing import Any

import torch

GiB = 1024**3
# Resident bytes per byte a stage allocates: glibc keeps freed heap pages of a step resident, the more so
# for short-lived buffers (one layer's forward and backward, the KL chunks) than for what lives through the
# step (optimiser state, kept activations, the teacher's records). With every allocation mmapped
# (MALLOC_MMAP_THRESHOLD_) stage 1 at 8 x 512 grew 1.64 GiB, as simulated, but ran 65% slower. The two
# factors are fitted to three SmolLM2-135M runs (docs/cost.md: stage 1 at 8 x 512, stage 2 at 2 x 512 and
# at 8 x 512 checkpointed), which they then match within 5%; they are not validated on other models.
RSS_OVERHEAD_KEPT = 1.15
RSS_OVERHEAD_TRANSIENT = 2.9
# Stages after the first also start with ~0.6 GiB the earlier ones left (1.70-1.74 GiB resident at stage
# 2's start for 1.12 of weights and runtime, after malloc_trim).
RETAINED_GIB = 0.6
RUNTIME_GIB = 0.5  # python + torch + transformers + tokenizer: 0.38 GiB after the imports, 0.47 at stage 1


def saved_bytes(fn: Any, params: Any = ()) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn()` runs, each storage once, leaving out the
    storages of `params` (weights saved for an input gradient are not activations)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    own = {StorageWeakRef(p.untyped_storage()) for p in params}
    seen: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ref = StorageWeakRef(s)
        if ref not in own:
            seen[ref] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class _PeakLive:
    """Peak bytes of the tensors that ops create while `mode` is on and that are alive at once (each storage
    once; tensors made before are not counted). Works on fake tensors, so it simulates without memory."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                tracker.saw(out)
                return out

        self.mode = Mode()
        self.live: dict[Any, int] = {}
        self.peak = 0

    def saw(self, out: Any) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.live.setdefault(StorageWeakRef(st), st.nbytes())
        for ref in [r for r in self.live if r.expired()]:
            del self.live[ref]
        self.peak = max(self.peak, sum(self.live.values()))

    def now(self) -> int:
        for ref in [r for r in self.live if r.expired()]:
            del self.live[ref]
        return sum(self.live.values())


def layer_activations(student: torch.nn.Module, micro: int, T: int, teacher: torch.nn.Module | None = None,
                      logits_chunk: int = 128) -> dict[str, int]:
    """What one step needs beside the weights, simulated on fake tensors (no memory, no compute) at
    [micro, T]; `student` and `teacher` are meta-device skeletons (modified: pass fresh ones). Bytes:

    - "layer": kept for backward by one converted decoder layer, its input needing grad (stages 2-4);
      "layer_peak": that layer's forward + backward at its highest (saved + backward's buffers);
    - "mixer": kept by the mixer alone on an input without grad (stage 1); "mixer_peak" with its backward;
    - "teacher_layer_peak": one teacher decoder layer's forward without grad at its highest;
    - "kl_peak" / "kl_peak_head": the chunked KL of `logits_chunk` positions, its gradient computed in the
      forward (train/losses.py), head frozen / trained."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qwerky.modeling.mixer_attention import AttentionMixer
    from qwerky.modeling.modeling_qwerky import find_decoder_layers
    from qwerky.train.losses import chunked_kl

    cfg = student.config
    converted = [i for i, m in enumerate(student.mixers) if not isinstance(m, AttentionMixer)]
    out = dict.fromkeys(("layer", "layer_peak", "mixer", "mixer_peak", "teacher_layer_peak", "kl_peak",
                         "kl_peak_head"), 0)
    i = converted[1] if len(converted) > 1 else (converted[0] if converted else 0)  # reads the value residual
    layer = find_decoder_layers(student.model, cfg.num_hidden_layers)[i]
    mixer = student.mixers[i]
    C = cfg.hidden_size
    dtype = next(layer.parameters()).dtype

    def peak(fn: Any) -> int:
        tracker = _PeakLive()
        with tracker.mode:
            fn()
        return tracker.peak

    with FakeTensorMode(allow_non_fake_inputs=True):
        layer.to_empty(device="cpu")
        rotary = student.model.rotary_emb.to_empty(device="cpu")
        x = torch.empty(micro, T, C, dtype=dtype)
        rope = rotary(x, torch.arange(T).expand(micro, T))
        student.ctx.v_first = torch.empty(micro, T, cfg.num_heads, cfg.head_dim, dtype=dtype, requires_grad=True)
        layer.requires_grad_(False)
        params = list(layer.parameters())
        if converted:
            mixer.requires_grad_(True)
            out["mixer"] = saved_bytes(lambda: mixer(x, position_embeddings=rope), params)
            out["mixer_peak"] = peak(lambda: mixer(x, position_embeddings=rope)[0].sum().backward())
        xg = torch.empty(micro, T, C, dtype=dtype, requires_grad=True)
        out["layer"] = saved_bytes(lambda: layer(xg, position_embeddings=rope, attention_mask=None), params)
        out["layer_peak"] = peak(lambda: layer(xg, position_embeddings=rope, attention_mask=None).sum().backward())
        student.ctx.v_first = None
        head = student.lm_head.to_empty(device="cpu")
        hidden = torch.empty(micro, T, C, dtype=dtype, requires_grad=True)
        t_hidden = torch.empty(micro, T, C, dtype=dtype)
        for key, trains in (("kl_peak", False), ("kl_peak_head", True)):
            head.requires_grad_(trains)
            hp = [head.weight] if trains else []
            out[key] = peak(lambda hp=hp: chunked_kl(hidden, t_hidden, head, head, logits_chunk, head_params=hp
                                                     ).backward())
        if teacher is not None:
            from qwerky.modeling.modeling_qwerky import find_decoder_layers as layers_of

            base = getattr(teacher, teacher.base_model_prefix)
            t_layer = layers_of(base, teacher.config.num_hidden_layers)[0].to_empty(device="cpu")
            t_rot = base.rotary_emb.to_empty(device="cpu")
            t_rope = t_rot(x, torch.arange(T).expand(micro, T))
            with torch.no_grad():
                out["teacher_layer_peak"] = peak(lambda: t_layer(x, position_embeddings=t_rope, attention_mask=None))
    return out


def cpu_activation_bytes(stage: int, spec: Any, acts: dict[str, int], layers: int, converted: int, hidden: int,
                         checkpointing: bool) -> dict[str, float]:
    """A CPU stage's memory beside the weights at its micro-batch (fp32), by part; `acts`: `layer_activations`.

    Stage 1 (stages.Stage1.step): the teacher's records (each converted layer's attention input and output)
    stay for the step; then either the teacher's forward (one layer at a time) or the mixers (the
    value-residual source's graph waits; one other mixer's forward and backward). Stages 2-4: every layer's
    kept activations (or, checkpointed, every layer's input and one layer recomputed), then the teacher's
    forward, the KL chunk by chunk, or the backward through one layer, at their highest."""
    act = 4 * spec_micro(spec) * spec.seq_len * hidden  # one [micro, T, hidden] fp32 tensor
    if stage == 1:
        return {"teacher_records": 2 * converted * act,
                "transient": max(acts["teacher_layer_peak"], acts["mixer"] + acts["mixer_peak"])}
    kept = layers * act if checkpointing else layers * acts["layer"]
    layer_extra = acts["layer_peak"] if checkpointing else acts["layer_peak"] - acts["layer"]
    kl = acts["kl_peak_head"] if stage >= 3 else acts["kl_peak"]
    # the student's final hidden states stay through the teacher's forward (its stream beside one layer) and
    # the KL (the teacher's final hidden states beside it)
    return {"layers": kept, "transient": act + max(acts["teacher_layer_peak"] + act, kl + act, layer_extra)}


def spec_micro(spec: Any, ranks: int = 1) -> int:
    return max(1, spec.micro_batch_size or max(1, spec.batch_size // ranks))


def auto_checkpointing(stage: int, spec: Any, acts: dict[str, int], layers: int, ram_bytes: float) -> bool:
    """train.activation_checkpointing=auto on a CPU: checkpoint stage 2-4 layers when keeping every layer's
    activations would take more than a quarter of the machine's memory (recomputing costs about a quarter
    more time: SmolLM2-135M stage 2, 22.2 s vs 18.3 s CPU per 2 x 512 tokens; memory 2.7 vs 6.2 GiB)."""
    return stage > 1 and layers * acts["layer"] * RSS_OVERHEAD_KEPT > ram_bytes / 4


def stage_needs_checkpointing(student_config: Any, stage: int, spec: Any, ram_bytes: float | None = None
                              ) -> tuple[bool, str]:
    """The `auto` decision for one CPU stage of a student with this config, and a line saying why."""
    from qwerky.modeling.modeling_qwerky import QwerkyForCausalLM

    if stage == 1:
        return False, "stage 1 bounds its memory per mixer"
    ram = ram_bytes or machine_ram_bytes()
    with torch.device("meta"):
        skeleton = QwerkyForCausalLM(student_config)
    acts = layer_activations(skeleton, spec_micro(spec), spec.seq_len)
    layers = student_config.num_hidden_layers
    need = layers * acts["layer"] * RSS_OVERHEAD_KEPT
    on = auto_checkpointing(stage, spec, acts, layers, ram)
    return on, (f"every layer's activations at {spec_micro(spec)} x {spec.seq_len} tokens would take "
                f"{need / GiB:.1f} GiB, {'over' if on else 'under'} a quarter of this machine's "
                f"{ram / GiB:.0f} GiB")


def machine_ram_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GiB
