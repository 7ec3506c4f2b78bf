"""tinyworld: the project's own tiny image world (64x64 shapes and characters in named styles, with captions and masks).

It trains minisd-tiny (`python -m tinyworld.train_tiny`), and its judges (`tinyworld.judge`) score the identity
and style fidelity of generated images. The held-out character members and styles never appear in the base split.
"""
from .tokenizer import write_tokenizer
from .world import (BACKGROUNDS, BASE_MEMBERS, BASE_STYLES, CHARACTER, COLOURS, HELD_MEMBERS, HELD_STYLE, HELD_STYLES,
                    IDENTITY, IDENTITY_WORD, MEMBERS, POSITIONS, RARE_WORDS, RESERVED_MEMBERS, SHAPES, SIZES, SPLITS,
                    STYLE_WORD, SUBJECTS, Scene, Style, any_scene, dataset, member, parse, random_scene, render,
                    scene_for, traits, vocabulary, with_style, write_pairs, write_set)

__all__ = ["Scene", "Style", "render", "random_scene", "any_scene", "scene_for", "with_style", "dataset", "write_set",
           "write_pairs", "parse", "vocabulary", "write_tokenizer", "member", "traits", "SHAPES", "CHARACTER",
           "SUBJECTS", "COLOURS", "BACKGROUNDS", "SIZES", "POSITIONS", "SPLITS", "RARE_WORDS", "IDENTITY_WORD",
           "STYLE_WORD", "MEMBERS", "BASE_MEMBERS", "HELD_MEMBERS", "RESERVED_MEMBERS", "IDENTITY", "BASE_STYLES",
           "HELD_STYLES", "HELD_STYLE"]
