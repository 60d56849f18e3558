"""The paper's repair experiment (section 3.2, figure 3): repair points, RLH, and its evaluation.

For each epsilon: attack LH on *training* images to get repair points, solve the repair LP for
each (K, feature selection) setting, save the repaired head (RLH), and evaluate NN, LH and RLH on
the clean test set (Data), on LH's test adversarial examples alone (ADV), and on the adversarial
test sets of NN (NADV), LH (HADV) and of a fresh attack on RLH itself (RHADV).

Targets: by default the decision values LH gives the *clean* training image an adversarial example
came from (the paper's "correct values of the decision function"); ``target="label"`` uses the
one-vs-rest margins instead (+1 for the true class, -1 for the others). Only adversarial examples
whose clean image LH classifies correctly are used, so a clean target is always a correct one.
The bias is not changed.

Anchors (beyond the paper, off by default): ``anchors="pairs"`` adds each repair point's clean
image as a point whose target is LH's own decision values, so the repair must keep the clean
image where it was; ``extra_anchors=N`` adds N more correctly classified clean training images.
Both enter the same LP as weighted target rows, which keeps clean accuracy from drawing down.

Repair points at a larger epsilon (beyond the paper, off by default): ``min_point_eps`` attacks the
training images at no less than that epsilon. At small epsilons LH rarely errs on its own training
set (on MNIST, 413 of 60,000 images at eps 0.025), and adversarial examples from a larger ball are
still adversarial examples the repaired model should handle.

Calibration (beyond the paper, off by default): given several anchor weights, each entry is
solved with the smallest weight (the boldest repair) whose drawdown on held-out clean *training*
images stays within a budget; the test set plays no part in the choice. Every weight tried is
recorded with its validation drawdown.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnrepair.attacks import attack, get_attack
from cnnrepair.data import Dataset, to_float
from cnnrepair.errors import CnnRepairError
from cnnrepair.paper.evaluation import make_adversarial_set, set_path
from cnnrepair.paper.hybrid import HybridNet, LinearHead, save_head
from cnnrepair.io import load_npz, save_npz
from cnnrepair.repair import MarginProblem, RepairProblem, RepairResult, repair, solve_margins, wilcoxon_select
from cnnrepair.paper.rundir import RunDir
from cnnrepair.paper.training import Progress, model_device, outputs, predict


@dataclass
class RepairSettings:
    """What to repair with: epsilons, numbers of repair points, selection, solver and targets."""

    eps: list[float]
    ks: list[int]
    selections: list[str]
    solver: str = "auto"
    target: str = "clean"
    select_p: float = 0.1
    attack: str = "fgsm"
    eval_images: int | None = None
    time_limit: float | None = None
    n_jobs: int = 1
    seed: int = 0
    anchors: str = "none"
    points: str = "random"
    extra_anchors: int = 0
    anchor_weight: float = 1.0
    delta_weight: float = 1.0
    anchor_weights: list[float] = field(default_factory=list)
    drawdown_budget: float = 0.5
    val_images: int = 10000
    min_point_eps: float = 0.0
    threads: int | None = None
    spec: str = "targets"
    margin: float = 0.05
    lp_device: str | None = None  # where the interior point runs (None: the CPU)

    def __post_init__(self) -> None:
        """Every value checked once, here (one-line errors naming the command-line option)."""
        from cnnrepair.attacks import check_eps
        from cnnrepair.runtime import check_threads

        self.eps = [check_eps(e) for e in self.eps]
        if not self.ks or min(self.ks) < 1:
            raise CnnRepairError(f"--k needs positive integers (got {self.ks})")
        for sel in self.selections or ["(none given)"]:
            if sel not in ("none", "wilcoxon"):
                raise CnnRepairError(f"unknown --selection {sel!r}; choose none, wilcoxon or both")
        if not (0 < self.select_p <= 1):
            raise CnnRepairError(f"--select-p must be in (0, 1], got {self.select_p}")
        if self.extra_anchors < 0 or not self.anchor_weight > 0 or any(not w > 0 for w in self.anchor_weights) or not self.delta_weight > 0:
            raise CnnRepairError("--extra-anchors must be >= 0, --anchor-weight and --delta-weight > 0")
        if self.spec == "pointwise" and (self.margin < 0 or "wilcoxon" in self.selections):
            raise CnnRepairError("--spec pointwise needs --margin >= 0 and --selection none (it changes any feature the optimum needs)")
        if len(self.anchor_weights) > 1 and self.extra_anchors == 0 and self.anchors == "none":
            raise CnnRepairError("several --anchor-weight values need anchors to weigh; add --extra-anchors N or --anchors pairs")
        if len(self.anchor_weights) > 1 and self.val_images < 1:
            raise CnnRepairError("--drawdown-budget must be >= 0 and --val-images >= 1")
        if self.eval_images is not None and self.eval_images < 1:
            raise CnnRepairError(f"--eval-images must be >= 1 (got {self.eval_images})")
        if self.time_limit is not None and not self.time_limit > 0:
            raise CnnRepairError(f"--time-limit must be > 0 seconds (got {self.time_limit})")
        if self.n_jobs == 0 or self.n_jobs < -1:
            raise CnnRepairError(f"--jobs must be >= 1, or -1 for every core (got {self.n_jobs})")
        check_threads(self.threads, "--threads")
        self.min_point_eps = check_eps(self.min_point_eps) if self.min_point_eps else 0.0


def repair_pool(run: RunDir, ds: Dataset, lh: HybridNet, eps: float, needed: int, attack_name: str, seed: int,
                progress: Progress | None = None, lh_fingerprint: str = "") -> dict[str, np.ndarray]:
    """Adversarial examples of LH on training images (cached): indices, clean and adversarial features.

    Training images are attacked in seeded chunks until ``needed`` successes are found (or the
    training set is used up); only images LH classifies correctly when clean are kept. The cache
    is keyed by what the pool depends on (the LH weights through ``lh_fingerprint``, the attack,
    eps and seed): a refitted head never reuses another head's repair points.
    """
    path = run.path / "repair" / f"pool_{attack_name}_eps{eps:g}.npz"
    key = hashlib.sha256(f"{lh_fingerprint}|{get_attack(attack_name).as_dict()}|{eps!r}|{seed}".encode()).hexdigest()[:16]
    if path.is_file():
        pool = load_npz(path, "repair pool")
        if str(pool.get("key")) == key and (len(pool["index"]) >= needed or bool(pool["exhausted"])):
            return pool
    spec = get_attack(attack_name)
    order = np.random.default_rng(seed).permutation(len(ds.y_train))
    chunk = max(1000, 4 * needed)
    idx_list, clean_list, adv_list, used = [], [], [], 0
    torch.manual_seed(seed)
    while used < len(order) and sum(len(i) for i in idx_list) < needed:
        take = order[used:used + chunk]
        used += len(take)
        x = to_float(ds.x_train[take])
        y = ds.y_train[take]
        clean_ok = predict(lh, x) == y
        adv, success = attack(lh, x, y, eps, spec, progress=progress, desc=f"repair points eps={eps:g}")
        keep = np.flatnonzero(success.numpy() & clean_ok)
        if len(keep):
            idx_list.append(take[keep])
            clean_list.append(outputs(lh.features, x[keep]))
            adv_list.append(outputs(lh.features, adv[keep]))
    d = lh.head.weight.shape[1]
    pool = {
        "index": np.concatenate(idx_list) if idx_list else np.zeros(0, np.int64),
        "clean": np.concatenate(clean_list) if clean_list else np.zeros((0, d), np.float32),
        "adv": np.concatenate(adv_list) if adv_list else np.zeros((0, d), np.float32),
        "exhausted": np.array(used >= len(order)),
        "attacked": np.array(used),
        "key": np.array(key),
    }
    save_npz(path, **pool)
    return pool


def order_points(pool: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    """Order the repair pool: ``random`` (seeded, as attacked) or ``typical`` first.

    ``typical`` ranks each pair by the cosine similarity of its feature shift (adversarial minus
    clean) to the pool's mean shift, so the first K points carry the perturbation pattern most
    adversarial examples share. Uses training images only.
    """
    if how == "random" or len(pool["index"]) == 0:
        return pool
    if how != "typical":
        raise CnnRepairError(f"unknown repair point order {how!r}; choose random or typical")
    shift = pool["adv"].astype(np.float64) - pool["clean"]
    mean = shift.mean(0)
    score = shift @ mean / (np.linalg.norm(shift, axis=1) * np.linalg.norm(mean) + 1e-12)
    order = np.argsort(-score, kind="stable")
    return {k: (v[order] if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == len(order) else v) for k, v in pool.items()}


def targets(lh_head: LinearHead, clean_feats: np.ndarray, labels: np.ndarray, kind: str) -> np.ndarray:
    """Target decision values for repair points: LH's values on the clean image, or +-1 margins."""
    if kind == "clean":
        return lh_head.decision_values(clean_feats)
    if kind == "label":
        y = -np.ones((len(labels), lh_head.weight.shape[0]))
        y[np.arange(len(labels)), labels] = 1.0
        return y
    raise CnnRepairError(f"unknown repair target {kind!r}; choose clean or label")


