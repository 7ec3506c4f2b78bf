"""Prompts as AUTOMATIC1111's webui reads them: emphasis, BREAK, 75-token chunks (minisd.text), against hand-checked
parses (webui's documented examples) and against the reference text encoder run on hand-built token ids."""
import pytest
import torch

import minisd
from minisd.clip import CLIPTextConfig
from minisd.text import build_text_encoder, chunked, encode_prompts, encode_weighted_prompts, parse_emphasis
from minisd.tokenizer import load_tokenizer


@pytest.mark.parametrize("prompt, parsed", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("a [small] (red:1.5) cat", [("a ", 1.0), ("small", 1 / 1.1), (" ", 1.0), ("red", 1.5), (" cat", 1.0)]),
    ("(red: 0.5 )", [("red", 0.5)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("closing) only]", [("closing) only]", 1.0)]),
    (r"\(literal\] \\", [("(literal] \\", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("time: 3:00", [("time: 3:00", 1.0)]),
    ("a BREAK b", [("a", 1.0), (None, 1.0), ("b", 1.0)]),
    ("", [("", 1.0)]),
    # webui's own example: house 1.3 * 1.1 * 1.1 (the third bracket closes at the end), hill 0.5 * 1.1, sky 1.1^4
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
])
def test_parse_emphasis(prompt, parsed):
    got = parse_emphasis(prompt)
    assert [t for t, _ in got] == [t for t, _ in parsed]
    assert [w for _, w in got] == pytest.approx([w for _, w in parsed], rel=1e-12)


def test_chunks_break_at_75_tokens_or_after_a_near_comma():
    tokens = [(i, 1.0) for i in range(100)]
    assert [len(c) for c in chunked(tokens, comma=-1)] == [75, 25]
    with_comma = tokens[:60] + [(-1, 1.0)] + tokens[:30]  # a comma 15 tokens before the end of the chunk
    assert [len(c) for c in chunked(with_comma, comma=-1)] == [61, 30]
    far_comma = tokens[:50] + [(-1, 1.0)] + tokens[:40]  # 25 tokens back: farther than webui's 20
    assert [len(c) for c in chunked(far_comma, comma=-1)] == [75, 16]
    assert [len(c) for c in chunked(tokens[:75] + [(-1, 1.0)], comma=-1)] == [75, 1]
    assert [len(c) for c in chunked(tokens[:3] + [(None, 1.0)] + tokens[:2], comma=-1)] == [3, 2]
    assert chunked([], comma=-1) == [[]]


def reference_chunk(pipe, ids, weights=None):
    """The reference text encoder on one hand-built chunk: start, ids, end, padded with the end token to 77;
    weights (one per id): webui's "Original" emphasis, written out."""
    tok = pipe.tokenizer
    row = [tok.bos_token_id] + ids + [tok.eos_token_id] * (77 - 1 - len(ids))
    with torch.no_grad():
        z = pipe.text_encoder(torch.tensor([row])).last_hidden_state
    if weights is None:
        return z
    w = torch.tensor([1.0] + weights + [1.0] * (76 - len(ids)))[None, :, None]
    return z * w * (z.mean() / (z * w).mean())


def ids_of(pipe, text):
    return pipe.tokenizer(text, add_special_tokens=False).input_ids


def minisd_side(pipe):
    """minisd's tokenizer (from the reference's folder) and text encoder (with the reference's weights)."""
    config = CLIPTextConfig.from_dict(pipe.text_encoder.config.to_dict())
    return (load_tokenizer(pipe.tokenizer.name_or_path),
            build_text_encoder(dict(pipe.text_encoder.state_dict()), "ref_pipe", config))


def test_plain_prompts_encode_as_before(ref_pipe):
    prompts = ["a red cat", "", "dog, cat. 3:1"]
    tok, enc = minisd_side(ref_pipe)
    weighted = encode_weighted_prompts(tok, enc, prompts)
    before = encode_prompts(tok, enc, prompts)
    assert weighted.shape == before.shape == (3, 77, 64)
    torch.testing.assert_close(weighted, before, rtol=0, atol=1e-6)


def test_weighted_and_long_prompts_against_the_reference_encoder(ref_pipe):
    tok, enc = minisd_side(ref_pipe)
    prompt = "a (red:1.5) [cat]"
    a, red, cat = ids_of(ref_pipe, "a "), ids_of(ref_pipe, "red"), ids_of(ref_pipe, "cat")
    assert ids_of(ref_pipe, " ") == [] and a + red + cat == ids_of(ref_pipe, "a red cat")  # the unweighted tokens
    weights = [1.0] * len(a) + [1.5] * len(red) + [1 / 1.1] * len(cat)
    long = "x" * 90 + ", " + "y" * 10  # one token per character: 90 x, a comma, 10 y
    x, y = ids_of(ref_pipe, "x" * 90), ids_of(ref_pipe, "y" * 10)
    with torch.no_grad():
        ours = encode_weighted_prompts(tok, enc, [prompt, long, "plain"])
    assert ours.shape == (3, 154, 64)
    ref_weighted = reference_chunk(ref_pipe, a + red + cat, weights)
    torch.testing.assert_close(ours[0, :77], ref_weighted[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[0, 77:], reference_chunk(ref_pipe, [])[0], rtol=1e-5, atol=1e-6)  # padding chunk
    assert ours[0, :77].mean().item() == pytest.approx(reference_chunk(ref_pipe, a + red + cat).mean().item(), rel=1e-5)
    ref_long = torch.cat([reference_chunk(ref_pipe, x[:75]),
                          reference_chunk(ref_pipe, x[75:] + ids_of(ref_pipe, ",") + y)], 1)
    torch.testing.assert_close(ours[1], ref_long[0], rtol=1e-5, atol=1e-6)
    plain = reference_chunk(ref_pipe, ids_of(ref_pipe, "plain"))[0]
    torch.testing.assert_close(ours[2, :77], plain, rtol=1e-5, atol=1e-6)


def test_sample_reads_weighted_long_prompts_as_the_pipeline_with_those_embeddings(layouts, ref_pipe):
    """sample() with a weighted prompt of two chunks equals diffusers' pipeline given the embeddings built by hand;
    the negative prompt is padded with an empty-prompt chunk to the prompt's length."""
    sd = minisd.load(layouts["diffusers"])
    prompt = "(red:1.3) " + "z" * 80
    ours = sd.sample(prompt, negative_prompt="blur", steps=3, height=64, width=64, seed=2, progress=False)
    red, z = ids_of(ref_pipe, "red"), ids_of(ref_pipe, "z" * 80)
    first = red + z[:75 - len(red)]
    cond = torch.cat([reference_chunk(ref_pipe, first, [1.3] * len(red) + [1.0] * (75 - len(red))),
                      reference_chunk(ref_pipe, z[75 - len(red):])], 1)
    uncond = torch.cat([reference_chunk(ref_pipe, ids_of(ref_pipe, "blur")), reference_chunk(ref_pipe, [])], 1)
    ref = ref_pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=3, height=64, width=64,
                   generator=torch.Generator("cpu").manual_seed(2), output_type="pt").images
    assert (ours - ref).abs().max() < 1 / 255
    plain = sd.sample("red " + "z" * 80, negative_prompt="blur", steps=3, height=64, width=64, seed=2, progress=False)
    assert (ours - plain).abs().max() > 1 / 255  # the weight matters
