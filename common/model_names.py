"""Which ``model.name`` values can load, decided without importing torch or
transformers, so that a wrong name fails in a fraction of a second (the simulator
checks it before its heavy imports; ``common.models.load_base_model`` decides
through it; a test checks that ``common.models.PRESETS`` are these names)."""

from __future__ import annotations

from pathlib import Path

from common.errors import ModelError

__all__ = ["PRESET_NAMES", "check_model_name", "model_kind"]

PRESET_NAMES = ("tiny-gpt2", "tiny-gptneox", "tiny-llama", "tiny-qwen2", "smollm2-135m")


def model_kind(name: str) -> str | None:
    """The kind of ``name``: a preset, a folder, a hub name (a Hugging Face cache
    name, resolved locally), or None (it cannot load)."""
    if name in PRESET_NAMES:
        return "preset"
    if Path(name).expanduser().is_dir():
        return "folder"
    if "/" in name and not Path(name).is_absolute():
        return "hub"
    return None


def check_model_name(name: str) -> None:
    """Raise ModelError, naming the field, unless ``name`` can load."""
    if model_kind(name) is None:
        presets = ", ".join(sorted(PRESET_NAMES))
        raise ModelError(
            f"model {name!r} not found: not a preset ({presets}), "
            "not a folder, and not a Hugging Face cache name; fix model.name"
        )
