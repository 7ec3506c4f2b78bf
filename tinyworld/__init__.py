"""tinyworld: the project's own tiny image world (64x64 shapes in named styles, with captions and masks).

It trains minisd-tiny (`python -m tinyworld.train_tiny`), and its classifier (`tinyworld.classify`) scores the
identity and style fidelity of generated images. The held-out character ("sks") and style ("zwx") never appear in
the base split.
"""
from .tokenizer import write_tokenizer
from .world import (BACKGROUNDS, COLOURS, HELDOUT_STYLE, HELDOUT_SUBJECT, IDENTITY_TOKEN, POSITIONS, SIZES, SPLITS,
                    STYLE_TOKEN, STYLES, SUBJECTS, Scene, dataset, parse, random_scene, render, scene_for, vocabulary,
                    write_set)

__all__ = ["Scene", "render", "random_scene", "scene_for", "dataset", "write_set", "parse", "vocabulary",
           "write_tokenizer", "SUBJECTS", "COLOURS", "BACKGROUNDS", "STYLES", "SIZES", "POSITIONS", "SPLITS",
           "IDENTITY_TOKEN", "STYLE_TOKEN", "HELDOUT_SUBJECT", "HELDOUT_STYLE"]
