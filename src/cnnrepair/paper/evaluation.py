"""Adversarial test sets and accuracy sweeps across epsilon, with the transfer matrix.

An adversarial test set (the paper's NADV, HADV, RHADV) is the test set in which every image for
which the attack on a *source* model succeeded is replaced by its adversarial example. Sets are
saved compactly (indices of replaced images and int8 perturbations) and every model is evaluated
on every set.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnrepair.attacks import AttackSpec, attack, check_eps, decode_perturbation, encode_perturbation
from cnnrepair.data import to_float
from cnnrepair.errors import CnnRepairError
from cnnrepair.io import load_npz, save_npz
from cnnrepair.paper.training import Progress, model_device, predict


class AdversarialSet:
    """Indices of replaced test images and their int8-encoded perturbations, for one (source, eps)."""

    def __init__(self, eps: float, index: np.ndarray, delta: np.ndarray, n: int):
        self.eps, self.index, self.delta, self.n = float(eps), np.asarray(index, np.int64), delta, int(n)

    def images(self, x_uint8: np.ndarray) -> torch.Tensor:
        """The replaced images alone (adversarial examples), in [0, 1]."""
        return decode_perturbation(x_uint8[self.index], self.delta, self.eps)

    def adversarial(self, clean_pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Positions (into ``index``) of true adversarial examples: images the source model got right clean.

        An attack "succeeds" on an image the model already misclassifies, but an adversarial
        example exists only for an image it gets right (the paper's definition): generalisation
        is measured on these alone. The set itself (and so NADV/HADV/RHADV) keeps every success.
        """
        return np.flatnonzero(np.asarray(clean_pred)[self.index] == np.asarray(y)[self.index])

    def full(self, x_uint8: np.ndarray) -> torch.Tensor:
        """The whole test set with the replacements made."""
        x = to_float(x_uint8)
        if len(self.index):
            x[torch.as_tensor(self.index)] = self.images(x_uint8)
        return x


def set_path(run_path: Path, attack_name: str, source: str, eps: float) -> Path:
    return Path(run_path) / "adversarial" / attack_name / f"{source}_eps{eps:g}.npz"


def _spec_key(spec: AttackSpec, n: int, model_fp: str, seed: int) -> str:
    return hashlib.sha256(f"{spec.as_dict()}|{n}|{model_fp}|{seed}".encode()).hexdigest()[:16]


def make_adversarial_set(model: nn.Module, x_uint8: np.ndarray, y: np.ndarray, eps: float, spec: AttackSpec, path: Path | None = None,
                         model_fp: str = "", seed: int = 0, progress: Progress | None = None, desc: str = "") -> tuple[AdversarialSet, float]:
    """Attack ``model`` on every image; keep the ones whose (decoded) adversarial example is misclassified.

    Returns the set and the attack's seconds (0 when reused from ``path``).
    """
    key = _spec_key(spec, len(y), model_fp, seed)
    if path is not None and path.is_file():
        saved = load_npz(path, "adversarial set")
        if str(saved.get("key")) == key and float(saved["eps"]) == eps:
            return AdversarialSet(eps, saved["index"], saved["delta"], len(y)), 0.0
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    x = to_float(x_uint8)
    adv, success = attack(model, x, y, eps, spec, progress=progress, desc=desc)
    seconds = time.perf_counter() - t0
    idx = torch.nonzero(success).flatten()
    delta = encode_perturbation(x[idx], adv[idx], eps)
    aset = AdversarialSet(eps, idx.numpy(), delta, len(y))
    if len(idx):  # keep only examples that stay adversarial after encoding
        with torch.no_grad():
            still = predict(model, aset.images(x_uint8)) != np.asarray(y)[aset.index]
        aset = AdversarialSet(eps, aset.index[still], delta[still], len(y))
    if path is not None:
        save_npz(path, index=aset.index, delta=aset.delta, eps=np.array(eps), key=np.array(key))
    return aset, seconds


