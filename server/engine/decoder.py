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

A mixture-of-experts layer (Qwen3-VL's A3B and A22B checkpoints) keeps HF's own sparse block
for its MLP: its router and experts run through transformers' grouped_mm experts (rows sorted
by expert, one grouped product per projection; no host sync where grouped_mm is one kernel,
see LoadedModel.experts_sync_free), already the fused form.

Only steps whose every row is a generated token take it: such a token sits at the same
position on all three multimodal-rope axes, so the rope is the plain one, and no media or
DeepStack features are added. Everything else (prompts, media, bitsandbytes weights, rope
scalings) stays on HF's forward. On the CPU the two give the same logits, bit for bit in
bfloat16 (tests/engine/test_decoder.py, every family); on a GPU the fused products may
take other GEMM kernels than the separate ones, so bf16 logits can differ in the last bit.

A layer is functions of tensors (`attention_inputs`, then `attention_output_and_mlp`, or
`attention_output_and_norm` before a sparse block) around its KV writes and attention;
`--compile-decoder` hands them to torch.compile (`compiled`, `warm_up`), which fuses their
elementwise work into about half as many kernels again.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.engine import attention
from server.engine.kv_cache import PagedKVCache

logger = logging.getLogger(__name__)

SILU_MODULES = ("SiLU", "SiLUActivation")  # torch's and transformers' (hidden_act "silu")


@dataclass
class FusedLayer:
    """One layer's weights as the fused math reads them (HF's own tensors, or views of their
    concatenation): tensors and plain values only, so one compiled function serves every layer."""

    input_norm: torch.Tensor  # RMSNorm weights
    post_norm: torch.Tensor
    input_eps: float
    post_eps: float
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3-VL normalises each head's query and key
    k_norm: torch.Tensor | None
    q_eps: float
    k_eps: float
    o_proj: torch.Tensor
    o_bias: torch.Tensor | None
    # A dense MLP's weights (None in a mixture-of-experts layer: FusedDecoder.sparse_mlps).
    gate_up: torch.Tensor | None  # [2 * intermediate, hidden]
    down: torch.Tensor | None
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor] | None


class FusedDecoder:
    def __init__(self, model: nn.Module, layers: list[FusedLayer]):
        text = model.model.language_model
        # HF's sparse block of each mixture-of-experts layer, run as it is (None: dense).
        self.sparse_mlps = [layer.mlp if _is_sparse(layer.mlp) else None for layer in text.layers]
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
        # A layer is these around its attention (and its experts); compiled() swaps in
        # compiled versions.
        self.attention_inputs = attention_inputs
        self.attention_output_and_mlp = attention_output_and_mlp
        self.attention_output_and_norm = attention_output_and_norm
        self.is_compiled = False
        self._mark_batch_dynamic = False

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

    def compiled(self) -> FusedDecoder:
        """This decoder with its per-layer functions compiled by torch.compile (Inductor
        fuses each norm, the rope, silu * up and the residual adds into single kernels: about
        half a layer's kernels again); compile it with warm_up before use. Elementwise math in
        float32 inside a fused kernel rounds bf16 once, where HF rounds after each operation:
        logits may differ in the last bits."""
        if any(layer.act not in (F.silu, None) for layer in self.layers):
            # (a module per layer would be guarded by identity: a compile per layer)
            raise ValueError("only SiLU layers compile")
        compiled = copy.copy(self)
        compiled.attention_inputs = torch.compile(attention_inputs)
        compiled.attention_output_and_mlp = torch.compile(attention_output_and_mlp)
        # (HF's experts stay eager: transformers' grouped_mm compiles in bfloat16 only.)
        compiled.attention_output_and_norm = torch.compile(attention_output_and_norm)
        compiled.is_compiled = True
        return compiled

    def warm_up(self, step: Callable[[int], object]) -> None:
        """Compile a compiled() decoder by running `step(num_rows)`, a decode step through it:
        two rows with the batch dimension marked dynamic (one compile for every batch of two
        or more, every other dimension fixed: the model's shapes, the kernels made for them),
        then one row (a batch of one is always its own compile)."""
        self._mark_batch_dynamic = True
        try:
            step(2)
        finally:
            self._mark_batch_dynamic = False
        step(1)

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
        heads, kv_heads = self.num_heads, self.num_kv_heads
        marking = self._mark_batch_dynamic  # (warm_up's first step: what compiles sees)
        for index, layer in enumerate(self.layers):
            if marking:
                _mark_batch_dynamic(hidden, cos, sin)
            queries, keys, values = self.attention_inputs(hidden, layer, cos, sin, heads, kv_heads)
            key_cache, value_cache = cache.keys[index], cache.values[index]
            key_cache[meta.slot_mapping] = keys
            value_cache[meta.slot_mapping] = values
            attended = attention.attend_decodes(queries, key_cache, value_cache, meta, self.scaling)
            if marking:
                _mark_batch_dynamic(attended)
            if (experts := self.sparse_mlps[index]) is None:
                hidden = self.attention_output_and_mlp(hidden, attended, layer)
            else:  # HF's sparse block takes [batch, tokens, hidden]
                hidden, normed = self.attention_output_and_norm(hidden, attended, layer)
                hidden = hidden + experts(normed[None])[0]
        return _norm(hidden, self.final_norm.weight, self.final_norm.variance_epsilon)

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


