"""tinyworld: deterministic renders, captions that parse back, clean splits, masks, the tokenizer, the classifier."""
from pathlib import Path

import numpy as np
import pytest

from tinyworld import (BACKGROUNDS, HELDOUT_STYLE, HELDOUT_SUBJECT, IDENTITY_TOKEN, SPLITS, STYLE_TOKEN, STYLES,
                       SUBJECTS, Scene, dataset, parse, random_scene, render, vocabulary, write_set, write_tokenizer)

CLASSIFIER = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "classifier.safetensors"


def grow(mask):
    """Dilation by one pixel (3x3)."""
    m = np.pad(mask, 1)
    return np.any([m[1 + dy:65 + dy, 1 + dx:65 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def pixels(data):
    return np.stack([np.asarray(im) for im, _, _ in data])


@pytest.mark.parametrize("split", SPLITS)
def test_same_seed_same_pixels(split):
    a, b = dataset(6, seed=3, split=split), dataset(6, seed=3, split=split)
    assert [c for _, c, _ in a] == [c for _, c, _ in b]
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(dataset(6, seed=4, split=split)))


@pytest.mark.parametrize("split", SPLITS)
def test_captions_parse_back_in_the_fixed_vocabulary(split):
    words = set(vocabulary())
    for _, caption, scene in dataset(30, seed=0, split=split):
        assert parse(caption) == scene
        assert set(caption.replace(",", "").split()) <= words


def test_splits_hold_exactly_what_they_should():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        s = random_scene(rng, "base")
        assert s.subject in SUBJECTS and s.style in STYLES
        assert IDENTITY_TOKEN not in s.caption() and STYLE_TOKEN not in s.caption()
    for split, subject, style in [("identity", HELDOUT_SUBJECT, "flat"), ("combo", HELDOUT_SUBJECT, HELDOUT_STYLE)]:
        scenes = [random_scene(rng, split) for _ in range(50)]
        assert {(s.subject, s.style) for s in scenes} == {(subject, style)}
    assert {random_scene(rng, "style").style for _ in range(50)} == {HELDOUT_STYLE}
    assert {random_scene(rng, "style").subject for _ in range(200)} == set(SUBJECTS)


def test_mask_is_the_subject():
    rng = np.random.default_rng(1)
    for split in SPLITS:
        for _ in range(25):
            scene = random_scene(rng, split)
            image, mask = render(scene)
            assert image.size == (64, 64) and image.mode == "RGB"
            assert mask.shape == (64, 64) and mask.dtype == np.bool_ and mask.sum() > 100
            assert mask[1:-1, 1:-1].sum() > 0.99 * mask.sum()  # inside the frame (a low heart's tip may touch it)
            flat, _ = render(Scene(scene.subject, scene.colour, scene.background, "flat", scene.size, scene.position))
            is_bg = (np.abs(np.asarray(flat, int) - BACKGROUNDS[scene.background]).sum(-1) < 10)
            near = grow(grow(mask))  # anti-aliased edges, and the faint tips of the heart, lie within 2 px of the mask
            assert is_bg[~near].all() and not is_bg[~grow(~mask)].any()


def test_write_set(tmp_path):
    write_set(tmp_path, 3, seed=0, split="identity")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"00{i}.{ext}" for i in range(3) for ext in ("png", "txt")]
    assert all(f" {IDENTITY_TOKEN} character" in (tmp_path / f"00{i}.txt").read_text() for i in range(3))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_tokenizer_one_token_per_word(tokenizer):
    assert len(tokenizer) < 512 and tokenizer.model_max_length == 77
    for word in vocabulary() + [",", "photo", "of", "in"]:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_tokenizer_pads_captions_like_sd(tokenizer):
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (bos, eos, eos)
    for split in SPLITS:
        for _, caption, _ in dataset(5, seed=2, split=split):
            ids = tokenizer(caption, padding="max_length", max_length=77, truncation=True).input_ids
            n = len(caption.replace(",", " ,").split())  # one token per word and per comma
            assert len(ids) == 77 and ids[0] == bos and ids[1:n + 1].count(eos) == 0 and set(ids[n + 1:]) == {eos}
            assert tokenizer.decode(ids, skip_special_tokens=True) == caption.replace(",", " ,")


ODD_TEXTS = ["", "   ", "A RED Star!!", "a (red) star;; #1 @x", "café naïve 日本 🤖", "sks<|endoftext|>"]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_tokenizer_never_raises(tokenizer, text):
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and all(0 <= i < len(tokenizer) for i in ids)


def test_classifier_accuracy():
    if not CLASSIFIER.exists():
        pytest.skip(f"{CLASSIFIER} is absent: python -m tinyworld.classify --out {CLASSIFIER}")
    import torch

    from tinyworld.classify import accuracy, load

    torch.set_num_threads(2)
    table = accuracy(load(CLASSIFIER), n=40, seed=99)
    for split, row in table.items():
        assert row["subject"] >= 0.9 and row["style"] >= 0.9, (split, row)
