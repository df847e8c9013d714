"""QwerkyForCausalLM for vLLM: the teacher's embeddings, MLPs, norms and head on vLLM's own (tensor-
parallel) layers, with a qwerky mixer layer (`qwerky.vllm.mixer_layer`) in place of attention.

The teacher families served are the llama-like decoders (pre-norm, SiLU-gated MLP, RMSNorm): Qwen2,
Qwen2.5, Qwen3, Llama, Mistral. A fully converted student is attention-free for vLLM (`IsAttentionFree`,
`HasInnerState`): every layer holds a fixed-size state, allocated per request by vLLM from the mixer's
state spec. A hybrid (teacher attention kept in some layers) is a vLLM hybrid model (`IsHybrid`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator, get_temporal_copy_spec
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import (
    HasInnerState,
    IsAttentionFree,
    IsHybrid,
    SupportsMambaPrefixCaching,
)
from vllm.sequence import IntermediateTensors

from qwerky.vllm import mixer_layer
from qwerky.vllm.attention import KeptAttention

SUPPORTED_FAMILIES = ("qwen2", "qwen3", "llama", "mistral")
logger = init_logger("vllm.qwerky")  # under vLLM's "vllm" logger, so its handler prints it
# bf16 weights against fp32, the state fp32 in both: measured on a trained SmolLM2-135M window student over
# held-out text (scripts/vllm_dtype_check.py; docs/vllm.md "Precision")
BF16_MEASURED = ("KL(fp32||bf16) 0.0012 nats/token and top-1 agreement 96.9% over 4,088 held-out tokens "
                 "(a distilled SmolLM2-135M window student)")


def dtype_policy_message(mixer: str, weights: torch.dtype, state: torch.dtype) -> str:
    """The load-time line that says which precision runs and what a 16-bit student's tokens can differ by."""
    name, state_name = (str(d).removeprefix("torch.") for d in (weights, state))
    msg = f"qwerky {mixer} student: weights and activations in {name}, recurrent state in {state_name}"
    if weights == torch.float32:
        return msg + " (greedy tokens equal HF generate() of the folder)"
    return (msg + f". {name} weights are not the fp32 checkpoint: next-token distributions move by about "
            f"{BF16_MEASURED}, so greedy tokens can part from HF generate() after some tokens; pass "
            "dtype='float32' (--dtype float32) for HF-identical tokens")


def _check_config(config) -> None:
    tc = config.teacher_config
    family = getattr(tc, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"qwerky's vLLM plugin serves students of {', '.join(SUPPORTED_FAMILIES)} teachers; this "
                         f"one's teacher is {family!r} (serve it with `qwerky serve`)")
    if getattr(tc, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported MLP activation {tc.hidden_act!r} (silu only)")


class QwerkyMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias=bias,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=bias, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(h))
        return out


class QwerkyDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, first_layer: bool, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tc = config.teacher_config
        eps = getattr(tc, "rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        layer_cls = KeptAttention if layer_idx in config.attention_layers else mixer_layer(config.mixer)
        self.self_attn = layer_cls(config, layer_idx, first_layer, vllm_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.mlp = QwerkyMLP(config.hidden_size, tc.intermediate_size, bool(getattr(tc, "mlp_bias", False)),
                             prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                v_first: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden, v_first = self.self_attn(positions, hidden, v_first)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual, v_first


class QwerkyModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        _check_config(config)
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        kept = set(config.attention_layers)
        first_recurrent = next((i for i in range(config.num_hidden_layers) if i not in kept), None)
        self.layers = nn.ModuleList([
            QwerkyDecoderLayer(config, i, i == first_recurrent, vllm_config, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=getattr(config.teacher_config, "rms_norm_eps", 1e-6))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = v_first = None
        for layer in self.layers:
            hidden, residual, v_first = layer(positions, hidden, residual, v_first)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class _QwerkyCausalLM(nn.Module, HasInnerState, SupportsMambaPrefixCaching):
    """The student for vLLM; the two registered classes below differ only in what vLLM must allocate."""

    packed_modules_mapping = {"rkv_proj": ["receptance", "key", "value"], "qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        self.model = QwerkyModel(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=bool(config.lm_head_bias),
                                      prefix=_join(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        state = mixer_layer(config.mixer).state_dtype_from_config(vllm_config)[0]
        logger.info(dtype_policy_message(config.mixer, vllm_config.model_config.dtype, state))

    # ----- state spec, read by vLLM before the model is built -----
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        return mixer_layer(vllm_config.model_config.hf_config.mixer).state_shape_from_config(vllm_config)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return mixer_layer(vllm_config.model_config.hf_config.mixer).state_dtype_from_config(vllm_config)

    @classmethod
    def get_mamba_state_copy_func(cls):
        """The matrix state S only (the class does not know the mixer); `get_mamba_state_copy_funcs` below,
        which vLLM's runner calls on the built model, covers every state tensor of this folder's mixer."""
        return MambaStateCopyFuncCalculator.linear_attention_state_copy_func()

    def get_mamba_state_copy_funcs(self, mamba_types: set) -> dict:
        """Prefix caching ("align" mode): when a request moves into a new block, vLLM copies its state from
        the previous block's slot with these, one per state tensor. Every tensor of a qwerky layer (S, the
        token-shift row, the window ring and sinks) is the whole state after the block's last token, so each
        is copied whole; vLLM copies only as many tensors as there are functions, so a shorter tuple would
        leave the token shift or the window ring of a cache hit stale."""
        layer_cls = mixer_layer(self.config.mixer)
        n = len(layer_cls.state_shapes(self.config, self.vllm_config.parallel_config.tensor_parallel_size))
        return {mamba_type: (get_temporal_copy_spec,) * n for mamba_type in mamba_types}

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Exported names -> this model; every tensor must find a parameter (or be the tied head)."""
        stacked = [("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]
        layer_cls = mixer_layer(self.config.mixer)
        stacked += layer_cls.stacked_params() + KeptAttention.stacked_params()
        unused = tuple(f".self_attn.{suffix}" for suffix in layer_cls.unused_weights())
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("lm_head.") and self.config.tie_word_embeddings:
                continue
            if unused and name.endswith(unused):  # the teacher's tensors the mixer's graph does not use
                continue
            for target, source, shard in stacked:
                if f".{source}." not in name:
                    continue
                pname = name.replace(f".{source}.", f".{target}.")
                if pname not in params:
                    raise KeyError(f"{name}: no parameter {pname} in the vLLM model")
                param = params[pname]
                param.weight_loader(param, tensor, shard)
                loaded.add(pname)
                break
            else:
                if name not in params:
                    raise KeyError(f"{name}: the exported folder has a tensor the vLLM model does not know")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded


class QwerkyForCausalLM(_QwerkyCausalLM, IsAttentionFree):
    """Every layer converted: a fixed-size state per request and no KV cache. Registered under the
    architecture name every exported folder carries."""


class QwerkyHybridForCausalLM(_QwerkyCausalLM, IsHybrid):
    """Some teacher attention layers kept (`--keep-attention`): vLLM's hybrid path (paged KV cache for the
    kept layers beside the converted layers' states). The config class routes such folders here."""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
