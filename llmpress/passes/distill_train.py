"""The training loop of ``distill``: match a student graph's next-token distributions to a teacher's.

Loss on a window of token ids with teacher logits ``t`` and student logits ``s`` (``[T, V]``), temperature ``tau``::

    p = softmax(t / tau),  log q = log_softmax(s / tau)
    KL(p || q) = tau^2 * mean over the T positions of  sum_v p_v (log p_v - log q_v)

(the ``tau^2`` keeps the gradient scale independent of ``tau``, Hinton et al. 2015). A step accumulates the
gradient of ``batch`` windows (each ``[1, seq_len]``: the captured LM takes one sequence at a time), then takes one
Adam step; ``after_step`` runs after it (``distill`` re-applies the sparsity masks there). Windows are visited in
seeded random order, an epoch at a time, so the same seed, data and starting weights give the same result.

Both graphs run as themselves: the student's ``graph_module`` is called with its placeholders bound to the stored
weights, except the trained tensors, which are bound to leaves that require gradients (so the compressed ops run
their reference kernels, and ``llmpress::wq_linear`` its autograd formula). Memory: one window's activations for the
backward pass, plus the teacher's log-probabilities of the calibration windows, cached while they fit in
``TEACHER_CACHE_BYTES`` (else recomputed per use).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.export.graph_signature import InputKind

from ..ir.module import Module

__all__ = ["TrainResult", "graph_logits", "kl_loss", "train_to_match"]

log = logging.getLogger(__name__)

TEACHER_CACHE_BYTES = 256 << 20


@dataclass
class TrainResult:
    steps: int
    loss_first: float  # mean KL of the first step's windows, before any update
    loss_last: float  # mean KL of the last step's windows
    losses: list[float] = field(default_factory=list)


def graph_logits(module: Module, inputs: Sequence[torch.Tensor], bound: dict[str, torch.Tensor] | None = None
                 ) -> torch.Tensor:
    """Run ``module``'s graph on the user ``inputs`` and return its first output (the logits). ``bound`` maps
    state-dict names to tensors that replace the stored weights (the leaves being trained)."""
    weights = module.weights()
    bound = bound or {}
    user = iter(inputs)
    args = [next(user) if s.kind == InputKind.USER_INPUT else bound.get(s.target, weights[s.target])
            for s in module.signature.input_specs]
    out = module.graph_module(*args)
    return out[0] if isinstance(out, (tuple, list)) else out


def kl_loss(teacher_logp: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tau^2 * mean_t sum_v p_v (log p_v - log q_v)`` with ``teacher_logp = log_softmax(t / tau)``."""
    s = torch.log_softmax(student_logits.reshape(-1, student_logits.shape[-1]).float() / temperature, dim=-1)
    t = teacher_logp.reshape(s.shape)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def train_to_match(student: Module, teacher: Module, windows: Sequence[torch.Tensor],
                   make_inputs: Callable[[torch.Tensor], list[torch.Tensor]], leaves: dict[str, torch.Tensor], *,
                   steps: int, lr: float, batch: int, temperature: float, seed: int,
                   after_step: Callable[[], None] = lambda: None, progress: bool = True,
                   lr_of: dict[int, float] | None = None) -> TrainResult:
    """Adam on ``leaves`` (state-dict name -> float tensor requiring grad) for ``steps`` steps of ``batch`` windows,
    minimizing ``kl_loss`` between ``teacher`` and ``student``; see the module docstring. ``lr_of`` maps
    ``id(leaf)`` to a learning rate other than ``lr``."""
    gen = torch.Generator().manual_seed(seed)
    groups: dict[float, list[torch.Tensor]] = {}
    for p in leaves.values():
        groups.setdefault((lr_of or {}).get(id(p), lr), []).append(p)
    opt = torch.optim.Adam([{"params": ps, "lr": g} for g, ps in groups.items()], lr=lr)
    per_window = windows[0].numel() * teacher.lm.vocab_size * 4 if teacher.lm is not None else 0
    cache_ok = per_window * len(windows) <= TEACHER_CACHE_BYTES
    cache: dict[int, torch.Tensor] = {}

    def teacher_logp(i: int) -> torch.Tensor:
        if i in cache:
            return cache[i]
        with torch.no_grad():
            logits = graph_logits(teacher, make_inputs(windows[i]))
            logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float() / temperature, dim=-1)
        if cache_ok:
            cache[i] = logp
        return logp

    order: list[int] = []
    losses: list[float] = []
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="distill", unit="step", leave=False)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(batch):
            if not order:
                order = torch.randperm(len(windows), generator=gen).tolist()
            i = order.pop()
            with torch.enable_grad():
                loss = kl_loss(teacher_logp(i), graph_logits(student, make_inputs(windows[i]), leaves), temperature)
                (loss / batch).backward()
            total += float(loss.detach()) / batch
        if not math.isfinite(total):
            raise FloatingPointError(f"distill: the loss became {total} at step {len(losses)}; lower lr={lr}")
        opt.step()
        after_step()
        losses.append(total)
        if progress:
            bar.set_postfix(kl=f"{total:.4f}")
    log.info("distill: KL %.4f -> %.4f in %d steps", losses[0], losses[-1], steps)
    return TrainResult(steps, losses[0], losses[-1], losses)
