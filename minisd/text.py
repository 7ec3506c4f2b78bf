"""Text conditioning: prompts -> minisd.tokenizer's ids -> minisd.clip's text encoder (SD 1.x uses its last hidden
state), and prompts as webui reads them."""
import re
import warnings
from dataclasses import asdict

import torch

from .checkpoint import load_strict
from .clip import CLIPTextConfig, CLIPTextModel


def clip_config_from_weights(sd):
    """The CLIPTextConfig that fits a text-encoder state dict (SD 1.x: ViT-L/14's text tower, heads of width 64)."""
    vocab, width = sd["embeddings.token_embedding.weight"].shape
    # a count of the layers present: a hostile index asks for no more
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                          num_attention_heads=width // 64,
                          intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                          max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
                          hidden_act="quick_gelu", projection_dim=width)


def normalize_clip_keys(sd):
    """Released and transformers 4.x files carry a `text_model.` level and a `position_ids` buffer; minisd's
    CLIPTextModel (as transformers 5's) has neither."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    sd.pop("embeddings.position_ids", None)
    return sd


def released_clip_state_dict(model, dtype):
    """minisd's CLIPTextModel's tensors in the layout of the released SD 1.x files (openai/clip-vit-large-patch14, SD 1.4's
    text_encoder/): every name under `text_model.`, plus the int64 position_ids row (0..76) those files carry.
    transformers 4.x needs the `text_model.` level (without it every tensor loads as "newly initialized"); 4.x and
    5.x both read this layout, position_ids included."""
    sd = {"text_model." + k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    n = model.config.max_position_embeddings
    return {**sd, "text_model.embeddings.position_ids": torch.arange(n, dtype=torch.int64)[None]}


def released_clip_config(config, dtype):
    """config.json as the released SD 1.x text_encoder/ writes it (transformers 4.x and 5.x read it): the model's
    shape, and transformers' defaults for what only its training reads."""
    training = {"attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02}
    fields = sorted({**training, **asdict(config)}.items())  # in the released file's order
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dict(fields),
            "torch_dtype": str(dtype).removeprefix("torch.")}


def build_text_encoder(sd, path, config=None):
    sd = normalize_clip_keys(sd)
    config = config or clip_config_from_weights(sd)
    with torch.device("meta"):  # the file must fit the model before that is allocated (a few kB could ask for GBs);
        model = CLIPTextModel(config).eval()  # no time spent on random init: every weight is assigned from the file
    load_strict(model, sd, path, "text encoder")
    return model


def encode_prompts(tokenizer, text_encoder, prompts, run=None):
    """list of str -> (B, 77, width): padded to the model's length with the pad token (CLIP's: end-of-text), cut
    beyond it (with a warning that says how many tokens were dropped). run(ids) -> last hidden state, if given,
    runs the model (the speed layer's encode_text: from a CUDA graph)."""
    prompts, n = list(prompts), tokenizer.model_max_length
    rows = tokenizer.encode(prompts, special_tokens=False)
    for prompt, row in zip(prompts, rows):
        if len(row) + 2 > n:  # with the start and end tokens
            warnings.warn(f"prompt longer than {n} tokens, the last {len(row) + 2 - n} dropped: {prompt[:60]!r}...",
                          stacklevel=2)
    ids = tokenizer.pad(rows)
    return run(ids) if run else text_encoder(ids.to(text_encoder.device))


