"""Model shapes for memory budgets and plans: published presets and custom shapes.

``Model(name, n_layers, d_model, n_heads, n_kv_heads, d_ff, vocab, mlp="swiglu", head_dim=0)``.
Parameters per layer (h = d_model, f = d_ff, q = n_heads · head_dim (h unless ``head_dim`` is given),
k = n_kv_heads · head_dim):

    "swiglu" (Llama: no biases)   q, o: 2hq   k, v: 2hk   gate, up, down: 3hf   2 RMSNorms: 2h
    "gelu"   (GPT: biases)        qkv: 3hq + 3q   proj: qh + h   fc1, fc2: 2hf + f + h   2 LayerNorms: 4h

plus the embedding (V·h), an untied output layer (V·h, Llama) and the final norm (h; 2h for a LayerNorm).
At f = 4h a GPT layer has 12h² + 13h parameters.

Under tensor parallelism of size t (Megatron): the projections are split over t, the norms and the
row layers' biases are replicated, the embedding and output layer are split over the vocabulary;
K and V heads are split over min(t, n_kv_heads) ranks and replicated beyond (t > n_kv_heads).
"""

from __future__ import annotations

from dataclasses import dataclass

from .presets import preset


@dataclass(frozen=True)
class Model:
    """A decoder-only transformer's shape."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab: int
    mlp: str = "swiglu"  # "swiglu" (Llama) or "gelu" (GPT)
    tied_embeddings: bool = False
    head_dim: int = 0  # 0: d_model // n_heads; set it for models whose heads x head_dim != d_model
    source: str = ""

    def __post_init__(self) -> None:
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"model {self.name!r}: mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        sizes = {k: getattr(self, k) for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab")}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes.values()) or self.head_dim < 0:
            raise ValueError(f"model {self.name!r}: sizes must be integers >= 1, got {sizes}, head_dim={self.head_dim}")
        if self.n_heads % self.n_kv_heads or (not self.head_dim and self.d_model % self.n_heads):
            raise ValueError(f"model {self.name!r}: d_model={self.d_model}, n_heads={self.n_heads} and "
                             f"n_kv_heads={self.n_kv_heads} must divide (d_model by n_heads unless head_dim is given, "
                             f"n_heads by n_kv_heads)")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)

    @property
    def q_dim(self) -> int:
        """Width of the query (and attention output) projection: n_heads · head_dim."""
        return self.n_heads * self.head_dim

    def layer_parameters(self, t: int = 1) -> float:
        """Parameters of one layer held by one of ``t`` tensor-parallel ranks."""
        h, f, q, kv = self.d_model, self.d_ff, self.q_dim, self.n_kv_heads * self.head_dim
        if self.mlp == "swiglu":
            return (2 * h * q + 3 * h * f) / t + 2 * h * kv / min(t, self.n_kv_heads) + 2 * h
        return (4 * h * q + 3 * q + 2 * h * f + f) / t + 2 * h + 4 * h  # row biases and LayerNorms replicated

    def other_parameters(self, t: int = 1) -> float:
        """Embedding, output layer and final norm held by one of ``t`` ranks (vocabulary-parallel)."""
        matrices = (1 if self.tied_embeddings else 2) * self.vocab * self.d_model
        return matrices / t + (self.d_model if self.mlp == "swiglu" else 2 * self.d_model)

    def parameters(self, t: int = 1) -> float:
        """All parameters held by one of ``t`` tensor-parallel ranks (t = 1: the model's size)."""
        return self.n_layers * self.layer_parameters(t) + self.other_parameters(t)


# Llama 3 (Meta, "The Llama 3 Herd of Models", 2024, Table 3; params.json of the released weights):
# 8B: 32 layers, d 4096, 32 heads, 8 K/V heads, FFN 14336; 70B: 80 layers, d 8192, 64 heads, 8 K/V,
# FFN 28672; 405B: 126 layers, d 16384, 128 heads, 8 K/V heads, FFN 53248; vocabulary 128256; untied output layer.
LLAMA3 = "Llama 3 paper, Table 3 (https://arxiv.org/abs/2407.21783); params.json of the released weights"
MODELS: dict[str, Model] = {
    "llama3-8b": Model("Llama 3 8B", 32, 4096, 32, 8, 14336, 128256, source=LLAMA3),
    "llama3-70b": Model("Llama 3 70B", 80, 8192, 64, 8, 28672, 128256, source=LLAMA3),
    "llama3-405b": Model("Llama 3 405B", 126, 16384, 128, 8, 53248, 128256, source=LLAMA3),
}


def model(spec: Model | str) -> Model:
    """A ``Model`` as is, or a preset by its key in ``MODELS``."""
    return spec if isinstance(spec, Model) else preset(MODELS, spec, "model")
