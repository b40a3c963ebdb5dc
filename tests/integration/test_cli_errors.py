"""Bad input to fedstream-sim: one line on stderr, exit code 2, before any training."""

import pytest

from tests.conftest import run_cli


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.startswith("fedstream-sim: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err


def test_missing_model_path(tmp_path):
    proc = run_cli("--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"))
    _one_line_error(proc, "not found", "model.name")


def test_empty_data_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _one_line_error(
        run_cli(
            "--data", str(data), "--model", "tiny-llama", "--out", str(tmp_path / "o")
        ),
        "no host sub-folders",
    )
    (data / "site-a").mkdir()
    _one_line_error(
        run_cli(
            "--data", str(data), "--model", "tiny-llama", "--out", str(tmp_path / "o2")
        ),
        "has no records",
    )


def test_malformed_data_names_file_and_line(tmp_path):
    host = tmp_path / "data" / "site-a"
    host.mkdir(parents=True)
    (host / "a.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    _one_line_error(
        run_cli(
            "--data",
            str(tmp_path / "data"),
            "--model",
            "tiny-llama",
            "--out",
            str(tmp_path / "o"),
        ),
        "a.jsonl:2",
    )


def test_unreachable_epsilon(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[model]\nname = "tiny-llama"\n[privacy]\ntarget_epsilon = 0.00001\n'
        "[training]\nsample_rate = 1.0\nlocal_steps = 500\n"
    )
    _one_line_error(
        run_cli("--config", str(cfg), "--out", str(tmp_path / "o")), "cannot be reached"
    )


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ("[privacy]\ndelta = 3\n", "privacy.delta"),
        ("[training]\nbogus = 1\n", "training.bogus"),
        ("[lora]\nrank = 0\n", "lora.rank"),
    ],
)
def test_invalid_config_names_field(tmp_path, toml, field):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    _one_line_error(run_cli("--config", str(cfg), "--out", str(tmp_path / "o")), field)
