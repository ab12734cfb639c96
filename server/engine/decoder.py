"""The text decoder for steps of generated tokens only: HF's math in fewer kernels.

A decode step through HF's modules launches about 45 kernels per layer (each RMSNorm is eight,
the rotary embedding ten, q/k/v three matrix products, gate/up two). That launch count, not
the weights' memory traffic, bounds an eager step, and it is still ~1,250 tiny kernels a
replayed CUDA graph runs one after another. `FusedDecoder` computes the same layers from the
same weights with about half as many:

- q/k/v as one matrix product and gate/up as one: the checkpoint's weights are concatenated
  once at start-up and HF's modules are given views into the concatenation (no second copy;
  prefills keep using HF's modules, now on those views);
- each RMSNorm as torch's rms_norm (one fused kernel on CUDA, float32 inside, HF's rounding)
  and the weight's product;
- the rotary embedding computed once per step and applied to queries and keys together, with
  the sign of rotate_half folded into the sine;
- attention straight on the decode kernel when the step's decodes are its rows in order.

Only steps whose every row is a generated token take it: such a token sits at the same
position on all three multimodal-rope axes, so the rope is the plain one, and no media or
DeepStack features are added. Everything else (prompts, media, bitsandbytes weights, rope
scalings) stays on HF's forward. On the CPU the two give the same logits, bit for bit in
bfloat16 (tests/engine/test_decoder.py, all three families); on a GPU the fused products may
take other GEMM kernels than the separate ones, so bf16 logits can differ in the last bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.engine import attention
from server.engine.kv_cache import PagedKVCache

logger = logging.getLogger(__name__)


@dataclass
class FusedLayer:
    input_norm: nn.Module  # HF's RMSNorm modules: their weights and epsilons
    post_norm: nn.Module
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o_proj: nn.Linear
    q_norm: nn.Module | None  # Qwen3-VL normalises each head's query and key
    k_norm: nn.Module | None
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    act: nn.Module
    down: nn.Linear


class FusedDecoder:
    def __init__(self, model: nn.Module, layers: list[FusedLayer]):
        text = model.model.language_model
        self.embed_tokens = text.embed_tokens
        self.final_norm = text.norm
        self.inv_freq = text.rotary_emb.inv_freq
        self.rope_scaling = text.rotary_emb.attention_scaling
        attn = text.layers[0].self_attn
        config = model.config.text_config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.layers = layers

    @classmethod
    def build(cls, model: nn.Module) -> FusedDecoder | None:
        """The fused decoder over `model`'s text layers (once per model: its weights are
        concatenated in place), or None where it would not compute what HF's forward does."""
        text = model.model.language_model
        built = getattr(text, "_vlm_fused_decoder", None)
        if built is not None:
            return built
        if (why := _unsupported(model)) is not None:
            logger.info("decode steps run HF's text model (%s)", why)
            return None
        # Ordinary tensors even if the caller is in inference mode (inference tensors could not
        # be updated in place later).
        with torch.inference_mode(False), torch.no_grad():
            layers = [_fuse_layer(layer) for layer in text.layers]
        decoder = cls(model, layers)
        text._vlm_fused_decoder = decoder
        return decoder

    def hidden(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: attention.StepMetadata,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        """The last hidden states [n, hidden] of n generated tokens (token_ids [n] at
        positions [n], the same on every rope axis), their keys and values written to their
        slots of `cache`."""
        hidden = self.embed_tokens(token_ids)
        cos, sin = self._rope(positions, hidden.dtype)
        for index, layer in enumerate(self.layers):
            attended = self._attention(
                layer, _norm(hidden, layer.input_norm), cos, sin, meta, cache, index
            )
            hidden = hidden + attended
            hidden = hidden + self._mlp(layer, _norm(hidden, layer.post_norm))
        return _norm(hidden, self.final_norm)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and signed sin [n, 1, head_dim] as HF's rotary embedding computes them for a
        position equal on all axes; the sin's first half negated, so rotate_half(x) * sin is
        swap_halves(x) * signed sin."""
        freqs = positions[:, None].float() * self.inv_freq.float()
        cos = freqs.cos() * self.rope_scaling
        sin = freqs.sin() * self.rope_scaling
        cos = torch.cat((cos, cos), dim=-1).to(dtype)
        sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        return cos[:, None], sin[:, None]

    def _attention(
        self,
        layer: FusedLayer,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: attention.StepMetadata,
        cache: PagedKVCache,
        index: int,
    ) -> torch.Tensor:
        n, heads, kv_heads, dim = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        qk = qkv[:, : (heads + kv_heads) * dim].view(n, heads + kv_heads, dim)
        values = qkv[:, (heads + kv_heads) * dim :].view(n, kv_heads, dim)
        if layer.q_norm is not None:
            queries, keys = _norm(qk[:, :heads], layer.q_norm), _norm(qk[:, heads:], layer.k_norm)
            qk = torch.cat((queries, keys), dim=1)
        half = dim // 2
        qk = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin
        key_cache, value_cache = cache.keys[index], cache.values[index]
        key_cache[meta.slot_mapping] = qk[:, heads:]
        value_cache[meta.slot_mapping] = values
        out = attention.attend_decodes(qk[:, :heads], key_cache, value_cache, meta, self.scaling)
        return layer.o_proj(out.reshape(n, heads * dim))

    def _mlp(self, layer: FusedLayer, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
        return layer.down(layer.act(gate) * up)


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """HF's Qwen RMSNorm, rounding included, in two kernels: rms_norm normalises in float32
    and rounds to the input's dtype (as HF's casts do), then the weight scales it."""
    return norm.weight * F.rms_norm(x, x.shape[-1:], eps=norm.variance_epsilon)


def _unsupported(model: nn.Module) -> str | None:
    """Why the fused decoder would not compute what HF's forward does, or None."""
    try:
        text = model.model.language_model
        config = model.config.text_config
        if getattr(text.rotary_emb, "rope_type", "default") != "default":
            return f"rope type {text.rotary_emb.rope_type}"
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", [])):
            return "sliding-window layers"
        for layer in text.layers:
            if (why := _unsupported_layer(layer)) is not None:
                return why
    except AttributeError as exc:  # a model laid out otherwise than the three families
        return f"unexpected layer structure ({exc})"
    return None