def _clean_order(ds: Dataset, s: RepairSettings) -> np.ndarray:
    """The seeded order clean training images are drawn in: anchors from its head, calibration images after them."""
    return np.random.default_rng(s.seed + 1).permutation(len(ds.y_train))


def _anchor_pool(ds: Dataset, lh: HybridNet, s: RepairSettings) -> dict[str, np.ndarray]:
    """Features and LH decision values of ``extra_anchors`` correctly classified clean training images."""
    if s.anchors not in ("none", "pairs"):
        raise CnnRepairError(f"unknown anchors {s.anchors!r}; choose none or pairs")
    if s.extra_anchors <= 0:
        return {"x": np.zeros((0, lh.head.weight.shape[1]), np.float32), "y": np.zeros((0, lh.head.weight.shape[0]))}
    order = _clean_order(ds, s)[:2 * s.extra_anchors]
    feats = outputs(lh.features, ds.x_train[order])
    dec = lh.head.decision_values(feats)
    ok = np.flatnonzero(dec.argmax(1) == ds.y_train[order])[:s.extra_anchors]
    return {"x": feats[ok], "y": dec[ok]}


def _point_weights(n_points: int, n_anchor: int, anchor_weight: float) -> np.ndarray | None:
    """Slack weights: 1 for each repair point, ``anchor_weight`` for each anchor (None when there are no anchors)."""
    return np.concatenate([np.ones(n_points), np.full(n_anchor, anchor_weight)]) if n_anchor else None


