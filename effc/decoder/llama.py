"""A Llama-family decoder written out in torch over an explicit static KV cache, for export to ONNX.

The module takes its weights from a ``transformers`` ``LlamaForCausalLM`` and computes one chunk of ``T`` tokens
(prefill: ``T = P``; decode: ``T = 1``). Every reshape names the token axis ``-1`` and nothing reads a shape, so
the exported graph is the same for every ``T``: effc runs its passes once on the chunk graph and derives the
one-token graph from it (:func:`effc.ir.decoder.specialize_tokens`).

Inputs (the graph's, in order):
    ``input_ids`` int64 ``(1, T)``; ``positions`` int64 ``(1, T)`` (absolute positions, for RoPE);
    ``attn_mask`` float32 ``(T, S + T)``: additive mask over the ``S`` cache slots then the ``T`` new tokens
    (0 = attend, ``MASKED`` = do not); then per layer ``i`` its cache (read only): ``past_key.i`` float32
    ``(Hkv, D, S)`` (keys transposed) and ``past_value.i`` float32 ``(Hkv, S, D)``
    (:func:`effc.ir.decoder.kv_layout`).
Outputs:
    ``logits`` float32 ``(1, T, V)``; then per layer the chunk's keys ``key.i`` ``(Hkv, D, T)`` (RoPE applied) and
    values ``value.i`` ``(Hkv, T, D)``, which the runtime writes into its cache at the chunk's positions.

Source: the Llama architecture (Touvron et al. 2023, "LLaMA"; RMSNorm, rotary embeddings of Su et al.
"RoFormer", SwiGLU of Shazeer "GLU Variants Improve Transformer", grouped-query attention of Ainslie et al.
"GQA") as implemented by ``transformers.models.llama``.
"""

from __future__ import annotations

import dataclasses

import torch

#: Additive mask value for positions a query must not attend to (finite: -inf rows would be NaN under fast-math).
MASKED = -1.0e9


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The static shape of a decoder and its cache.

    Attributes:
        layers, hidden, heads, kv_heads, head_dim, ffn, vocab: the architecture.
        max_cache: cache slots ``S`` (the longest context: prompt plus generated tokens).
        chunk: tokens per prefill call ``P``.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_cache: int
    chunk: int

    def kv_bytes_per_token(self) -> int:
        """fp32 bytes of keys and values one token adds to the cache (all layers)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * 4


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticLlama(torch.nn.Module):
    """Llama forward over one chunk of tokens and a read-only static KV cache (see the module docstring).

    Weights are stored ``(in, out)`` so each linear layer exports as ``MatMul(x, W)`` with a constant ``W``
    (reduction along axis 0); the embedding is kept once as the tied output projection ``(hidden, vocab)`` and
    looked up along axis 1.
    """

    def __init__(self, hf_model, max_cache: int, chunk: int):
        super().__init__()
        cfg = hf_model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.shape = DecoderShape(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                                  cfg.num_key_value_heads, head_dim, cfg.intermediate_size, cfg.vocab_size,
                                  int(max_cache), int(chunk))
        self.eps = float(cfg.rms_norm_eps)
        inner = hf_model.model
        t = lambda w: torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=False)  # noqa: E731
        keep = lambda w: torch.nn.Parameter(w.detach().clone(), requires_grad=False)  # noqa: E731
        self.embed_tokens = t(inner.embed_tokens.weight)  # (hidden, vocab), also the tied output projection
        self.norm = keep(inner.norm.weight)
        self.layers = torch.nn.ModuleList()
        for layer in inner.layers:
            block = torch.nn.Module()
            block.self_attn, block.mlp = torch.nn.Module(), torch.nn.Module()
            for part, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                (block.mlp, ("gate_proj", "up_proj", "down_proj"))):
                source = getattr(layer, "self_attn" if part is block.self_attn else "mlp")
                for name in names:
                    setattr(part, name, t(getattr(source, name).weight))
            block.input_layernorm = keep(layer.input_layernorm.weight)
            block.post_attention_layernorm = keep(layer.post_attention_layernorm.weight)
            self.layers.append(block)
        cos, sin = _rope_tables(hf_model, self.shape.max_cache + self.shape.chunk, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def forward(self, input_ids, positions, attn_mask, *cache):
        s = self.shape
        group = s.heads // s.kv_heads
        x = torch.index_select(self.embed_tokens, 1, input_ids.reshape(-1)).t()  # (T, hidden)
        pos = positions.reshape(-1)
        cos, sin = torch.index_select(self.cos, 0, pos), torch.index_select(self.sin, 0, pos)  # (T, D)
        scale = s.head_dim ** -0.5
        new = []
        for block, past_k, past_v in zip(self.layers, cache[0::2], cache[1::2], strict=True):
            attn, mlp = block.self_attn, block.mlp
            h = self._rms(x, block.input_layernorm)
            q = (h @ attn.q_proj).reshape(-1, s.heads, s.head_dim).transpose(0, 1)  # (H, T, D)
            k = (h @ attn.k_proj).reshape(-1, s.kv_heads, s.head_dim).transpose(0, 1)  # (Hkv, T, D)
            v = (h @ attn.v_proj).reshape(-1, s.kv_heads, s.head_dim).transpose(0, 1)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kt = k.transpose(-1, -2)  # (Hkv, D, T): keys as the cache stores them
            new += [kt, v]
            # Scores against the cache and against the chunk are computed apart and joined (small), so the
            # cached keys and values are never copied into a concatenated (S + T) tensor.
            qg = q.reshape(s.kv_heads, group, -1, s.head_dim)  # (Hkv, G, T, D): head = kv_head * G + g
            scores = torch.cat((torch.matmul(qg, past_k.unsqueeze(1)),
                                torch.matmul(qg, kt.unsqueeze(1))), dim=-1)  # (Hkv, G, T, S + T)
            probs = torch.softmax(scores * scale + attn_mask, dim=-1)
            ctx = (torch.matmul(probs[..., :s.max_cache], past_v.unsqueeze(1))
                   + torch.matmul(probs[..., s.max_cache:], v.unsqueeze(1)))  # (Hkv, G, T, D)
            ctx = ctx.reshape(s.heads, -1, s.head_dim).transpose(0, 1).reshape(-1, s.hidden)
            x = x + ctx @ attn.o_proj
            h = self._rms(x, block.post_attention_layernorm)
            x = x + (torch.nn.functional.silu(h @ mlp.gate_proj) * (h @ mlp.up_proj)) @ mlp.down_proj
        logits = self._rms(x, self.norm) @ self.embed_tokens  # (T, V)
        return (logits.unsqueeze(0), *new)


def _rope_tables(hf_model, length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(length, head_dim)`` from the model's own rotary embedding (its scaling rules included)."""
    rotary = hf_model.model.rotary_emb
    positions = torch.arange(length, dtype=torch.int64).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    return cos[0].float().contiguous(), sin[0].float().contiguous()
