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
        "has no usable records: 0 received",
    )


def test_host_with_only_malformed_records_names_the_reasons(tmp_path):
    host = tmp_path / "data" / "site-a"
    host.mkdir(parents=True)
    (host / "a.jsonl").write_text('{"text": \nnot json\n{"text": "  "}\n')
    _one_line_error(
        run_cli(
            "--data",
            str(tmp_path / "data"),
            "--model",
            "tiny-llama",
            "--out",
            str(tmp_path / "o"),
        ),
        "has no usable records: 3 received",
        "'invalid_json': 2",
        "'empty': 1",
    )


def test_malformed_lines_are_quarantined_and_the_rest_stored(tmp_path):
    """Simulated hosts ingest through the same gate as deployed ones (no Ray here)."""
    from client.store import Store, load_key
    from common.config import RunConfig
    from server.sim import prepare_hosts

    for site, lines in {
        "site-a": [
            '{"text": "a fine note about the ward"}',
            '{"text": ',
            '{"text": "call +44 20 7946 0958"}',
        ],
        "site-b": ["plain text line one", "plain text line two"],
    }.items():
        (tmp_path / "data" / site).mkdir(parents=True)
        suffix = ".jsonl" if site == "site-a" else ".txt"
        (tmp_path / "data" / site / f"x{suffix}").write_text("\n".join(lines) + "\n")
    cfg = RunConfig.build(
        {"data": {"source": str(tmp_path / "data")}, "out": str(tmp_path / "run")}
    )
    cfg, hosts_dir, summaries = prepare_hosts(cfg)
    assert cfg.federation.hosts == 2
    assert summaries[0]["stored"] == 2 and summaries[0]["quarantined:invalid_json"] == 1
    assert summaries[0]["pii:PHONE"] == 1 and summaries[1]["stored"] == 2
    store = Store(
        hosts_dir / "host-0" / "store.db", load_key(hosts_dir / "host-0" / "store.key")
    )
    texts = [r.content["text"] for r in store.iter_records()]
    store.close()
    assert texts == ["a fine note about the ward", "call [PHONE]"]
    again = prepare_hosts(cfg)[2]  # a resumed run does not ingest twice
    assert again == summaries


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
