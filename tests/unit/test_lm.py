"""Encoding stored records: plain text vs prompt/response (loss on the response)."""

import torch

from common.lm import encode_records, per_sample_loss
from common.models import byte_tokenizer


def test_prompt_tokens_are_not_targets_and_response_tokens_are():
    tok = byte_tokenizer()
    enc = encode_records(
        [{"prompt": "Q?", "response": "A!"}, {"text": "plain"}], tok, 16
    )
    # byte tokenizer, no chat template: "Q?\n" (3 tokens) then "A!" + eos (3 tokens)
    assert enc.attention_mask[0].tolist()[:7] == [1, 1, 1, 1, 1, 1, 0]
    assert enc.targets[0].tolist()[:7] == [0, 0, 0, 1, 1, 1, 0]
    assert enc.targets[1].tolist()[:7] == [1, 1, 1, 1, 1, 1, 0]  # "plain" + eos
    decoded = tok.decode(enc.input_ids[0][enc.targets[0].bool()])
    assert decoded == "A!<eos>"


def test_chat_template_wraps_the_prompt_when_the_tokenizer_has_one():
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    enc = encode_records([{"prompt": "hi", "response": "yo"}], tok, 32)
    ids = enc.input_ids[0][enc.attention_mask[0].bool()]
    assert tok.decode(ids) == "<user>hi<assistant>yo<eos>"
    assert tok.decode(enc.input_ids[0][enc.targets[0].bool()]) == "yo<eos>"


def test_loss_is_the_mean_over_response_tokens_only():
    import torch.nn.functional as F

    from common.config import ModelConfig
    from common.models import load_base_model

    base = load_base_model(ModelConfig(name="tiny-llama"))
    enc = encode_records(
        [{"prompt": "a long prompt here", "response": "ok"}], base.tokenizer, 32
    )
    with torch.no_grad():
        got = per_sample_loss(base.model, enc)
        logits = base.model(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask
        ).logits
    # by hand: token t+1 predicted from position t, counted only where it is a target
    ce = F.cross_entropy(logits[0, :-1], enc.input_ids[0, 1:], reduction="none")
    mask = enc.targets[0, 1:].bool()
    assert int(mask.sum()) == 3  # "ok" + eos
    assert torch.allclose(got[0], ce[mask].mean(), atol=1e-5)
    assert not torch.allclose(got[0], ce[enc.attention_mask[0, 1:].bool()].mean())
