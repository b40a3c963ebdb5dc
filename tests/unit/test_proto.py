"""The committed gRPC stubs are what protos/ generates."""

from pathlib import Path

from common.proto.generate import HERE, generate


def test_committed_stubs_are_fresh(tmp_path: Path):
    fresh = generate(tmp_path)
    assert fresh
    for path in fresh:
        committed = HERE / path.name
        assert committed.exists(), (
            f"{committed.name} missing: run python -m common.proto.generate"
        )
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} is stale: run python -m common.proto.generate"
        )