def _with_anchors(X: np.ndarray, Y: np.ndarray, clean: np.ndarray, lh_head: LinearHead, anchor_pool: dict, s: RepairSettings):
    """Append anchor rows (clean counterparts and/or extra clean points, targets = LH's own values) with their slack weights."""
    xs, ys = [X], [Y]
    if s.anchors == "pairs":
        xs.append(clean)
        ys.append(lh_head.decision_values(clean))
    xs.append(anchor_pool["x"])
    ys.append(anchor_pool["y"])
    Xa, Ya = np.concatenate(xs), np.concatenate(ys)
    n_anchor = len(Xa) - len(X)
    return Xa, Ya, _point_weights(len(X), n_anchor, s.anchor_weight), n_anchor


def _validation_pool(ds: Dataset, lh: HybridNet, s: RepairSettings) -> dict[str, np.ndarray]:
    """Clean training images held out from the anchors, for calibration: index, features, labels."""
    d = lh.head.weight.shape[1]
    if len(s.anchor_weights) < 2:
        return {"index": np.zeros(0, np.int64), "x": np.zeros((0, d), np.float32), "y": np.zeros(0, np.int64)}
    start = 2 * s.extra_anchors  # _anchor_pool draws from the first 2 * extra_anchors of the same order
    idx = np.sort(_clean_order(ds, s)[start:start + s.val_images])
    if len(idx) == 0:
        raise CnnRepairError(f"no training images left for calibration after {s.extra_anchors} anchors; lower --extra-anchors")
    return {"index": idx, "x": outputs(lh.features, ds.x_train[idx]), "y": ds.y_train[idx]}


