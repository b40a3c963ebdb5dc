"""Local DP-LoRA training with Opacus.

One round on a host is ``local_steps`` DP-SGD steps over the adapter only:

* Poisson sampling: each record joins each step's batch with probability ``q``
  (``training.sample_rate``), independently of every other record;
* per-sample gradients of the trainable LoRA tensors, clipped to ``max_grad_norm`` C.
  Mode ``lora`` (default) computes them with ``LinearGradSampler``: every trainable
  tensor of a LoRA adapter is the weight of a bias-free Linear, whose per-sample
  gradient is one einsum of the layer's input and output gradient. Modes ``hooks``
  and ``functorch`` use Opacus's ``GradSampleModule`` instead (same values; the
  benchmark shows the lean path is cheaper: a 10 ms step pays 0.2 ms, not 2 ms);
* Gaussian noise N(0, (sigma C)^2) added to the clipped sum, which is divided by the
  fixed ``training.batch_size`` B, never by the realised batch size (which would
  leak it).

Without DP (``privacy.enabled = false``) the same sampling and normaliser are used, with
neither clipping nor noise, so the two modes differ only by the privacy mechanism.

After training the update is checked before it may leave the host (opacus issue 820:
DP + PEFT has silently produced unusable weights): it must be finite, must have changed,
and the loss on the first trained batch must not have exploded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from common.adapter import trainable_state
from common.config import PrivacyConfig, TrainingConfig
from common.errors import TrainingError
from common.lm import Encoded, per_sample_loss

__all__ = ["LocalResult", "LocalTrainer", "check_update", "train_local"]

log = logging.getLogger(__name__)

# Hooks on lora_B fire w.r.t. outputs when A is frozen (FFA-LoRA): expected, harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass
class LocalResult:
    arrays: OrderedDict[str, np.ndarray]  # trained adapter, fp32
    loss_before: float  # first batch, before any step
    loss_after: float  # same batch, after the last step
    mean_loss: float  # mean per-record loss over all trained batches
    steps: int


class LinearGradSampler:
    """Per-sample gradients for models whose trainable tensors are all weights of
    bias-free ``nn.Linear`` layers (LoRA A and B), in Opacus's ``grad_sample`` format.

    A forward hook keeps each layer's input x (b, T, in) and a tensor hook its output
    gradient g (b, T, out); after backward, grad_sample = einsum(g, x) (b, out, in),
    times b because the loss is the batch mean (Opacus's ``loss_reduction="mean"``).
    Opacus's ``DPOptimizer`` then clips, noises and normalises as usual.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers: list[torch.nn.Linear] = []
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        covered: set[int] = set()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
                if module.bias is not None and module.bias.requires_grad:
                    raise TrainingError(
                        "grad_sample_mode 'lora' needs bias-free layers; use 'hooks'"
                    )
                self.layers.append(module)
                covered.add(id(module.weight))
        if covered != trainable:
            raise TrainingError(
                "grad_sample_mode 'lora' covers only nn.Linear weights, but other "
                "tensors are trainable; set privacy.grad_sample_mode = 'hooks'"
            )
        self._inputs: dict[int, torch.Tensor] = {}
        self._grads: dict[int, torch.Tensor] = {}
        self._handles = [
            layer.register_forward_hook(self._forward) for layer in self.layers
        ]

    def _forward(
        self, layer: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> None:
        if not out.requires_grad:  # evaluation under no_grad: nothing to keep
            return
        key = id(layer)
        self._inputs[key] = inp[0].detach()
        out.register_hook(lambda g, key=key: self._grads.__setitem__(key, g))

    def collect(self, batch_size: int) -> None:
        """Set ``weight.grad_sample`` of every layer from the last backward pass."""
        for layer in self.layers:
            key = id(layer)
            g, x = self._grads.pop(key), self._inputs.pop(key)
            # Opacus reads per-sample gradients from this attribute.
            setattr(  # noqa: B010
                layer.weight,
                "grad_sample",
                torch.einsum("bto,bti->boi", g, x) * batch_size,
            )

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._inputs.clear()
        self._grads.clear()
        for layer in self.layers:
            if hasattr(layer.weight, "grad_sample"):
                del layer.weight.grad_sample


class LocalTrainer:
    """DP-SGD (or plain SGD with the same sampling) over a model's trainable tensors.

    Use as a context manager: Opacus hooks are attached on enter and removed on exit,
    so a cached model is never left wrapped.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        training: TrainingConfig,
        privacy: PrivacyConfig,
        noise_multiplier: float | None,
        seed: int,
        proximal_mu: float = 0.0,
    ) -> None:
        if privacy.enabled and not (noise_multiplier and noise_multiplier > 0):
            raise TrainingError(
                f"noise_multiplier must be > 0 for DP training, got "
                f"{noise_multiplier}; "
                "set privacy.enabled = false to train without DP"
            )
        self.model = model
        self.training = training
        self.privacy = privacy
        self.noise_multiplier = noise_multiplier if privacy.enabled else None
        self.sampler = torch.Generator().manual_seed(seed)
        self.noise = torch.Generator().manual_seed(seed + 1)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable adapter tensors")
        # Proximal anchor: the adapter as received (the global one).
        self.proximal_mu = proximal_mu
        self.anchor = [p.detach().clone() for p in self.params] if proximal_mu else []
        lr = training.learning_rate
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.Adam(self.params, lr=lr)
            if training.optimizer == "adam"
            else torch.optim.SGD(self.params, lr=lr)
        )
        self._gsm: GradSampleModule | None = None
        self._lean: LinearGradSampler | None = None
        self._dp: DPOptimizer | None = None
        self._rng_ctx: contextlib.AbstractContextManager[None] | None = None
        self._seed = seed

    def __enter__(self) -> LocalTrainer:
        # Dropout draws from the global generator: fork it so runs are reproducible.
        self._rng_ctx = torch.random.fork_rng(devices=[])
        self._rng_ctx.__enter__()
        torch.manual_seed(self._seed + 2)
        self.model.train()
        if self.noise_multiplier is not None:
            if self.privacy.grad_sample_mode == "lora":
                self._lean = LinearGradSampler(self.model)
            else:
                self._gsm = GradSampleModule(
                    self.model,
                    batch_first=True,
                    loss_reduction="mean",
                    force_functorch=self.privacy.grad_sample_mode == "functorch",
                )
            self._dp = DPOptimizer(
                self.optimizer,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.privacy.max_grad_norm,
                expected_batch_size=self.training.batch_size,
                loss_reduction="mean",
                generator=self.noise,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._gsm is not None:
            self._gsm._close()  # removes hooks and grad_sample attributes
            self._gsm = None
        if self._lean is not None:
            self._lean.close()
            self._lean = None
        for p in self.params:
            p.grad = None
        self.model.eval()
        if self._rng_ctx is not None:
            self._rng_ctx.__exit__(exc_type, exc, tb)

    def sample(self, n: int) -> torch.Tensor:
        """Poisson sample: indices of the records in this step's batch."""
        keep = torch.rand(n, generator=self.sampler) < self.training.sample_rate
        return keep.nonzero().flatten()

    def step(self, batch: Encoded | None) -> torch.Tensor | None:
        """One optimizer step on ``batch``; returns its per-record losses (detached)."""
        if batch is None or len(batch) == 0:
            self._noise_only_step()
            return None
        if self._dp is not None:
            self._dp.zero_grad(set_to_none=True)
            losses = per_sample_loss(self._gsm or self.model, batch)  # (b,)
            # Grad samples are rescaled by b ("mean" reduction), so each one is the
            # gradient of its own record's loss; DPOptimizer divides by B, not b.
            losses.mean().backward()
            if self._lean is not None:
                self._lean.collect(len(losses))
            self._dp.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            losses = per_sample_loss(self.model, batch)
            (losses.sum() / self.training.batch_size).backward()
            self.optimizer.step()
        self._proximal_step()
        return losses.detach()

    def _proximal_step(self) -> None:
        """FedProx's pull toward the received global adapter, decoupled from the
        DP gradient: ``w -= lr * mu * (w - w_global)``. It depends on no record, so
        it needs no clipping or noise (post-processing of the DP step)."""
        if not self.proximal_mu:
            return
        step = self.training.learning_rate * self.proximal_mu
        with torch.no_grad():
            for p, a in zip(self.params, self.anchor, strict=True):
                p.sub_(step * (p - a))

    def _noise_only_step(self) -> None:
        """An empty Poisson batch still releases noise (the accountant counts it)."""
        if self.noise_multiplier is None:
            return
        std = self.noise_multiplier * self.privacy.max_grad_norm
        for p in self.params:
            noise = torch.normal(0.0, std, p.shape, generator=self.noise)
            p.grad = noise / self.training.batch_size
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._proximal_step()


def train_local(
    model: torch.nn.Module,
    data: Encoded,
    *,
    training: TrainingConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float | None,
    seed: int,
    proximal_mu: float = 0.0,
) -> LocalResult:
    """Train ``local_steps`` steps on ``data``; ``TrainingError`` on a bad update."""
    if len(data) == 0:
        raise TrainingError("no records to train on")
    before = trainable_state(model)
    probe: Encoded | None = None
    loss_before = math.nan
    total, count = 0.0, 0
    with LocalTrainer(
        model,
        training=training,
        privacy=privacy,
        noise_multiplier=noise_multiplier,
        seed=seed,
        proximal_mu=proximal_mu,
    ) as trainer:
        for _ in range(training.local_steps):
            idx = trainer.sample(len(data))
            batch = data.take(idx) if len(idx) else None
            losses = trainer.step(batch)
            if losses is not None:
                if probe is None:
                    probe, loss_before = batch, float(losses.mean())
                total += float(losses.sum())
                count += len(losses)
    loss_after = loss_before
    if probe is not None:
        with torch.no_grad():
            loss_after = float(per_sample_loss(model, probe).mean())
    after = trainable_state(model)
    check_update(before, after, loss_before, loss_after, training.max_loss_ratio)
    return LocalResult(
        arrays=after,
        loss_before=loss_before,
        loss_after=loss_after,
        mean_loss=total / count if count else math.nan,
        steps=training.local_steps,
    )


def check_update(
    before: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
    loss_before: float,
    loss_after: float,
    max_loss_ratio: float,
) -> None:
    """Refuse an update that is not finite, did not change, or made the loss explode."""
    for name, value in after.items():
        if not np.isfinite(value).all():
            raise TrainingError(
                f"local update is not finite (NaN/Inf in {name}); this host's round "
                "is failed instead of sending it"
            )
    changed = max(float(np.abs(after[k] - before[k]).max()) for k in after)
    if changed == 0.0:
        raise TrainingError(
            "local training left the adapter unchanged (no gradient reached the LoRA "
            "tensors); this host's round is failed instead of sending it"
        )
    if math.isfinite(loss_before) and not (
        math.isfinite(loss_after) and loss_after <= max_loss_ratio * loss_before
    ):
        # The loss values stay in the host's log: the error reply goes to the server.
        log.error("Loss on the trained batch: %.4f -> %.4f", loss_before, loss_after)
        raise TrainingError(
            "loss on the trained batch rose above training.max_loss_ratio = "
            f"{max_loss_ratio}x its value before training; this host's round is "
            "failed instead of sending the update"
        )
