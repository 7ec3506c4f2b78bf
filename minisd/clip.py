"""CLIP's text transformer, SD 1.x's text encoder (OpenAI's ViT-L/14 text tower), written out. The modules carry
transformers' CLIPTextModel names (`embeddings.token_embedding`, `encoder.layers.N.self_attn.q_proj`, ...), so its
files, and LoRA files that target it, load as they are; transformers is the reference the tests compare it with.

    ids (B, T) -> token + position embeddings -> N x [x + attn(ln1(x)), causal; x + mlp(ln2(x))] -> final LN
SD 1.x conditions the U-Net on the last hidden state, all 77 positions (no pooling, no projection)."""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CLIPTextConfig:
    """The shape of a CLIP text encoder; the defaults are SD 1.x's (ViT-L/14). The names are the keys of
    transformers' text_encoder/config.json."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # SD 2.x's OpenCLIP-H uses "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # CLIPTextModelWithProjection's; unused here, kept so a written config is complete
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    @classmethod
    def from_dict(cls, d):
        """The fields of a config.json that this class has; the rest (dropout, initializers, ...) do not change the
        forward pass of a trained model."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's approximation of GELU
               "gelu": F.gelu}


def embedding(n, width, std=0.02):
    """nn.Embedding(n, width) drawn from a uniform with transformers' std for CLIP instead of nn.Embedding's N(0, 1):
    on the meta device (minisd.load builds the model there) normal_ runs a Python kernel that imports torch._dynamo,
    about a second of every fresh process; uniform_'s kernel does not."""
    bound = std * 3 ** 0.5  # U(-b, b) has std b / sqrt(3)
    return nn.Embedding(n, width, _weight=torch.empty(n, width).uniform_(-bound, bound))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = embedding(cfg.max_position_embeddings, cfg.hidden_size)  # learned, absolute

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[:ids.shape[1]]  # (B, T, C)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention (a token sees itself and the tokens before it)."""

    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.num_attention_heads
        width = cfg.hidden_size
        self.k_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, width)  # transformers' order
        self.q_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, heads, T, C / heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q k^T / sqrt(C / heads)) v
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """A pre-norm transformer layer."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    """ids (B, T) of at most max_position_embeddings tokens -> the last hidden state (B, T, hidden_size)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or CLIPTextConfig()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {cfg.hidden_act!r}: CLIP's text encoders use one of {sorted(ACTIVATIONS)}")
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @property
    def device(self):
        return self.embeddings.token_embedding.weight.device

    def forward(self, ids):
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))