def _solve_pointwise(W: np.ndarray, b: np.ndarray, Xa: np.ndarray, labels: np.ndarray, n_anchor: int, lh_head: LinearHead,
                     s: RepairSettings) -> RepairResult:
    """The guaranteed spec on the same points: every repair point labelled with ``s.margin``, every
    anchor keeps LH's label (hard), minimal L1 change of W (the bias stays, as in the paper's RLH)."""
    K = len(labels)
    keep_labels = lh_head.decision_values(Xa[K:]).argmax(1) if n_anchor else np.zeros(0, np.int64)
    problem = MarginProblem(W, b, Xa, np.concatenate([labels, keep_labels]),
                            np.concatenate([np.full(K, s.margin), np.zeros(n_anchor)]), None, "l1", True)
    sol = solve_margins(problem, time_limit=s.time_limit)
    return RepairResult(sol.delta_weight, np.zeros((len(Xa), W.shape[0])), float(sol.objective) if sol.ok else float("nan"),
                        sol.status, "margins", sol.seconds, {**sol.size, "variables": 2 * sol.size.get("entries", 0)},
                        [{"lower_bound": sol.lower_bound, "gap": sol.gap}])


def _solve(W: np.ndarray, b: np.ndarray, X: np.ndarray, Y: np.ndarray, clean: np.ndarray, lh_head: LinearHead, anchor_pool: dict,
           val: dict[str, np.ndarray], mask: np.ndarray | None, s: RepairSettings, labels: np.ndarray | None = None):
    """Solve one entry's LP; with several anchor weights, calibrate on the validation images.

    Weights are tried from the smallest up; the first whose validation drawdown (points of clean
    accuracy lost on ``val``) is within ``s.drawdown_budget`` is kept. If none is, the largest is
    kept and the entry says the budget was not met. Returns (result, rows, calibration or None).
    """
    Xa, Ya, _, n_anchor = _with_anchors(X, Y, clean, lh_head, anchor_pool, s)
    if s.spec == "pointwise":
        return _solve_pointwise(W, b, Xa, labels, n_anchor, lh_head, s), (Xa, Ya, None, n_anchor), None

    def solve(aw: float):
        weights = _point_weights(len(X), n_anchor, aw)
        problem = RepairProblem(W, b, Xa, Ya, mask=mask, point_weights=weights, delta_weight=s.delta_weight)
        return (repair(problem, s.solver, s.time_limit, n_jobs=s.n_jobs, threads=s.threads, device=s.lp_device),
                (Xa, Ya, weights, n_anchor))

    if len(s.anchor_weights) < 2:
        return (*solve(s.anchor_weight), None)
    base = float((lh_head.decision_values(val["x"]).argmax(1) == val["y"]).mean())
    tried = []
    for aw in sorted(s.anchor_weights):
        result, rows = solve(aw)
        row = {"anchor_weight": aw, "status": result.status, "seconds": result.seconds}
        if result.ok:
            acc = float((LinearHead(W + result.gamma, b).decision_values(val["x"]).argmax(1) == val["y"]).mean())
            row["val_drawdown"] = 100 * (base - acc)
        tried.append(row)
        if result.ok and row["val_drawdown"] <= s.drawdown_budget:
            break
    met = bool(tried[-1].get("val_drawdown", np.inf) <= s.drawdown_budget)  # the kept weight is the last one tried
    return result, rows, {"anchor_weight": aw, "budget": s.drawdown_budget, "budget_met": met,
                          "val_images": int(len(val["y"])), "tried": tried}


def _acc(pred: np.ndarray, y: np.ndarray) -> float | None:
    return float((pred == y).mean()) if len(y) else None