def _unsupported_layer(layer: nn.Module) -> str | None:
    attn, mlp = layer.self_attn, layer.mlp
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if any(type(m) is not nn.Linear or type(m.weight) is not nn.Parameter for m in linears):
        return "quantized or wrapped linear layers"
    modules = [*layer.modules()]
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in modules):
        return "hooks on the layers (offloading?)"  # they would be skipped
    if any(p.device.type == "meta" for p in layer.parameters()):
        return "weights not loaded"
    if len({m.bias is None for m in linears[:3]}) > 1:
        return "q/k/v biases differ"
    if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None:
        return "gate/up biases"  # none of the three families has them
    return None


def _fuse_layer(layer: nn.Module) -> FusedLayer:
    attn, mlp = layer.self_attn, layer.mlp
    qkv, qkv_bias = _concatenate([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up, _ = _concatenate([mlp.gate_proj, mlp.up_proj])
    return FusedLayer(
        layer.input_layernorm,
        layer.post_attention_layernorm,
        qkv,
        qkv_bias,
        attn.o_proj,
        getattr(attn, "q_norm", None),
        getattr(attn, "k_norm", None),
        gate_up,
        mlp.act_fn,
        mlp.down_proj,
    )


def _concatenate(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linears' weights (and biases) as one tensor each; every linear is then given a
    view of its rows, so the memory is not doubled and both paths read the same values."""
    weight = torch.cat([m.weight for m in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([m.bias for m in linears]) if has_bias else None
    start = 0
    for m in linears:
        rows = slice(start, start + m.out_features)
        m.weight = nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[rows], requires_grad=False)
        start += m.out_features
    return weight, bias
