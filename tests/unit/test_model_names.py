"""common.model_names decides which model names can load without importing torch;
common.models must agree with it."""

import subprocess
import sys

import pytest

from common.errors import ModelError
from common.model_names import PRESET_NAMES, check_model_name, model_kind


def test_the_presets_are_the_light_list():
    from common.models import PRESETS

    assert sorted(PRESETS) == sorted(PRESET_NAMES)


def test_kinds(tmp_path):
    assert model_kind("tiny-llama") == "preset"
    assert model_kind(str(tmp_path)) == "folder"
    assert model_kind("HuggingFaceTB/SmolLM2-135M") == "hub"
    assert model_kind(str(tmp_path / "missing")) is None
    assert model_kind("no-such-model") is None
    with pytest.raises(ModelError, match=r"'no-such-model' not found.*fix model.name"):
        check_model_name("no-such-model")


def test_a_wrong_name_is_refused_without_importing_torch():
    code = (
        "import sys\n"
        "from common.model_names import check_model_name\n"
        "try:\n    check_model_name('nope')\n"
        "except Exception as e:\n    print(type(e).__name__)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["ModelError", "False", "False"]
