"""The window student for vLLM: qwerky's `mixer_window.WindowMixer` (exact softmax over the last W tokens
plus S sink tokens, plus an RWKV-7 branch for everything older) with all of it as fixed-size state.

State per layer (vLLM allocates it like any linear-attention state; memory per sequence is bounded):
the branch's S [H, D, D] (fp32), the window ring of keys/values [W, Hk, D] with their positions [W],
and the sink keys/values [S, Hk, D] with their positions [S] (positions int32, -1 = empty slot). These
are qwerky's own cache layout (`ops_window.empty_cache`), so the softmax part runs qwerky's
`window_attention` per request, exactly as `qwerky serve` and HF generate() run it. Key/value heads
(and the key offset) shard over tensor-parallel ranks like the teacher's KV heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.utils import set_weight_attrs

from qwerky.modeling.mixer_rwkv7 import balanced_key, delta_rule_terms, removal_key, rwkv7_log_decay
from qwerky.modeling.mixer_window import WindowOptions
from qwerky.modeling.ops_window import empty_cache, window_attention
from qwerky.vllm.layer import head_sharded, state_dtype
from qwerky.vllm.ops import PackedBatch, run_packed, rwkv7_packed
from qwerky.vllm.rwkv7 import RWKV7TimeMix

CACHE_KEYS = ("k", "v", "kpos", "sk", "sv", "spos")  # state tensors 1.. in this order (sinks only when S > 0)


def _options(config) -> WindowOptions:
    return WindowOptions.parse(getattr(config, "mixer_options", None) or {}, where="window mixer_options")


class WindowTimeMix(RWKV7TimeMix):
    def __init__(self, config, layer_idx: int, first_layer: bool, vllm_config, prefix: str) -> None:
        super().__init__(config, layer_idx, first_layer, vllm_config, prefix)
        opts = _options(config)
        self.window_size, self.num_sinks, self.branch_rope = opts.window_size, opts.num_sinks, opts.branch_rope
        self.scaling = config.attention_scaling
        self.window_scale = head_sharded(self.num_heads, self.dtype)
        self.branch_gate = head_sharded(self.num_heads * self.head_dim, self.dtype)
        self.key_offset = None
        if opts.branch_center_keys:
            self.key_offset = nn.Parameter(torch.empty(self.kv_size, dtype=self.dtype), requires_grad=False)
            set_weight_attrs(self.key_offset, {"weight_loader": self._load_kv_sharded})

    def _load_kv_sharded(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """A per-KV-head vector: this rank's KV heads (replicated ranks share a shard, as in QKVParallelLinear)."""
        total_kv = self.config.num_kv_heads
        replicas = max(1, self.tp // total_kv)
        shard = get_tensor_model_parallel_rank() // replicas
        param.data.copy_(loaded.view(total_kv, self.head_dim)[shard * self.num_kv_heads:
                                                              (shard + 1) * self.num_kv_heads].reshape(-1))

    @classmethod
    def state_shapes(cls, config, tp: int) -> tuple[tuple[int, ...], ...]:
        opts = _options(config)
        H, Hk, D = config.num_heads // tp, max(1, config.num_kv_heads // tp), config.head_dim
        W, S = opts.window_size, opts.num_sinks
        shapes = [(H, D, D), (W, Hk, D), (W, Hk, D), (W,)]
        if S > 0:
            shapes += [(S, Hk, D), (S, Hk, D), (S,)]
        return tuple(shapes)

    @classmethod
    def state_dtypes(cls, config, vllm_config) -> tuple[torch.dtype, ...]:
        dt = vllm_config.model_config.dtype
        dtypes = [state_dtype(vllm_config), dt, dt, torch.int32]
        if _options(config).num_sinks > 0:
            dtypes += [dt, dt, torch.int32]
        return tuple(dtypes)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, v_first: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        N, H, D = x.shape[0], self.num_heads, self.head_dim
        r0, k0, v0 = self.project(x)  # normed, not rotated; k/v with their own (KV) heads
        r, k = self.rotate(positions, r0, k0)
        r_b, k_b = r0, k0
        if self.key_offset is not None:  # centred before any rotation: the offset is a mean unrotated key
            k_b = k_b - self.key_offset
        if self.branch_rope:
            r_b, k_b = self.rotate(positions, r_b, k_b)
        k_b, v = self.expand_kv(k_b), self.expand_kv(v0)
        log_w = rwkv7_log_decay(self.decay_base + self.decay_lora(x)).view(N, H, D)
        a = torch.sigmoid(self.iclr_base + self.iclr_lora(x)).view(N, H, D)
        kappa = removal_key(k_b)
        inputs = [r.reshape(N, H, D), k.reshape(N, self.num_kv_heads, D), v0.reshape(N, self.num_kv_heads, D),
                  positions, r_b.reshape(N, H, D), log_w, balanced_key(k_b, log_w, a), v,
                  *delta_rule_terms(kappa, a)]
        both = self.run_state_update(inputs, x.new_empty(N, 2, H, D))
        local, branch = both[:, 0], both[:, 1]
        y = (local * self.window_scale[None, :, None]).reshape(N, H * D)
        y = y + self.branch_gate * branch.reshape(N, H * D) * (1 + self.gate_lora(x))
        out, _ = self.output(y)
        return out, v_first

    def state_update(self, inputs: Sequence[torch.Tensor], out: torch.Tensor, batch: PackedBatch) -> None:
        q, k, v, pos = inputs[:4]
        out[:batch.num_tokens, 1] = rwkv7_packed(*inputs[4:], self.kv_cache[0], batch, scale=self.head_dim**-0.5,
                                  backend=self.backend)
        buffers = self.kv_cache[1:]
        names = CACHE_KEYS[:len(buffers)]

        def step(xs: Sequence[torch.Tensor], s0: Sequence[torch.Tensor] | None, cu_seqlens: None):
            if s0 is None:  # a new request: empty window and sinks
                cache = empty_cache(xs[0].shape[0], self.num_kv_heads, self.head_dim, self.window_size,
                                    self.num_sinks, buffers[0].dtype, buffers[0].device)
            else:  # qwerky's layout: positions as int64
                cache = {name: t.long() if name.endswith("pos") else t for name, t in zip(names, s0)}
            o = window_attention(xs[0], xs[1], xs[2], xs[3].long(), self.scaling, self.window_size, self.num_sinks,
                                 cache=cache)
            return o, [cache[name] for name in names]

        # the softmax part is qwerky's per-request window_attention over the ring (no varlen form): its
        # prefills run one request at a time; the RWKV-7 branch above runs as one packed pass
        run_packed(step, (q, k, v, pos), buffers, batch, out[:, 0], varlen=False)


LAYER = WindowTimeMix  # the layer qwerky.vllm.supported_mixers() finds for mixer 'window'