# Prompts as AUTOMATIC1111's webui reads them (its modules/prompt_parser.py and sd_hijack_clip.py, re-derived):
# emphasis brackets, BREAK, and prompts of any length in chunks of 75 tokens.
EMPHASIS = re.compile(r"""
    \\[\\()\[\]]                            # an escaped bracket or backslash: the literal character
  | \\                                      # a lone backslash (dropped)
  | [(\[]                                   # opening brackets
  | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)     # ':1.2)' closes a round bracket with that weight
  | [)\]]                                   # closing brackets
  | [^\\()\[\]:]+                           # text
  | :                                       # a colon that is text
""", re.X)
BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(prompt):
    """A prompt -> [(text, weight)]; text None is a BREAK (the next text starts a new chunk).
    (text) multiplies the weight by 1.1, [text] by 1/1.1, (text:w) by w; nested brackets multiply; \\( \\) \\[ \\]
    and \\\\ are literal characters. Brackets still open at the end close there; a closing bracket with nothing
    open is text. Neighbouring pieces of equal weight are joined (they are tokenized together, as webui does)."""
    parts, opened = [], {"(": [], "[": []}  # [text, weight]; where each open bracket's span starts in parts

    def scale(start, factor):
        for part in parts[start:]:
            part[1] *= factor

    for m in EMPHASIS.finditer(prompt):
        token, weight = m[0], m[1]
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token in opened:
            opened[token].append(len(parts))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), float(weight))
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), 1.1)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(BREAK.split(token)):
                parts += [[None, 1.0], [piece, 1.0]] if i else [[piece, 1.0]]
    for start in opened["("]:
        scale(start, 1.1)
    for start in opened["["]:
        scale(start, 1 / 1.1)
    joined = []
    for text, weight in parts:
        if joined and text is not None and joined[-1][0] is not None and joined[-1][1] == weight:
            joined[-1][0] += text
        else:
            joined.append([text, weight])
    return [tuple(p) for p in joined] or [("", 1.0)]


def weighted_tokens(tokenizer, prompt):
    """A prompt -> [(token id, weight)] without start and end tokens; (None, 1.0) at each BREAK."""
    parts = parse_emphasis(prompt)
    texts = [text for text, _ in parts if text is not None]
    ids = iter(tokenizer.encode(texts, special_tokens=False))
    return [item for text, weight in parts
            for item in ([(None, 1.0)] if text is None else [(i, weight) for i in next(ids)])]


def chunked(tokens, comma, length=75, backtrack=20):
    """[(id, weight)] -> chunks of at most `length`. A BREAK ends a chunk. A full chunk whose last comma is at most
    `backtrack` tokens back ends after that comma instead, the words after it moving to the next chunk (webui's
    comma_padding_backtrack, 20 by default); not when the token that overflows is itself a comma."""
    chunks, current = [], []
    for token, weight in tokens:
        if token is None:
            chunks.append(current)
            current = []
            continue
        if len(current) == length:
            commas = [i for i, (t, _) in enumerate(current) if t == comma]
            cut = commas[-1] + 1 if token != comma and commas and length - commas[-1] <= backtrack else length
            chunks.append(current[:cut])
            current = current[cut:]
        current.append((token, weight))
    return chunks + [current] if current or not chunks else chunks


def emphasize(z, weights):
    """webui's "Original" emphasis: each token's hidden state times its weight, then the prompt's chunk rescaled to
    the mean it had before (z (B, 77, C), weights (B, 77)). Rows of weight 1 stay exactly as they are."""
    plain = (weights == 1).all(1)
    if plain.all():
        return z
    zf = z.float()
    weighted = zf * weights[..., None]
    weighted = weighted * (zf.mean((1, 2), keepdim=True) / weighted.mean((1, 2), keepdim=True))
    return torch.where(plain[:, None, None], zf, weighted).to(z.dtype)


def encode_weighted_prompts(tokenizer, text_encoder, prompts, run=None):
    """list of str -> (B, 77 k, width), as webui encodes prompts: emphasis (parse_emphasis), and the tokens in chunks
    of 75 (chunked), each encoded on its own as start + tokens + end + padding and weighted (emphasize), the chunks'
    hidden states concatenated. Prompts with fewer chunks get empty-prompt chunks (webui pads a batch so; between a
    prompt and its negative prompt that is its "pad prompt/negative prompt to be same length" option). A plain
    prompt of up to 75 tokens gives exactly encode_prompts' result. run(ids): as in encode_prompts."""
    n = tokenizer.model_max_length
    comma = tokenizer.token_id(",</w>")
    per_prompt = [chunked(weighted_tokens(tokenizer, p), comma, n - 2) for p in prompts]
    out = []
    for k in range(max(len(c) for c in per_prompt)):
        rows = [c[k] if k < len(c) else [] for c in per_prompt]
        ids = tokenizer.pad([[t for t, _ in r] for r in rows])
        weights = torch.tensor([[1.0] + [w for _, w in r] + [1.0] * (n - 1 - len(r)) for r in rows])
        z = run(ids) if run else text_encoder(ids.to(text_encoder.device))
        out.append(emphasize(z, weights.to(z.device)))
    return torch.cat(out, dim=1)
