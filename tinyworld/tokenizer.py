"""A CLIP-format BPE tokenizer for the tiny world: every caption word is one token, a few hundred tokens in all.

`transformers.CLIPTokenizer.from_pretrained(folder)` reads it like SD 1.x's openai/clip-vit-large-patch14 one:
lowercase, CLIP's split regex, byte-level BPE with "</w>" marking word ends, <|startoftext|> ... <|endoftext|>,
padded with <|endoftext|> to 77. Words outside the world fall back to single characters (printable ASCII);
other characters (non-ASCII bytes) become <|endoftext|>, CLIP's unknown token.
"""
import json
from collections import Counter
from pathlib import Path

from .world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
EXTRA_WORDS = ("an", "photo", "of", "in", "with", "and", "picture", "image", "drawing", "shape")
CHARS = [chr(c) for c in range(33, 127) if not "A" <= chr(c) <= "Z"]  # the tokenizer lowercases first


def words():
    return sorted(set(vocabulary()) | set(EXTRA_WORDS))


def learn_merges(word_list):
    """Plain BPE training on the word list (each word once) until every word is a single symbol.

    Encoding applies merges in this order, which replays training, so each listed word encodes to one token."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in word_list]
    merges = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties broken alphabetically
        merges.append(best)
        out = []
        for s in seqs:
            merged, i = [], 0
            while i < len(s):
                if s[i:i + 2] == best:
                    merged.append(s[i] + s[i + 1])
                    i += 2
                else:
                    merged.append(s[i])
                    i += 1
            out.append(tuple(merged))
        seqs = out
    return merges


def write_tokenizer(folder):
    """Writes vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; returns the vocab size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(words())
    tokens = CHARS + [c + "</w>" for c in CHARS] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return len(vocab)