def attention_inputs(
    hidden: torch.Tensor,
    layer: FusedLayer,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's queries [n, heads, dim], keys and values [n, kv_heads, dim] for its input
    hidden states [n, hidden]: the input norm, one q/k/v product, the rope on q and k."""
    n = hidden.shape[0]
    qkv = F.linear(_norm(hidden, layer.input_norm, layer.input_eps), layer.qkv, layer.qkv_bias)
    dim = qkv.shape[1] // (heads + 2 * kv_heads)
    qk = qkv[:, : (heads + kv_heads) * dim].view(n, heads + kv_heads, dim)
    values = qkv[:, (heads + kv_heads) * dim :].view(n, kv_heads, dim)
    if layer.q_norm is not None and layer.k_norm is not None:
        queries = _norm(qk[:, :heads], layer.q_norm, layer.q_eps)
        keys = _norm(qk[:, heads:], layer.k_norm, layer.k_eps)
        qk = torch.cat((queries, keys), dim=1)
    half = dim // 2
    qk = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin
    return qk[:, :heads], qk[:, heads:], values


def attention_output_and_mlp(
    hidden: torch.Tensor, attended: torch.Tensor, layer: FusedLayer
) -> torch.Tensor:
    """The rest of a dense layer from its attention's output [n, heads, dim]: the output
    projection and its residual, the post-attention norm, the MLP and its residual."""
    hidden, normed = attention_output_and_norm(hidden, attended, layer)
    gate, up = F.linear(normed, layer.gate_up).chunk(2, dim=-1)
    return hidden + F.linear(layer.act(gate) * up, layer.down, layer.down_bias)


def attention_output_and_norm(
    hidden: torch.Tensor, attended: torch.Tensor, layer: FusedLayer
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output projection and its residual, and the post-attention norm of that: the MLP's
    input."""
    hidden = hidden + F.linear(attended.reshape(hidden.shape[0], -1), layer.o_proj, layer.o_bias)
    return hidden, _norm(hidden, layer.post_norm, layer.post_eps)


def _mark_batch_dynamic(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        torch._dynamo.mark_dynamic(tensor, 0)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Qwen RMSNorm, rounding included, in two kernels: rms_norm normalises in float32
    and rounds to the input's dtype (as HF's casts do), then the weight scales it."""
    return weight * F.rms_norm(x, x.shape[-1:], eps=eps)


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
    except AttributeError as exc:  # a model laid out otherwise than the families
        return f"unexpected layer structure ({exc})"
    return None


def _unsupported_layer(layer: nn.Module) -> str | None:
    attn, mlp = layer.self_attn, layer.mlp
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    if _is_sparse(mlp):
        experts = [mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj]
        if any(type(p) is not nn.Parameter for p in experts):
            return "quantized or wrapped experts"
    else:
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
    if not _is_sparse(mlp) and (mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None):
        return "gate/up biases"  # none of the families has them
    return None


def _is_sparse(mlp: nn.Module) -> bool:
    """A mixture-of-experts block (a router `gate` and `experts`), not a dense MLP."""
    return hasattr(mlp, "experts")


def _fuse_layer(layer: nn.Module) -> FusedLayer:
    attn, mlp = layer.self_attn, layer.mlp
    qkv, qkv_bias = _concatenate([attn.q_proj, attn.k_proj, attn.v_proj])
    sparse = _is_sparse(mlp)
    gate_up = None if sparse else _concatenate([mlp.gate_proj, mlp.up_proj])[0]
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return FusedLayer(
        input_norm=layer.input_layernorm.weight,
        post_norm=layer.post_attention_layernorm.weight,
        input_eps=layer.input_layernorm.variance_epsilon,
        post_eps=layer.post_attention_layernorm.variance_epsilon,
        qkv=qkv,
        qkv_bias=qkv_bias,
        q_norm=None if q_norm is None else q_norm.weight,
        k_norm=None if k_norm is None else k_norm.weight,
        q_eps=0.0 if q_norm is None else q_norm.variance_epsilon,
        k_eps=0.0 if k_norm is None else k_norm.variance_epsilon,
        o_proj=attn.o_proj.weight,
        o_bias=attn.o_proj.bias,
        gate_up=gate_up,
        down=None if sparse else mlp.down_proj.weight,
        down_bias=None if sparse else mlp.down_proj.bias,
        act=None if sparse else _activation(mlp.act_fn),
    )


def _activation(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """F.silu for either SiLU module (what both run): one function for every layer, which a
    compile guards on."""
    return F.silu if type(act).__name__ in SILU_MODULES else act


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
