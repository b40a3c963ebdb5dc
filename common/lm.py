"""Tokenised batches and the padding-masked causal-LM loss (hosts and server)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

__all__ = [
    "Encoded",
    "encode",
    "encode_records",
    "evaluate_loss",
    "per_sample_loss",
    "token_loss_sum",
]


@dataclass(frozen=True)
class Encoded:
    input_ids: torch.Tensor  # (N, T) int64
    attention_mask: torch.Tensor  # (N, T) 1 for real tokens
    loss_mask: torch.Tensor | None = None  # (N, T) 1 where the token is a target

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def targets(self) -> torch.Tensor:
        return self.attention_mask if self.loss_mask is None else self.loss_mask

    def take(self, idx: torch.Tensor) -> Encoded:
        ids, mask = self.input_ids[idx], self.attention_mask[idx]
        width = max(int(mask.sum(1).max().item()), 2) if len(idx) else 2
        loss = None if self.loss_mask is None else self.loss_mask[idx][:, :width]
        return Encoded(ids[:, :width], mask[:, :width], loss)  # trim shared padding


def encode(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Encoded:
    """Right-padded token ids; each record ends with EOS if it fits."""
    eos = tokenizer.eos_token or ""
    batch = tokenizer(
        [t + eos for t in texts],
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
        add_special_tokens=False,
    )
    return Encoded(batch["input_ids"].long(), batch["attention_mask"].long())


def encode_records(
    records: list[dict[str, object]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> Encoded:
    """Encode stored records: plain text (loss on every token) or prompt/response
    (loss on the response only; the tokenizer's chat template wraps the prompt when
    it has one)."""
    if all("text" in r for r in records):
        return encode([str(r["text"]) for r in records], tokenizer, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(records), max_length), pad, dtype=torch.long)
    attn = torch.zeros((len(records), max_length), dtype=torch.long)
    loss = torch.zeros((len(records), max_length), dtype=torch.long)
    eos = tokenizer.eos_token or ""
    for i, rec in enumerate(records):
        if "text" in rec:
            head, tail = "", str(rec["text"]) + eos
        else:
            head = _prompt_text(tokenizer, str(rec["prompt"]))
            tail = str(rec["response"]) + eos
        head_ids = (
            tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
        )
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        row = (list(head_ids) + list(tail_ids))[:max_length]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attn[i, : len(row)] = 1
        loss[i, min(len(head_ids), len(row)) : len(row)] = 1
    return Encoded(ids, attn, loss)


def _prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
            )
        )
    return prompt + "\n"


def _token_losses(
    model: torch.nn.Module, batch: Encoded
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).logits
    # Predict token t+1 from prefix <= t.  logits: (B, T-1, V), targets/mask: (B, T-1)
    targets = batch.input_ids[:, 1:]
    mask = batch.targets[:, 1:].to(logits.dtype)
    losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, reduction="none"
    )  # (B, T-1)
    return losses * mask, mask


def per_sample_loss(model: torch.nn.Module, batch: Encoded) -> torch.Tensor:
    """Mean token loss of each record, padding excluded: shape (B,)."""
    losses, mask = _token_losses(model, batch)
    return losses.sum(1) / mask.sum(1).clamp(min=1.0)


def token_loss_sum(model: torch.nn.Module, batch: Encoded) -> tuple[float, int]:
    losses, mask = _token_losses(model, batch)
    return float(losses.sum().item()), int(mask.sum().item())


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, data: Encoded, batch_size: int
) -> tuple[float, float]:
    """Token-weighted mean loss and perplexity over ``data``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        loss, n = token_loss_sum(model, data.take(idx))
        total += loss
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return mean, math.exp(min(mean, 50.0))
