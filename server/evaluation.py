"""Held-out evaluation of the global adapter on the server, per domain.

Built-in streams come with per-domain held-out sets generated from a separate seed
stream; a scenario names its own held-out sets. With ``data.source = DIR``, each
``DIR/_heldout/<domain>.jsonl|.txt`` file is one held-out domain; without that folder
the server evaluates nothing centrally.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.config import RunConfig
from common.corpus import heldout_sets, read_files
from common.lm import Encoded, encode, evaluate_loss
from common.models import BaseModel

__all__ = ["HeldOut"]

log = logging.getLogger(__name__)


class HeldOut:
    def __init__(self, sets: dict[str, Encoded], batch_size: int) -> None:
        self.sets = sets
        self.batch_size = batch_size

    @classmethod
    def for_run(cls, cfg: RunConfig, base: BaseModel) -> HeldOut:
        texts: dict[str, list[str]]
        if cfg.data.scenario is not None:
            from common.scenario import heldout_texts, load_scenario

            texts = heldout_texts(load_scenario(cfg.data.scenario), seed=cfg.seed)
        elif cfg.data.source == "builtin":
            texts = heldout_sets(cfg.data.heldout_per_domain, seed=cfg.seed)
        else:
            folder = Path(cfg.data.source) / "_heldout"
            files = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.txt"))
            texts = {p.stem: read_files([p]) for p in files}
            if not texts:
                log.warning(
                    "No %s folder: the server evaluates no held-out set", folder
                )
        sets = {
            d: encode(t, base.tokenizer, cfg.model.max_length) for d, t in texts.items()
        }
        return cls(sets, cfg.data.eval_batch_size)

    def evaluate(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        """``{domain: {"loss": mean token loss, "ppl": perplexity}}``."""
        out = {}
        for domain, data in self.sets.items():
            loss, ppl = evaluate_loss(model, data, self.batch_size)
            out[domain] = {"loss": round(loss, 4), "ppl": round(ppl, 3)}
        return out