@torch.no_grad()
def predictions_on_sets(models: dict[str, nn.Module], x_uint8: np.ndarray, sets: list[AdversarialSet], batch_size: int = 500) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Predictions of every model on the clean images and on each set's adversarial examples.

    Models sharing one feature extractor (NN, LH, KH, RLH) share its forward pass.
    """
    groups: dict[int, list[str]] = {}
    for name, m in models.items():
        groups.setdefault(id(getattr(m, "features", m)), []).append(name)

    def predict_all(x: torch.Tensor) -> dict[str, np.ndarray]:
        out = {name: [] for name in models}
        for i in range(0, len(x), batch_size):
            for names in groups.values():
                first = models[names[0]]
                xb = x[i:i + batch_size].to(model_device(first))
                if hasattr(first, "features") and hasattr(first, "head"):
                    feats = first.features(xb)
                    for n in names:
                        out[n].append(models[n].head(feats).argmax(1).cpu().numpy())
                else:
                    for n in names:
                        out[n].append(models[n](xb).argmax(1).cpu().numpy())
        return {n: np.concatenate(v) if v else np.zeros(0, np.int64) for n, v in out.items()}

    for m in models.values():
        m.eval()
    clean = predict_all(to_float(x_uint8))
    return clean, [predict_all(s.images(x_uint8)) for s in sets]


def sweep(models: dict[str, nn.Module], x_uint8: np.ndarray, y: np.ndarray, eps_list: list[float], spec: AttackSpec,
          run_path: Path | None = None, fingerprints: dict[str, str] | None = None, seed: int = 0,
          progress: Progress | None = None) -> dict:
    """Attack every model at every eps and evaluate every model on every adversarial set.

    Returns a JSON-ready dict: per-model accuracy on its own set (``own``), on the adversarial
    examples alone (``adv_only``), attack success rates, the ``transfer`` matrix
    (source -> target -> per-eps accuracy) and seconds per 10,000 attacked images.
    """
    eps_list = [check_eps(e) for e in eps_list]
    y = np.asarray(y)
    sets: dict[str, list[AdversarialSet]] = {}
    seconds: dict[str, float] = {}
    for name, model in models.items():
        sets[name], spent = [], 0.0
        for eps in eps_list:
            path = set_path(run_path, spec.name, name, eps) if run_path is not None else None
            aset, s = make_adversarial_set(model, x_uint8, y, eps, spec, path, (fingerprints or {}).get(name, ""), seed,
                                           progress, f"{spec.name} on {name.upper()} eps={eps:g}")
            sets[name].append(aset)
            spent += s
        if spent:
            seconds[name] = spent / (len(y) * len(eps_list)) * 10_000
    flat = [(src, i, s) for src, lst in sets.items() for i, s in enumerate(lst)]
    clean, adv_preds = predictions_on_sets(models, x_uint8, [s for _, _, s in flat])
    clean_acc = {n: float((p == y).mean()) for n, p in clean.items()}
    transfer = {src: {tgt: [0.0] * len(eps_list) for tgt in models} for src in models}
    adv_only = {n: [None] * len(eps_list) for n in models}
    for (src, i, aset), preds in zip(flat, adv_preds):
        for tgt in models:
            p = clean[tgt].copy()
            p[aset.index] = preds[tgt]
            transfer[src][tgt][i] = float((p == y).mean())
            if tgt == src:
                adv_only[tgt][i] = float((preds[tgt] == y[aset.index]).mean()) if len(aset.index) else None
    return {
        "settings": spec.as_dict(), "eps": eps_list, "n_images": int(len(y)), "seed": seed,
        "clean": clean_acc,
        "own": {n: transfer[n][n] for n in models},
        "success_rate": {n: [len(s.index) / len(y) for s in sets[n]] for n in models},
        "adv_only": adv_only,
        "transfer": transfer,
        "seconds_per_10k_images": seconds,
    }


def load_set(run_path: Path, attack_name: str, source: str, eps: float, n: int) -> AdversarialSet:
    """A saved adversarial set, or a one-line error saying which sweep makes it."""
    path = set_path(run_path, attack_name, source, eps)
    if not path.is_file():
        raise CnnRepairError(f"{path}: no {attack_name} set for {source.upper()} at eps={eps:g}; run `cnnrepair attack --out {run_path}` first")
    saved = load_npz(path, "adversarial set")
    return AdversarialSet(float(saved["eps"]), saved["index"], saved["delta"], n)
