import numpy as np
import pytest
import torch

from common.adapter import (
    apply_delta,
    decode_delta,
    encode_delta,
    from_record,
    layout_id,
    load_trainable_state,
    pack_global,
    to_record,
    trainable_shapes,
    trainable_state,
    unpack_global,
)
from common.config import LoraSettings, ModelConfig
from common.errors import ModelError, TrainingError
from common.models import build_adapter_model, load_base_model, lora_targets
from tests.conftest import TINY


def _model(name, **lora):
    base = load_base_model(ModelConfig(name=name))
    return base, build_adapter_model(base, LoraSettings(**lora), seed=3)


@pytest.mark.parametrize("name", TINY)
def test_lora_targets_found_and_only_adapter_trains(name):
    base, model = _model(name, ffa=False)
    targets = lora_targets(base.model)
    assert targets
    state = trainable_state(model)
    assert state and all(("lora_A" in k) or ("lora_B" in k) for k in state)
    assert any(t in k for k in state for t in targets)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed" in n or "wte" in n for n in frozen)


@pytest.mark.parametrize("name", TINY)
def test_ffa_trains_and_sends_only_b_and_a_is_shared(name):
    _, full = _model(name, ffa=False)
    _, ffa = _model(name, ffa=True)
    names = list(trainable_state(ffa))
    assert names and all("lora_B" in k for k in names)
    full_state = trainable_state(full)
    b_only = {k: v for k, v in full_state.items() if "lora_B" in k}
    assert names == list(b_only)  # exactly the B tensors of full LoRA travel
    assert sum(v.size for v in b_only.values()) < sum(
        v.size for v in full_state.values()
    )
    # A is the seeded init, identical in every process that builds the same run.
    a1 = {n: p.detach().clone() for n, p in ffa.named_parameters() if "lora_A" in n}
    _, again = _model(name, ffa=True)
    a2 = {n: p.detach() for n, p in again.named_parameters() if "lora_A" in n}
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)


@pytest.mark.parametrize("name", TINY)
def test_global_adapter_travels_as_one_array_and_unpacks_exactly(name):
    _, model = _model(name, ffa=False)
    rng = np.random.default_rng(1)
    state = {
        k: rng.normal(size=v.shape).astype(np.float32)
        for k, v in trainable_state(model).items()
    }
    shapes = trainable_shapes(model)
    assert list(shapes) == list(state) and len(state) > 1
    record = pack_global(state)
    (key,) = record.keys()  # one object on the wire, whatever the adapter's size
    assert key == "adapter:" + layout_id(shapes)
    back = unpack_global(record, shapes)
    assert list(back) == list(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)
    # named tensors (older servers, tests) are still understood
    named = unpack_global(to_record(state), shapes)
    assert all(np.array_equal(named[k], state[k]) for k in state)
    # a host with another layout fails clearly, never loads a wrong split
    _, other = _model(name, ffa=False, rank=2)
    with pytest.raises(TrainingError, match="same model and lora settings"):
        unpack_global(record, trainable_shapes(other))
    with pytest.raises(TrainingError, match="has shape"):
        unpack_global(to_record(state), trainable_shapes(other))
    flat = record[key].numpy()
    short = type(record)({key: type(record[key])(flat[:-1])})
    with pytest.raises(TrainingError, match="expected"):
        unpack_global(short, shapes)


@pytest.mark.parametrize("name", TINY)
def test_arrays_round_trip_is_exact(name):
    _, model = _model(name, ffa=False)
    rng = np.random.default_rng(0)
    state = {
        k: rng.normal(size=v.shape).astype(np.float32)
        for k, v in trainable_state(model).items()
    }
    record = to_record(state)
    assert list(record.keys()) == list(state.keys())  # stable order
    back = from_record(record)
    assert all(np.array_equal(back[k], state[k]) for k in state)
    _, other = _model(name, ffa=False)
    load_trainable_state(other, back)
    again = trainable_state(other)
    assert all(np.array_equal(again[k], state[k]) for k in state)
    assert not any(k.startswith("_module") or ".default." in k for k in state)


def test_fp16_delta_is_half_the_bytes_and_close():
    _, model = _model("tiny-llama", ffa=False)
    old = trainable_state(model)
    shapes = {k: v.shape for k, v in old.items()}
    rng = np.random.default_rng(1)
    new = {
        k: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32)
        for k, v in old.items()
    }
    d16, d32 = encode_delta(new, old, "float16"), encode_delta(new, old, "float32")
    n16 = sum(len(a.data) for a in d16.values())
    n32 = sum(len(a.data) for a in d32.values())
    payload = sum(v.size for v in old.values())
    assert n16 - 2 * payload == n32 - 4 * payload  # same header, half the payload
    assert n16 - 2 * payload < 200  # one array header for the whole update
    restored = apply_delta(old, decode_delta(d16, shapes))
    assert all(np.allclose(restored[k], new[k], atol=1e-4) for k in new)
    assert all(restored[k].dtype == np.float32 for k in restored)
    exact = apply_delta(old, decode_delta(d32, shapes))
    assert all(np.allclose(exact[k], new[k], atol=1e-7) for k in new)


def test_delta_that_does_not_fit_the_layout_is_refused():
    _, model = _model("tiny-llama")
    old = trainable_state(model)
    shapes = {k: v.shape for k, v in old.items()}
    good = encode_delta(old, old, "float16")
    short = to_record({"delta": good["delta"].numpy()[:-1]})
    with pytest.raises(TrainingError, match="expected"):
        decode_delta(short, shapes)
    with pytest.raises(TrainingError, match="one flat"):
        decode_delta(to_record(old), shapes)
    other = dict(shapes)
    other[next(iter(other))] = (1, 1)
    assert layout_id(shapes) != layout_id(other)


def test_mismatched_arrays_are_refused():
    _, model = _model("tiny-llama")
    state = trainable_state(model)
    key = next(iter(state))
    with pytest.raises(TrainingError, match="shape"):
        load_trainable_state(model, {**state, key: np.zeros((1, 1), np.float32)})
    with pytest.raises(TrainingError, match="missing"):
        load_trainable_state(model, dict(list(state.items())[1:]))


def test_unknown_model_and_targets_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_base_model(ModelConfig(name=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="cannot load"):
        load_base_model(ModelConfig(name=str(tmp_path)))
    base = load_base_model(ModelConfig(name="tiny-llama"))
    with pytest.raises(ModelError, match=r"lora\.targets"):
        lora_targets(base.model, ["no_such_proj"])
