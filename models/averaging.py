"""Weight averaging over the tail of a run (``train.ema_decay``, ``train.ema_start``): the forecast comes from the average.

From ``ema_start`` of the run on, every optimizer step folds the weights into a running average with the
weight ``min(ema_decay, n / (n + 1))`` on the average so far (``n`` = steps averaged): a uniform mean of the
steps (stochastic weight averaging) for the first ``1 / (1 − ema_decay)`` of them, then an exponential moving
average with that decay. On the three-year planet no single run reached the 120 h skill that the mean of two
separately trained runs' forecasts did; averaging one run's weights took 0.007–0.011 off that run's 120 h
error and left 24 h as it was (docs/benchmarks.md), at the cost of one more copy of the weights.

Once averaging has begun, validation scores the averaged weights and both checkpoint files hold them as the
model (what forecasts, promotion and zero-shot runs read); the training weights travel in the ``training``
dict (``average``), so a resumed run continues exactly where it stopped. Before ``ema_start`` the average is
the training weights themselves. Only floating-point parameters are averaged; buffers (normalization stats,
transform tables) are the model's own.

``python -m models.averaging LAST_PT OUT_PT`` writes the training weights an averaging run's ``last.pt`` keeps
as an inference checkpoint of their own: the same run without the averaging, to score beside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import ConfigError, MissingInputError
from models.checkpoint import atomic_torch_save, read_checkpoint, state_dict_sha256


class WeightAverage:
    """The running average of a model's parameters from progress ``start`` on; a no-op with ``decay == 0``."""

    def __init__(self, model: nn.Module, decay: float, start: float) -> None:
        self.model, self.decay, self.start = model, float(decay), float(start)
        # Looked up once: the loop updates these tensors in place, so their identities hold for the whole run.
        self.params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        self.count = 0  # optimizer steps folded in so far
        self.average: dict[str, torch.Tensor] = {}

    @property
    def enabled(self) -> bool:
        """Whether the run averages at all (``decay > 0``)."""
        return self.decay > 0

    @property
    def active(self) -> bool:
        """Whether averaging has begun: validation and checkpoints then use the average."""
        return self.count > 0

    @torch.no_grad()
    def update(self, progress: float) -> None:
        """Fold the current weights in after an optimizer step, once ``progress`` has reached ``start``."""
        if not self.enabled or progress < self.start:
            return
        params = self.params
        if not self.average:
            self.average = {n: p.detach().float().clone() for n, p in params.items()}
        else:
            keep = min(self.decay, self.count / (self.count + 1))
            for name, p in params.items():
                self.average[name].mul_(keep).add_(p.detach().float(), alpha=1.0 - keep)
        self.count += 1

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights (in place; nothing if not active), then its own again."""
        if not self.active:
            yield
            return
        params = self.params
        own = {n: p.detach().clone() for n, p in params.items()}
        for name, p in params.items():
            p.copy_(self.average[name])
        try:
            yield
        finally:
            for name, p in params.items():
                p.copy_(own[name])

    def state_dict(self) -> dict[str, Any] | None:
        """The checkpoint's ``average`` entry: settings, count and the *training* weights (the file's model is the average)."""
        if not self.enabled:
            return None
        raw = {n: p.detach().cpu().clone() for n, p in self.params.items()} if self.active else None
        return {"decay": self.decay, "start": self.start, "count": self.count, "training_weights": raw}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint whose weights were just loaded into the model: they are the average."""
        if state is None or not state["count"]:
            self.count, self.average = 0, {}
            return
        params = self.params
        self.count = int(state["count"])
        self.average = {n: p.detach().float().clone() for n, p in params.items()}
        for name, p in params.items():
            p.copy_(state["training_weights"][name])


def write_training_weights(source: Path, target: Path) -> Path:
    """Write the training (not averaged) weights kept in an averaging run's checkpoint as a checkpoint of their own."""
    if target.resolve() == source.resolve():
        raise ConfigError(f"{target} is the checkpoint being read: give another file to write")
    obj = read_checkpoint(source)
    entry = (obj.get("training") or {}).get("average")
    if not entry or entry.get("training_weights") is None:
        raise MissingInputError(f"{source} holds no training weights beside an average: it was not written by a run "
                                "with train.ema_decay > 0 after averaging began (its model is the training weights)")
    model = {**obj["model"], **entry["training_weights"]}
    meta = {**obj["meta"], "weights_sha256": state_dict_sha256(model)}
    return atomic_torch_save({"meta": meta, "model": model}, target)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m models.averaging LAST_PT OUT_PT``; exit code 2 on a file that cannot serve."""
    parser = argparse.ArgumentParser(prog="python -m models.averaging", description=write_training_weights.__doc__)
    parser.add_argument("source", type=Path, help="last.pt (or checkpoint.pt) of a run with train.ema_decay > 0")
    parser.add_argument("target", type=Path, help="checkpoint file to write")
    args = parser.parse_args(argv)
    try:
        print(write_training_weights(args.source, args.target))
    except ValueError as exc:  # the file errors are ValueErrors too
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
