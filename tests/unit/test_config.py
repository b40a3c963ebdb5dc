import tomllib

import pytest

from common.config import RunConfig, flatten
from common.errors import ConfigError
from tests.conftest import ROOT

BAD_VALUES = [
    ("model", "max_length", 2),
    ("model", "name", 5),
    ("lora", "rank", 0),
    ("lora", "alpha", 0),
    ("lora", "dropout", 1.5),
    ("lora", "ffa", "maybe"),
    ("lora", "targets", "q_proj"),
    ("privacy", "enabled", "sometimes"),
    ("privacy", "target_epsilon", 0.0),
    ("privacy", "noise_multiplier", -0.5),
    ("privacy", "delta", 2.0),
    ("privacy", "max_grad_norm", 0.0),
    ("privacy", "accountant", "moments"),
    ("privacy", "grad_sample_mode", "ghosts"),
    ("privacy", "count_noise", 0.0),
    ("window", "fresh_cap", 0),
    ("window", "replay_cap", -3),
    ("training", "local_steps", 0),
    ("training", "batch_size", 0),
    ("training", "sample_rate", 1.5),
    ("training", "learning_rate", 0.0),
    ("training", "optimizer", "lion"),
    ("training", "update_dtype", "int8"),
    ("training", "max_loss_ratio", 1.0),
    ("federation", "hosts", 0),
    ("federation", "rounds", 0),
    ("federation", "fraction_train", 0.0),
    ("federation", "min_hosts", 0),
    ("federation", "fraction_evaluate", 2.0),
    ("federation", "round_timeout", -1.0),
    ("federation", "poll_interval", 0.0),
    ("federation", "overlap_eval", "sometimes"),
    ("data", "records_per_host", 0),
    ("data", "heldout_per_domain", 0),
    ("data", "eval_batch_size", 0),
    ("drift", "enabled", "often"),
    ("drift", "query_weight", 0),
    ("drift", "sample_cap", 2),
    ("drift", "buckets", 4),
    ("drift", "ph_delta", -1.0),
    ("drift", "ph_lambda", 0.0),
    ("aggregation", "proximal_mu", -0.1),
    ("aggregation", "drift_boost", -1.0),
    ("aggregation", "norm_limit", 1.0),
    ("aggregation", "min_cosine", 1.5),
    ("aggregation", "server_boost", -1.0),
    ("aggregation", "max_server_step", 0.5),
    ("aggregation", "max_update_norm", -1.0),
    ("aggregation", "secure", "maybe"),
    ("aggregation", "secure_shares", -1),
    ("client_dp", "enabled", "maybe"),
    ("client_dp", "clip_norm", -1.0),
    ("client_dp", "noise_multiplier", 0.0),
    ("client_dp", "target_epsilon", -1.0),
    ("client_dp", "delta", 2.0),
]


@pytest.mark.parametrize(("section", "field", "value"), BAD_VALUES)
def test_every_invalid_field_is_named(section, field, value):
    with pytest.raises(ConfigError) as err:
        RunConfig.build({section: {field: value}})
    msg = str(err.value)
    assert f"{section}.{field}" in msg
    assert "\n" not in msg


def test_bad_fields_cover_every_field():
    named = {(s, f) for s, f, _ in BAD_VALUES}
    for section, model in RunConfig.model_fields.items():
        sub = getattr(model.annotation, "model_fields", None)
        if sub is None:
            continue
        for field in sub:
            if (section, field) in (
                ("data", "source"),  # any string; checked when read
                ("data", "scenario"),  # checked when loaded (test_scenario)
                ("aggregation", "policy"),  # checked by the policy registry
            ):
                continue
            assert (section, field) in named, (
                f"no invalid-value test for {section}.{field}"
            )


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match=r"privacy\.epsilon: unknown key"):
        RunConfig.build({"privacy": {"epsilon": 3}})
    with pytest.raises(ConfigError, match=r"federaton: unknown key"):
        RunConfig.build({"federaton": {"rounds": 3}})


def test_dp_needs_a_noise_source():
    with pytest.raises(ConfigError, match="privacy"):
        RunConfig.build({"privacy": {"target_epsilon": None, "noise_multiplier": None}})
    cfg = RunConfig.build({"privacy": {"enabled": False, "target_epsilon": None}})
    assert not cfg.privacy.enabled


def test_toml_round_trip(tmp_path):
    cfg = RunConfig.build(
        {
            "seed": 7,
            "model": {"name": "tiny-gpt2", "max_length": 33},
            "lora": {"rank": 2, "targets": ["c_attn"], "ffa": False},
            "privacy": {"noise_multiplier": 1.3, "accountant": "prv"},
            "federation": {"hosts": 3, "rounds": 5},
        }
    )
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    again = RunConfig.from_toml(path)
    assert again == cfg
    assert again.to_toml() == cfg.to_toml()
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_bad_toml_names_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[privacy\nenabled = true")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        RunConfig.from_toml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "missing.toml")


def test_flower_run_config_maps_onto_the_same_models():
    """[tool.flwr.app.config] in pyproject (hyphenated dotted keys) is valid."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flat = flatten(data["tool"]["flwr"]["app"]["config"])
    # deploy.* keys are read by the ServerApp itself (server.app.run_config_from_flat)
    flat = {k: v for k, v in flat.items() if not k.startswith("deploy.")}
    cfg = RunConfig.from_flat(flat)
    assert cfg.privacy.target_epsilon == 8.0
    assert cfg.training.sample_rate == 0.05
    with pytest.raises(ConfigError, match=r"training\.local_steps"):
        RunConfig.from_flat({**flat, "training.local-steps": -1})


def test_fingerprint_ignores_out_and_how_the_server_runs_only():
    a = RunConfig.build({"out": "x"})
    assert a.fingerprint() == RunConfig.build({"out": "y"}).fingerprint()
    for federation in ({"poll_interval": 1.5}, {"overlap_eval": True}):
        b = RunConfig.build({"out": "x", "federation": federation})
        assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != RunConfig.build({"seed": 1}).fingerprint()
    assert (
        a.fingerprint()
        != RunConfig.build({"federation": {"round_timeout": 60.0}}).fingerprint()
    )
