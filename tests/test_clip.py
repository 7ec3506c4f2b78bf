"""minisd.clip, the text encoder written out, against transformers' CLIPTextModel with the same weights."""
import pytest
import torch
from transformers import CLIPTextConfig as TheirConfig, CLIPTextModel as TheirModel

from minisd.clip import CLIPTextConfig, CLIPTextModel
from minisd.text import build_text_encoder, released_clip_state_dict
from sdfixtures import redraw


@pytest.mark.parametrize("act, heads, layers", [("quick_gelu", 4, 3), ("gelu", 2, 2), ("quick_gelu", 1, 1)])
def test_last_hidden_state_equals_transformers(act, heads, layers):
    """Same weights, same ids (any length up to the positions, batch of 3): the same hidden states, every position
    (the causal mask included: a token depends on the tokens before it only)."""
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=heads,
              max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5)
    theirs = redraw(TheirModel(TheirConfig(**kw)), 3).eval()
    ours = build_text_encoder(dict(theirs.state_dict()), "theirs", CLIPTextConfig(**kw))
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    g = torch.Generator().manual_seed(0)
    for length in (77, 9):
        ids = torch.randint(0, 300, (3, length), generator=g)
        with torch.no_grad():
            ref = theirs(ids).last_hidden_state
            torch.testing.assert_close(ours(ids), ref, rtol=0, atol=2e-5)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 300
    with torch.no_grad():
        before, after = ours(ids), ours(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-6)  # whichever kernel runs
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_released_layout_round_trips():
    """The released files' layout (`text_model.` names and an int64 position_ids row, as transformers 4.x writes it)
    loads into the same model, and config.json's values rebuild its config."""
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2)
    model = redraw(CLIPTextModel(cfg), 1).eval()
    released = released_clip_state_dict(model, torch.float32)
    assert "text_model.embeddings.position_ids" in released
    again = build_text_encoder(released, "released", CLIPTextConfig.from_dict({**vars(cfg), "dropout": 0.0}))
    ids = torch.randint(0, 50, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