def run_repair_experiment(run: RunDir, ds: Dataset, models: dict[str, torch.nn.Module], test_feats: np.ndarray,
                          s: RepairSettings, fingerprints: dict[str, str], progress: Progress | None = None,
                          folder: Path | None = None) -> list[dict]:
    """Every (eps, K, selection) entry: repair, save RLH and its LP under ``folder``, evaluate. Returns the entries.

    Only an entry whose LP was solved to optimality gets an ``rlh.pt``; a warning is recorded when
    the optimum changes no weight (the RLH is then LH itself).
    """
    folder = Path(folder) if folder is not None else run.path / "repair"
    lh, nn_model = models["lh"], models["nn"]
    W, b = lh.head.weight.cpu().numpy(), lh.head.bias.cpu().numpy()
    spec = get_attack(s.attack)
    x_test, y_test = ds.x_test, ds.y_test
    sub = np.arange(len(y_test))
    if s.eval_images is not None and s.eval_images < len(y_test):
        sub = np.sort(np.random.default_rng(s.seed).permutation(len(y_test))[:s.eval_images])
    x_eval, y_eval, f_eval = x_test[sub], y_test[sub], test_feats[sub]
    clean_nn, clean_lh = predict(nn_model.head, f_eval), predict(lh.head, f_eval)
    anchor_pool = _anchor_pool(ds, lh, s)
    val_pool = _validation_pool(ds, lh, s)
    entries = []
    for eps in s.eps:
        sets, set_feats = {}, {}
        for src in ("nn", "lh"):
            path = set_path(run.path, s.attack, src, eps) if len(sub) == len(y_test) else None
            sets[src], _ = make_adversarial_set(models[src], x_eval, y_eval, eps, spec, path, fingerprints.get(src, ""), s.seed,
                                                progress, f"{s.attack} on {src.upper()} eps={eps:g}")
            set_feats[src] = outputs(lh.features, sets[src].images(x_eval))
        bench = _Bench(models, x_eval, y_eval, f_eval, clean_nn, clean_lh, sets, set_feats, eps, spec, s.seed, progress)
        point_eps = max(eps, s.min_point_eps)
        pool = order_points(repair_pool(run, ds, lh, point_eps, max(s.ks), s.attack, s.seed, progress, fingerprints.get("lh", "")),
                            s.points)
        n_pool = len(pool["index"])
        mask_cache: dict[str, tuple[np.ndarray | None, dict]] = {}
        for sel in s.selections:
            if sel == "none":
                mask_cache[sel] = (None, {"selected": int(W.shape[1])})
            elif sel == "wilcoxon":
                if n_pool < 6:
                    mask_cache[sel] = (None, {"error": f"only {n_pool} clean/adversarial pairs: too few for a Wilcoxon test"})
                    continue
                mask, pvals = wilcoxon_select(pool["clean"], pool["adv"], s.select_p)
                if not mask.any():
                    mask_cache[sel] = (None, {"error": f"Wilcoxon selection keeps no feature at p < {s.select_p}; raise --select-p"})
                    continue
                mask_cache[sel] = (mask, {"selected": int(mask.sum()), "pairs": n_pool, "p_threshold": s.select_p})
            else:
                raise CnnRepairError(f"unknown feature selection {sel!r}; choose none or wilcoxon")
        for K in s.ks:
            k_used = min(K, n_pool)  # a small training set may hold fewer adversaries than asked for: use all, say so
            X = pool["adv"][:k_used]
            Y = targets(lh.head, pool["clean"][:k_used], ds.y_train[pool["index"][:k_used]], s.target)
            keep = ~np.isin(val_pool["index"], pool["index"][:k_used])  # a repair point's own clean image never validates it
            val = {key: v[keep] for key, v in val_pool.items()}
            for sel in s.selections:
                if "error" in mask_cache[sel][1]:
                    entries.append({"eps": eps, "k": K, "k_used": k_used, "selection": sel, **mask_cache[sel][1]})
                    continue
                if k_used == 0:
                    entries.append({"eps": eps, "k": K, "k_used": 0, "selection": sel, "error": "no adversarial training example of LH found; nothing to repair"})
                    continue
                mask, sel_info = mask_cache[sel]
                result, (Xa, Ya, weights, n_anchor), calibration = _solve(W, b, X, Y, pool["clean"][:k_used], lh.head, anchor_pool, val, mask, s,
                                                                  ds.y_train[pool["index"][:k_used]])
                name = f"eps{eps:g}_k{K}_{sel}"
                entry = {"name": name, "eps": eps, "point_eps": point_eps, "k": K, "k_used": k_used, "selection": sel, **sel_info,
                         "target": s.target, "spec": s.spec, **({"margin": s.margin} if s.spec == "pointwise" else {}),
                         "anchors": s.anchors, "n_anchor_points": n_anchor, "lp": result.summary()}
                if calibration is not None:
                    entry["calibration"] = calibration
                per_class = entry["lp"].pop("per_class")
                if s.spec == "pointwise" and per_class:
                    entry["lp"].update(per_class[0])  # its certified lower bound and gap
                save_npz(folder / name / "repair_problem.npz", W=W, b=b, X=Xa, Y=Ya,
                         mask=mask if mask is not None else np.ones(W.shape[1], bool), gamma=result.gamma, delta=result.delta,
                         objective=np.array(result.objective), solver=np.array(result.solver), status=np.array(result.status),
                         point_weights=weights if weights is not None else np.ones(len(Xa)), delta_weight=np.array(s.delta_weight))
                if not result.ok:
                    entry["error"] = f"LP not solved ({result.status}); no RLH saved"
                    entries.append(entry)
                    continue
                if not result.gamma.any():
                    entry["warning"] = "the optimum changes no weight: RLH is LH (slack is cheaper; raise --delta-weight or K)"
                rlh_head = LinearHead(W + result.gamma, b)
                save_head(folder / name / "rlh.pt", rlh_head, {"eps": eps, "k": K, "selection": sel})
                rlh = HybridNet(lh.features, rlh_head.to(model_device(lh.head))).eval()
                entry.update(_evaluate(rlh, bench, X[:k_used], ds.y_train[pool["index"][:k_used]]))
                entries.append(entry)
    return entries


