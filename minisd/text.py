"""Text conditioning: transformers' CLIPTextModel and CLIPTokenizer (SD 1.x uses the last hidden state)."""
import warnings

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .checkpoint import CheckpointError, check_fits, load_strict

SD14_TOKENIZER = "openai/clip-vit-large-patch14"


def clip_config_from_weights(sd):
    """The CLIPTextConfig that fits a text-encoder state dict (SD 1.x: ViT-L/14's text tower, heads of width 64)."""
    vocab, width = sd["embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})  # a count: a hostile index asks for no more
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
                          intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                          max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
                          hidden_act="quick_gelu", projection_dim=width)


def normalize_clip_keys(sd):
    """transformers 4.x files carry a `text_model.` level and a `position_ids` buffer; transformers 5 has neither."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    sd.pop("embeddings.position_ids", None)
    return sd


def build_text_encoder(sd, path, config=None):
    sd = normalize_clip_keys(sd)
    config = config or clip_config_from_weights(sd)
    with torch.device("meta"):  # the file must fit the model before that is allocated (a few kB could ask for GBs)
        expected = CLIPTextModel(config).state_dict()
    if any(k.startswith("text_model.") for k in expected):  # transformers 4.x module layout
        sd = {"text_model." + k: v for k, v in sd.items()}
    check_fits({k: v for k, v in expected.items() if not k.endswith("position_ids")}, sd, path, "text encoder")
    with torch.device("meta"):  # no time spent on random init: every weight is assigned from the file
        model = CLIPTextModel(config).eval()
    device = next(iter(sd.values())).device
    position_ids = torch.arange(config.max_position_embeddings, device=device).expand(1, -1)
    for k in expected:  # a persistent position_ids buffer (transformers 4.x) is not a weight
        if k.endswith("position_ids"):
            sd.setdefault(k, position_ids)
    load_strict(model, sd, path, "text encoder")
    for m in model.modules():  # a non-persistent one, not in the state dict, is still on the meta device
        if isinstance(getattr(m, "position_ids", None), torch.Tensor) and m.position_ids.is_meta:
            m.position_ids = position_ids
    return model


def load_tokenizer(path):
    """A tokenizer folder (vocab.json + merges.txt), or a hub name found in the local transformers cache."""
    try:
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:
        raise CheckpointError(
            f"{path}: no CLIP tokenizer found there or in the local cache. Pass tokenizer=FOLDER with vocab.json and "
            f"merges.txt, or fetch it once with `huggingface-cli download {SD14_TOKENIZER} vocab.json merges.txt "
            f"tokenizer_config.json special_tokens_map.json`") from None


def encode_prompts(tokenizer, text_encoder, prompts, run=None):
    """list of str -> (B, 77, width): padded to the model's length with the end-of-text token, truncated beyond it
    (with a warning that says how many tokens were dropped). run(ids) -> last hidden state, if given, runs the model
    (the speed layer's encode_text: from a CUDA graph)."""
    prompts, n = list(prompts), tokenizer.model_max_length
    for prompt, full in zip(prompts, tokenizer(prompts, verbose=False).input_ids):
        if len(full) > n:
            warnings.warn(f"prompt longer than {n} tokens, the last {len(full) - n} dropped: {prompt[:60]!r}...", stacklevel=2)
    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    return run(ids) if run else text_encoder(ids.to(text_encoder.device)).last_hidden_state
