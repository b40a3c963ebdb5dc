"""DP-SGD mechanics: clipping, calibrated noise, accounting across rounds, guards."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from client.trainer import LocalTrainer, check_update, train_local
from common.adapter import trainable_state
from common.config import RunConfig
from common.corpus import host_records
from common.errors import PrivacyError, TrainingError
from common.lm import encode, per_sample_loss
from common.models import build_adapter_model, load_base_model
from common.privacy import DPEvent, StreamPlan, epsilon_of


def _setup(ffa=False, rank=8, **training):
    cfg = RunConfig.build(
        {
            "model": {"name": "tiny-llama", "max_length": 48},
            "lora": {"ffa": ffa, "rank": rank},
            "training": {
                "optimizer": "sgd",
                "learning_rate": 1.0,
                "batch_size": 16,
                **training,
            },
            "privacy": {"noise_multiplier": 1.0},
        }
    )
    base = load_base_model(cfg.model)
    model = build_adapter_model(base, cfg.lora, seed=0)
    data = encode(host_records(0, 64, seed=0), base.tokenizer, cfg.model.max_length)
    return cfg, model, data


def _flat(state):
    return np.concatenate([v.ravel() for v in state.values()])


@pytest.mark.parametrize("mode", ["lora", "hooks", "functorch"])
def test_clipped_per_sample_gradients_are_bounded_by_c(mode):
    cfg, model, data = _setup()
    clip = 1e-3
    privacy = cfg.privacy.model_copy(
        update={"max_grad_norm": clip, "grad_sample_mode": mode}
    )
    # Unclipped gradient norms of single records are far above C ...
    losses = per_sample_loss(model, data.take(torch.arange(1)))
    model.zero_grad()
    losses.sum().backward()
    raw = math.sqrt(
        sum(float(p.grad.norm() ** 2) for p in model.parameters() if p.requires_grad)
    )
    model.zero_grad(set_to_none=True)
    assert raw > 100 * clip
    # ... and each step moves the adapter by at most (b * C) / B (sigma ~ 0, SGD lr=1).
    B = cfg.training.batch_size
    for idx in ([0], [1], [2, 3, 4, 5]):
        before = _flat(trainable_state(model))
        with LocalTrainer(
            model, training=cfg.training, privacy=privacy, noise_multiplier=1e-9, seed=1
        ) as tr:
            tr.step(data.take(torch.tensor(idx)))
        moved = np.linalg.norm(_flat(trainable_state(model)) - before)
        assert moved * B <= len(idx) * clip * (1 + 1e-4)
        assert moved * B >= 0.5 * clip  # it did move: clipped, not dropped


@pytest.mark.parametrize("mode", ["lora", "hooks"])
def test_noise_std_matches_sigma_c_over_b(mode):
    cfg, model, data = _setup(rank=16)
    cfg = cfg.with_overrides(privacy={"grad_sample_mode": mode})
    sigma, clip, B = 1.3, 50.0, cfg.training.batch_size
    start = trainable_state(model)
    results = {}
    for dp in (False, True):
        from common.adapter import load_trainable_state

        load_trainable_state(model, start)
        privacy = cfg.privacy.model_copy(update={"enabled": dp, "max_grad_norm": clip})
        with LocalTrainer(
            model,
            training=cfg.training,
            privacy=privacy,
            noise_multiplier=sigma if dp else None,
            seed=5,
        ) as tr:
            idx = tr.sample(len(data))
            assert len(idx) > 0
            tr.step(data.take(idx))
        results[dp] = _flat(trainable_state(model))
    # Clipping at C=50 is inactive, so the two steps differ exactly by noise / B.
    diff = results[True] - results[False]
    expected = sigma * clip / B
    assert diff.size > 2000
    assert abs(diff.std() / expected - 1) < 0.05
    assert abs(diff.mean()) < 4 * expected / math.sqrt(diff.size)


def test_epsilon_equals_opacus_and_grows_with_rounds():
    sigma, q, steps, delta = 0.9, 0.05, 4, 1e-5
    previous = 0.0
    for r in range(1, 6):
        events = [
            DPEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)
            for _ in range(r)
        ]
        acc = RDPAccountant()
        for _ in range(r * steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        eps = epsilon_of(events, delta=delta, accountant="rdp")
        assert eps == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
        assert eps > previous
        previous = eps


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_to_sigma_and_back(accountant):
    from common.config import PrivacyConfig, TrainingConfig
    from common.privacy import stream_plan

    privacy = PrivacyConfig(target_epsilon=4.0, accountant=accountant)
    plan = stream_plan(privacy, TrainingConfig(), rounds=10)
    assert 4.0 - 0.05 <= plan.epsilon(10, 10) <= 4.0
    less_noise = StreamPlan(
        **{**dataclasses.asdict(plan), "noise_multiplier": plan.noise_multiplier * 0.9}
    )
    assert less_noise.epsilon(10, 10) > 4.0


def test_planned_sigma_spends_the_target_over_the_planned_rounds():
    from common.config import PrivacyConfig, TrainingConfig
    from common.privacy import planned_noise_multiplier, stream_plan

    privacy, training = PrivacyConfig(target_epsilon=5.0), TrainingConfig()
    plan = stream_plan(privacy, training, rounds=6)
    assert plan.noise_multiplier == planned_noise_multiplier(
        privacy, training, rounds=6
    )
    assert 4.95 <= plan.epsilon(6, 6) <= 5.0  # eligible and counted every round
    assert plan.epsilon(7, 7) > 5.0  # a seventh round would not fit
    with pytest.raises(PrivacyError, match="noisy counts alone"):
        planned_noise_multiplier(
            PrivacyConfig(target_epsilon=0.05, count_noise=1.0), training, rounds=50
        )


def test_unreachable_epsilon_is_a_clear_error():
    from common.config import PrivacyConfig, TrainingConfig
    from common.privacy import planned_noise_multiplier

    privacy = PrivacyConfig(target_epsilon=1e-3, count_noise=1e6)
    training = TrainingConfig(sample_rate=1.0, local_steps=500)
    with pytest.raises(PrivacyError, match="cannot be reached"):
        planned_noise_multiplier(privacy, training, rounds=20)


def test_guard_refuses_nan_unchanged_and_exploding_updates():
    a = {"w": np.zeros(3, np.float32)}
    with pytest.raises(TrainingError, match="not finite"):
        check_update(a, {"w": np.array([0, np.nan, 0], np.float32)}, 1.0, 1.0, 4.0)
    with pytest.raises(TrainingError, match="unchanged"):
        check_update(a, {"w": np.zeros(3, np.float32)}, 1.0, 1.0, 4.0)
    with pytest.raises(TrainingError, match="max_loss_ratio"):
        check_update(a, {"w": np.ones(3, np.float32)}, 1.0, 9.0, 4.0)
    check_update(a, {"w": np.ones(3, np.float32)}, 1.0, 1.1, 4.0)


def test_exploding_training_fails_the_round_instead_of_sending():
    # A tiny random model's loss saturates near log(vocab), so "explode" is set tight.
    cfg, model, data = _setup(
        learning_rate=1e4, sample_rate=0.3, local_steps=3, max_loss_ratio=1.001
    )
    with pytest.raises(TrainingError, match="max_loss_ratio"):
        train_local(
            model,
            data,
            training=cfg.training,
            privacy=cfg.privacy,
            noise_multiplier=1.0,
            seed=0,
        )


def test_dp_training_improves_loss_and_is_deterministic():
    cfg, model, data = _setup(
        ffa=True, optimizer="adam", learning_rate=1e-2, sample_rate=0.25, local_steps=8
    )
    start = trainable_state(model)
    runs = []
    for _ in range(2):
        from common.adapter import load_trainable_state

        load_trainable_state(model, start)
        res = train_local(
            model,
            data,
            training=cfg.training,
            privacy=cfg.privacy,
            noise_multiplier=0.5,
            seed=11,
        )
        runs.append(res)
    assert runs[0].loss_after < runs[0].loss_before
    assert all(np.array_equal(runs[0].arrays[k], runs[1].arrays[k]) for k in start)
    assert runs[0].steps == 8


@pytest.mark.parametrize(
    "name", ["tiny-llama", "tiny-gpt2", "tiny-gptneox", "tiny-qwen2"]
)
@pytest.mark.parametrize("ffa", [True, False])
def test_lean_per_sample_gradients_equal_opacus(name, ffa):
    """The 'lora' mode computes exactly what Opacus's GradSampleModule computes."""
    from opacus import GradSampleModule

    from client.trainer import LinearGradSampler

    cfg = RunConfig.build(
        {"model": {"name": name, "max_length": 32}, "lora": {"ffa": ffa}}
    )
    grads = []
    for lean in (True, False):
        base = load_base_model(cfg.model)
        model = build_adapter_model(base, cfg.lora, seed=0)
        with torch.no_grad():  # non-zero B, so gradients reach A too
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        data = encode(host_records(1, 6, seed=0), base.tokenizer, 32)
        model.train()
        torch.manual_seed(5)  # GPT-2 has dropout: same masks in both runs
        if lean:
            sampler = LinearGradSampler(model)
            per_sample_loss(model, data).mean().backward()
            sampler.collect(len(data))
        else:
            gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            per_sample_loss(gsm, data).mean().backward()
        grads.append(
            {
                n: p.grad_sample.detach().clone()
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )
        if lean:
            sampler.close()
        else:
            gsm._close()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], rtol=1e-4, atol=1e-7), key


def test_lean_mode_refuses_non_linear_trainable_tensors():
    from client.trainer import LinearGradSampler

    model = torch.nn.Sequential(
        torch.nn.Linear(3, 3, bias=False), torch.nn.LayerNorm(3)
    )
    with pytest.raises(TrainingError, match="hooks"):
        LinearGradSampler(model)


def test_proximal_term_pulls_the_update_toward_the_global_adapter():
    """FedProx on hosts: with mu > 0 the same seeded DP run ends closer to the
    adapter it started from."""
    from common.adapter import load_trainable_state

    cfg, model, data = _setup(learning_rate=0.1, sample_rate=0.3, local_steps=3)
    start = trainable_state(model)
    dist = {}
    for mu in (0.0, 2.0):
        load_trainable_state(model, start)
        res = train_local(
            model,
            data,
            training=cfg.training,
            privacy=cfg.privacy,
            noise_multiplier=1.0,
            seed=3,
            proximal_mu=mu,
        )
        dist[mu] = float(np.linalg.norm(_flat(res.arrays) - _flat(start)))
    assert 0 < dist[2.0] < 0.9 * dist[0.0]