@dataclass
class _Bench:
    """What every RLH of one epsilon is measured on: the models, the test slice (images, labels, features), NN's
    and LH's clean predictions on it, their adversarial sets at ``eps`` (and those sets' features), and how the
    fresh attack on each RLH runs."""

    models: dict[str, torch.nn.Module]
    x: np.ndarray
    y: np.ndarray
    feats: np.ndarray
    clean_nn: np.ndarray
    clean_lh: np.ndarray
    sets: dict
    set_feats: dict[str, np.ndarray]
    eps: float
    attack: object
    seed: int
    progress: Progress | None


def _evaluate(rlh, bench: _Bench, X: np.ndarray, y_points: np.ndarray) -> dict:
    """Figure-3 accuracies and the repair-literature measures for one RLH (``X``, ``y_points``: its repair points)."""
    lh, models, eps, spec, seed, progress = bench.models["lh"], bench.models, bench.eps, bench.attack, bench.seed, bench.progress
    x_eval, y_eval, f_eval, sets, set_feats = bench.x, bench.y, bench.feats, bench.sets, bench.set_feats
    clean_nn, clean_lh = bench.clean_nn, bench.clean_lh
    head = {"nn": models["nn"].head, "lh": lh.head, "rlh": rlh.head}
    clean = {"nn": clean_nn, "lh": clean_lh, "rlh": predict(rlh.head, f_eval)}
    on_sets = {src: {m: predict(h, set_feats[src]) for m, h in head.items()} for src in sets}
    points_ok = predict(rlh.head, X) == y_points
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    adv, success = attack(rlh, x_eval, y_eval, eps, spec, progress=progress, desc=f"fresh {spec.name} on RLH eps={eps:g}")
    rh_idx = np.flatnonzero(success.numpy())
    rh_feats = outputs(lh.features, adv[rh_idx])
    on_rh = {m: predict(h, rh_feats) for m, h in head.items()}
    attack_s = time.perf_counter() - t0

    def set_acc(idx: np.ndarray, preds: dict, m: str) -> float:
        p = clean[m].copy()
        p[idx] = preds[m]
        return float((p == y_eval).mean())

    true_adv = sets["lh"].adversarial(clean_lh, y_eval)  # LH's test adversaries, clean errors left out
    clean_err = np.setdiff1d(np.arange(len(sets["lh"].index)), true_adv)
    acc = {}
    for m in ("nn", "lh", "rlh"):
        acc[m] = {
            "data": _acc(clean[m], y_eval),
            "adv": _acc(on_sets["lh"][m][true_adv], y_eval[sets["lh"].index[true_adv]]),
            "clean_errors": _acc(on_sets["lh"][m][clean_err], y_eval[sets["lh"].index[clean_err]]),
            "nadv": set_acc(sets["nn"].index, on_sets["nn"], m),
            "hadv": set_acc(sets["lh"].index, on_sets["lh"], m),
            "rhadv": set_acc(rh_idx, on_rh, m),
        }
    return {
        "accuracy": acc,
        "efficacy": float(points_ok.mean()),
        "drawdown": acc["lh"]["data"] - acc["rlh"]["data"],
        "generalisation": acc["rlh"]["adv"],
        "unseen_lh_adversaries": int(len(true_adv)),
        "lh_attack_successes_on_clean_errors": int(len(clean_err)),
        "rlh_attack_success_rate": float(len(rh_idx) / len(y_eval)),
        "rhadv_attack_seconds": attack_s,
        "n_eval_images": int(len(y_eval)),
    }
