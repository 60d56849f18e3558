"""How a repaired model's margins are measured: as it runs (float32 included), in several batch layouts.

A float32 forward pass may give an input other outputs in another batch (BLAS picks kernels by
shape), so every margin the certificate claims is the smallest over the layouts of
:data:`LAYOUTS`, on the repaired model and again on the saved file.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cnnrepair.repair.ending import ending as ending_named
from cnnrepair.repair.outputs import OutputRows
from cnnrepair.repair.program import margins_of
from cnnrepair.runtime import eval_mode, first_output, model_device


# The batch layouts every margin is measured in, on the repaired model and on the saved file: a
# float32 forward pass may give an input other outputs in another batch (BLAS picks kernels by
# shape), so a margin counts only as its smallest over these (batch size, reversed order) layouts.
LAYOUTS: tuple[tuple[int, bool], ...] = ((512, False), (1, False), (61, True))


def layouts_record() -> list[dict]:
    """The layouts as the certificate records them."""
    return [{"batch_size": b, "order": "reversed" if r else "given"} for b, r in LAYOUTS]


def in_layout(logits_of, x, batch_size: int, reverse: bool) -> np.ndarray:
    """``logits_of(batch)`` over ``x`` in batches of ``batch_size``, in reversed order if asked, returned in ``x``'s order."""
    n = len(x)
    order = np.arange(n)[::-1] if reverse else np.arange(n)
    outs = [np.asarray(logits_of(x[torch.as_tensor(order[i:i + batch_size].copy())]), np.float64) for i in range(0, n, batch_size)]
    if not outs:
        return np.zeros((0, 0))
    out = np.concatenate(outs)
    res = np.empty_like(out)
    res[order] = out
    return res


def layout_margins(logits_of, x, y: np.ndarray, ending: str = "none", rows: OutputRows | None = None) -> np.ndarray:
    """Margins (len(LAYOUTS) x N) of ``logits_of`` in every layout of :data:`LAYOUTS`; ``ending``: what ends the model
    (:mod:`cnnrepair.repair.ending`), whose ``scores`` turn its outputs into values whose differences are the margins.
    ``rows``: each point's own output rows (:mod:`cnnrepair.repair.outputs`), whose smallest value is its margin."""
    y = np.asarray(y, np.int64)
    if len(y) == 0:
        return np.zeros((len(LAYOUTS), 0))
    x = torch.as_tensor(x)
    scores = ending_named(ending).scores
    margin = (lambda s: margins_of(s, y)) if rows is None else rows.margins
    return np.stack([margin(scores(in_layout(logits_of, x, b, r))) for b, r in LAYOUTS])


def module_logits_fn(model: nn.Module):
    """A batch -> float64 logits function running ``model`` as it runs (its own dtype and device)."""
    device = model_device(model)
    eval_mode(model)

    def run(xb: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            res = first_output(model(xb.to(device)))
        return res.detach().double().cpu().numpy()

    return run


def robust_margins(model: nn.Module, x, y: np.ndarray, ending: str = "none", rows: OutputRows | None = None) -> np.ndarray:
    """Each input's smallest margin over the batch layouts of :data:`LAYOUTS` (through the model's ``ending``; of its own
    output ``rows`` when given)."""
    if len(y) == 0:
        return np.zeros(0)
    return layout_margins(module_logits_fn(model), x, y, ending, rows).min(0)


def model_logits(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """The model's outputs as it runs (its own dtype, eval mode), returned as float64."""
    x = torch.as_tensor(x)
    run = module_logits_fn(model)
    out = [run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def change_norms(d: np.ndarray) -> dict:
    """L1, L-infinity and non-zeros of a change (any shape)."""
    d = np.asarray(d, np.float64).ravel()
    return {"l1": float(np.abs(d).sum()), "linf": float(np.abs(d).max(initial=0.0)), "nonzero": int(np.count_nonzero(d))}


def change_summary(dW: np.ndarray, db: np.ndarray, freeze_bias: bool) -> dict:
    """L1, L-infinity and non-zeros of a change, weights and biases together."""
    d = np.concatenate([dW.ravel(), [] if freeze_bias else db.ravel()])
    return {**change_norms(d), "weights_changed": int(np.count_nonzero(dW)), "biases_changed": int(np.count_nonzero(db)),
            "rows_changed": int(np.count_nonzero(np.abs(np.hstack([dW, db[:, None]])).sum(1)))}
