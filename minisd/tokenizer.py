"""CLIP's tokenizer: a prompt -> lowercased words -> byte-level BPE pieces (a word's last piece ends in `</w>`),
between the start and end tokens, cut and padded to 77. Built on the `tokenizers` library exactly as transformers'
CLIPTokenizer builds it (the same normalizer, word pattern, BPE model and special tokens), so the ids are
transformers' (tests/test_interop.py compares them), and `import minisd` does not import transformers. It reads the
tokenizer folders SD 1.x ships (vocab.json, merges.txt, tokenizer_config.json / special_tokens_map.json) and the
tokenizer.json that transformers 5 writes, and writes both."""
import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .checkpoint import CheckpointError
from .files import read_regular

SD14_TOKENIZER = "openai/clip-vit-large-patch14"
CLIP_TOKENIZER = Path(__file__).parent / "clip_tokenizer"  # its vocab.json / merges.txt, shipped with minisd
FILE_BYTES = 16 << 20  # CLIP's vocab.json is 0.9 MB, merges.txt 0.5 MB
SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>"}  # CLIP's; SD 2.x pads with "!"
# a word: a special token, an English contraction, a run of letters, one digit, or a run of other non-space symbols
WORD = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CLIPTokenizer:
    def __init__(self, backend, model_max_length=77, special=None):
        """backend: a `tokenizers.Tokenizer` (clip_bpe's, or a tokenizer.json's); special: SPECIAL's keys -> tokens."""
        self.bpe, self.model_max_length = backend, model_max_length
        self.special = {**SPECIAL, **(special or {})}
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            self.bpe.token_to_id(self.special[k]) for k in ("bos_token", "eos_token", "pad_token"))

    def __len__(self):
        return self.bpe.get_vocab_size(with_added_tokens=True)

    def token_id(self, token):
        return self.bpe.token_to_id(token)

    def encode(self, texts, special_tokens=True):
        """list of str -> a list of token ids each, start + ids + end (only the ids without special_tokens)."""
        rows = [e.ids for e in self.bpe.encode_batch(list(texts), add_special_tokens=False)]
        return [[self.bos_token_id, *r, self.eos_token_id] for r in rows] if special_tokens else rows

    def padded(self, texts):
        """list of str -> (B, model_max_length) ids: start, the first model_max_length - 2 ids, end, then pads."""
        return self.pad(self.encode(texts, special_tokens=False))

    def pad(self, rows):
        """Lists of ids without start and end -> (B, model_max_length): start, each row's first model_max_length - 2
        ids, end, then pads."""
        n = self.model_max_length
        rows = [r[:n - 2] for r in rows]
        return torch.tensor([[self.bos_token_id, *r, self.eos_token_id] + [self.pad_token_id] * (n - 2 - len(r))
                             for r in rows])

    def save(self, folder):
        """SD 1.x's folder layout (vocab.json, merges.txt, the two configs: what transformers 4.x and 5.x read) and
        tokenizer.json (what transformers 5 writes)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model = json.loads(self.bpe.to_str())["model"]
        merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
        self.bpe.save(str(folder / "tokenizer.json"))
        (folder / "special_tokens_map.json").write_text(json.dumps(self.special, indent=2))
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length, **self.special}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def clip_bpe(vocab, merges, special):
    """CLIP's tokenizer as transformers' CLIPTokenizer builds it from vocab {token: id} and merges [(left, right)]."""
    bpe = Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        unk_token=special["unk_token"], fuse_unk=False))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([  # the words; the spaces between them are dropped
        pre_tokenizers.Split(Regex(WORD), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])  # a word's UTF-8 bytes as 256 printable characters
    bpe.add_special_tokens(list(dict.fromkeys(special.values())))  # matched in the raw text, before normalizing
    # for the tools that read the tokenizer.json minisd writes (CLIPTokenizer.encode adds start and end itself)
    bos, eos = special["bos_token"], special["eos_token"]
    bpe.post_processor = processors.RobertaProcessing((eos, bpe.token_to_id(eos)), (bos, bpe.token_to_id(bos)),
                                                      trim_offsets=False, add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return bpe


def read_tokenizer_folder(folder):
    """tokenizer.json, or vocab.json + merges.txt; with tokenizer_config.json / special_tokens_map.json if there."""
    def text(name, default=None):
        path = folder / name
        if default is not None and not path.exists():
            return default
        try:
            return read_regular(path, FILE_BYTES, "tokenizer file").decode("utf-8")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable tokenizer file ({e})") from None

    try:
        configs = [json.loads(text(name, "{}")) for name in ("tokenizer_config.json", "special_tokens_map.json")]
        vocab = None if (folder / "tokenizer.json").exists() else json.loads(text("vocab.json"))
    except ValueError as e:  # JSON's errors
        raise CheckpointError(f"{folder}: unreadable tokenizer ({e})") from None
    if not all(isinstance(c, dict) for c in configs):
        raise CheckpointError(f"{folder}: tokenizer_config.json / special_tokens_map.json is not a JSON object")
    config = {**configs[0], **configs[1]}
    special = {**SPECIAL, **{k: v["content"] if isinstance(v, dict) else v for k, v in config.items() if k in SPECIAL}}
    if not all(isinstance(t, str) for t in special.values()):
        raise CheckpointError(f"{folder}: a special token (bos, eos, pad, unk) that is not a string")
    if vocab is None:
        raw = text("tokenizer.json")
        backend = backend_from(lambda: Tokenizer.from_str(raw), folder / "tokenizer.json")
    else:
        vocab, merges = vocab_and_merges(vocab, text("merges.txt"), folder)
        backend = backend_from(lambda: clip_bpe(vocab, merges, special), folder / "merges.txt")
    known = backend.token_to_id if vocab is None else vocab.get  # clip_bpe adds any special token it is given
    missing = sorted({t for t in special.values() if known(t) is None})
    if missing:
        raise CheckpointError(f"{folder}: special tokens not in its vocabulary: {', '.join(missing)}")
    length = config.get("model_max_length", 77)
    if not isinstance(length, int) or not 3 <= length <= 1024:
        length = 77  # some configs carry transformers' "no limit" sentinel (1e30); CLIP reads 77 positions
    return CLIPTokenizer(backend, length, special)


def vocab_and_merges(vocab, merges, folder):
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise CheckpointError(f"{folder / 'vocab.json'}: not a {{token: id}} object")
    pairs = [line.split() for line in merges.splitlines() if line.strip() and not line.startswith("#version")]
    if any(len(pair) != 2 for pair in pairs):
        raise CheckpointError(f"{folder / 'merges.txt'}: a line that is not two tokens")
    return vocab, [tuple(pair) for pair in pairs]


def backend_from(build, path):
    """build() -> a tokenizers.Tokenizer, its errors as one line naming the file."""
    try:
        backend = build()
    except Exception as e:  # the tokenizers library raises Exception itself for a file it cannot read
        raise CheckpointError(f"{path}: unreadable tokenizer ({str(e)[:200]})") from None
    backend.no_padding()  # transformers saves its padding and truncation settings in the file; encode and pad
    backend.no_truncation()  # do their own
    return backend


def load_tokenizer(path):
    """A tokenizer folder (vocab.json + merges.txt, or tokenizer.json), or a hub name found in the local Hugging Face
    cache."""
    folder = Path(path)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        folder = cached_folder(str(path))
    if folder is None:
        raise CheckpointError(
            f"{path}: no CLIP tokenizer found there or in the local cache. Pass tokenizer=FOLDER with vocab.json and "
            f"merges.txt, or fetch it once with `huggingface-cli download {SD14_TOKENIZER} vocab.json merges.txt "
            f"tokenizer_config.json special_tokens_map.json`")
    return read_tokenizer_folder(folder)


def cached_folder(name):
    """The folder of a hub name's tokenizer files in the local Hugging Face cache (a tokenizer repo, or a model repo's
    tokenizer/), or None."""
    from huggingface_hub import try_to_load_from_cache  # a dependency of tokenizers; imported only when needed
    for file in ("tokenizer.json", "vocab.json", "tokenizer/tokenizer.json", "tokenizer/vocab.json"):
        try:
            found = try_to_load_from_cache(name, file)
        except ValueError:  # not a hub name
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


def packaged_tokenizer(text_encoder, path):
    """CLIP's tokenizer as shipped in minisd/clip_tokenizer (SD 1.x's, 49408 tokens), for a single file loaded
    without one; refused if the text encoder's vocabulary has another size (a model trained with its own)."""
    tok = load_tokenizer(CLIP_TOKENIZER)
    vocab = text_encoder.config.vocab_size
    if vocab != len(tok):
        raise CheckpointError(f"{path}: the text encoder has {vocab} tokens, CLIP's tokenizer {len(tok)}; "
                              f"pass the model's own tokenizer (tokenizer=FOLDER, --tokenizer FOLDER)")
    return tok
