"""A certificate that cannot lie, files that cannot run code, and no data lost (issue 21).

One test (or parametrised group) per finding of the hostile review: a crafted ``.pt2`` that runs a
command when unpickled, a batch-dependent conflict, the input model inside ``--out``, a stray or
concurrent output, edited certificates, Ctrl-C during a HiGHS solve, a full file system, tracebacks
instead of one line, and bad input that was accepted.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cnnrepair import CnnRepairError, Points, RepairSpec, load_model, repair_classifier
from cnnrepair.cli import main
from cnnrepair.repair.program import margins_of

ROOT = Path(__file__).resolve().parent.parent

from tests.helpers import random_points, small_mlp


_mlp, _points = small_mlp, random_points


def _export(model: nn.Module, path: Path) -> Path:
    program = torch.export.export(model, (torch.zeros(2, 1, 3, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


@pytest.fixture()
def files(tmp_path):
    """m.pt2 / m.onnx (a small MLP), p.npz (20 points with wrong labels), k.npz (40 keep points)."""
    model = _mlp()
    _export(model, tmp_path / "m.pt2")
    from cnnrepair.formats.onnx import import_onnx

    import_onnx()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(2, 1, 3, 4),), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    x, pred = _points(model, 60)
    np.savez(tmp_path / "p.npz", x=x[:20].numpy(), y=((pred[:20] + 1) % 5).astype(np.int64))
    np.savez(tmp_path / "k.npz", x=x[20:].numpy(), y=pred[20:].astype(np.int64))
    return tmp_path


def _err(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _one_line(capsys, *needles: str) -> str:
    """Exactly one stderr line, the error (a progress line that came before it is dropped), and no traceback."""
    lines = [line for line in _err(capsys) if not line.startswith("repairing layer")]
    assert len(lines) == 1 and lines[0].startswith("cnnrepair: error:"), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- 1. a model file can never run code --------------------------------------------------------------
class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _craft(src: Path, dst: Path, member_suffix: str, payload: bytes) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(member_suffix):
                data = payload
            zout.writestr(info, data)
    return dst


def _evil_payload(marker: Path) -> bytes:
    _Evil.marker = str(marker)
    buf = io.BytesIO()
    torch.save(((_Evil(),), {}), buf)
    return buf.getvalue()


def test_the_crafted_archive_really_runs_code_under_plain_torch_export_load(files, tmp_path):
    """The threat is real: torch.export.load itself runs the payload (so the refusals below are not vacuous)."""
    marker = tmp_path / "ran-plain"
    evil = _craft(files / "m.pt2", tmp_path / "evil.pt2", "data/sample_inputs/model.pt", _evil_payload(marker))
    import logging

    logging.disable(logging.CRITICAL)
    try:
        torch.export.load(str(evil))
    finally:
        logging.disable(logging.NOTSET)
    assert marker.exists()


@pytest.mark.parametrize("command", ["points", "repair", "evaluate", "vnnlib", "verify-original"])
def test_a_pt2_whose_sample_inputs_run_code_is_refused_by_every_command(files, tmp_path, capsys, command):
    marker = tmp_path / "ran"
    evil = _craft(files / "m.pt2", tmp_path / "evil.pt2", "data/sample_inputs/model.pt", _evil_payload(marker))
    p = str(files / "p.npz")
    if command == "verify-original":
        assert main(["repair", str(files / "m.pt2"), "--points", p, "--out", str(tmp_path / "ok")]) == 0
        capsys.readouterr()
        args = ["verify", str(tmp_path / "ok" / "certificate.json"), "--model", str(tmp_path / "ok" / "repaired.pt2"), "--points", p,
                "--original", str(evil)]
    else:
        args = {"points": ["points", str(evil), "--dataset", "digits", "--out", str(tmp_path / "o")],
                "repair": ["repair", str(evil), "--points", p, "--out", str(tmp_path / "o")],
                "evaluate": ["evaluate", str(evil), "--dataset", "digits", "--out", str(tmp_path / "o")],
                "vnnlib": ["vnnlib", str(evil), "--points", p, "--eps", "0.01", "--out", str(tmp_path / "o")]}[command]
    assert main(args) == 2
    _one_line(capsys, "refused to load", "data/sample_inputs/model.pt", "run code")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_pickled_constants_and_custom_objects_are_refused_and_the_library_raises(files, tmp_path):
    marker = tmp_path / "ran"
    evil = _craft(files / "m.pt2", tmp_path / "w.pt2", "data/weights/weight_0", _evil_payload(marker))
    with zipfile.ZipFile(evil) as z:  # mark the weight as pickled, as torch does for tensor subclasses
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(z.read(name))
    key = next(iter(config["config"]))
    config["config"][key]["use_pickle"] = True
    _craft(evil, tmp_path / "w2.pt2", "model_weights_config.json", json.dumps(config).encode())
    with pytest.raises(CnnRepairError, match="refused to load.*weight_0"):
        load_model(tmp_path / "w2.pt2")
    config["config"][key]["path_name"] = "opaque_obj_0"
    _craft(evil, tmp_path / "w3.pt2", "model_weights_config.json", json.dumps(config).encode())
    with pytest.raises(CnnRepairError, match="pickled object"):
        load_model(tmp_path / "w3.pt2")
    assert not marker.exists()
    assert load_model(files / "m.pt2").input_shape == (1, 3, 4)  # an honest file still loads


# -- 2. one point to float32 is one point; margins whatever the batch; ill-conditioned changes --------
def test_keep_points_equal_to_repair_points_with_other_labels_are_a_conflict_not_a_certificate(files, tmp_path, capsys):
    data = np.load(files / "p.npz")
    np.savez(tmp_path / "k3.npz", x=data["x"][:3], y=(data["y"][:3] + 1) % 5)
    out = tmp_path / "o"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--keep", str(tmp_path / "k3.npz"),
                 "--out", str(out)]) == 1
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["status"] == "infeasible" and not (out / "repaired.pt2").exists()
    assert {(c["set"], c["index"]) for c in cert["conflicts"]} == {("points", 0), ("keep", 0)}
    assert len(cert["coinciding"]) == 3 and "conflict" in capsys.readouterr().err


def test_inputs_equal_within_float32_noise_coincide_and_a_near_conflict_is_ill_conditioned():
    model = _mlp()
    x, pred = _points(model, 20)
    y = (pred + 1) % 5
    g = torch.Generator().manual_seed(5)
    near = x[:3] + 1e-7 * torch.randn(3, 1, 3, 4, generator=g)  # not bit-identical; features differ by float32 noise
    r = repair_classifier(model, x, y, RepairSpec(margin=0.05), keep=Points(near, (y[:3] + 1) % 5))
    assert r.status == "infeasible" and r.model is None and r.certificate.coinciding
    apart = x[:3] + 1e-4 * torch.randn(3, 1, 3, 4, generator=g)  # separable only by a change thousands of times the weights
    r = repair_classifier(model, x, y, RepairSpec(margin=0.05), keep=Points(apart, (y[:3] + 1) % 5))
    assert r.status == "ill-conditioned" and r.model is None and r.certificate.conditioning["ratio"] > 1000
    assert "ill-conditioned" in r.notes[0]
    r = repair_classifier(model, x, y, RepairSpec(margin=0.05, max_change_ratio=None), keep=Points(apart, (y[:3] + 1) % 5))
    assert r.status == "repaired"  # the limit is a choice the caller can lift


def test_the_same_input_gets_one_feature_vector_and_margins_hold_in_every_batch_layout(files, tmp_path):
    from cnnrepair.repair.measure import LAYOUTS

    out = tmp_path / "o"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--keep", str(files / "k.npz"), "--out", str(out),
                 "--margin", "0.1"]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    assert len(cert["batch_layouts"]) == len(LAYOUTS) >= 3 and len(cert["margins_by_layout"]) == len(LAYOUTS)
    program = torch.export.load(str(out / "repaired.pt2")).module()
    data = np.load(files / "p.npz")
    x = torch.from_numpy(data["x"])
    for batch in (1, 2, 3, 7, 20):
        with torch.no_grad():
            logits = torch.cat([program(x[i:i + batch]) for i in range(0, len(x), batch)]).double().numpy()
        assert margins_of(logits, data["y"]).min() >= 0.1
    from cnnrepair.repair.coincide import shared_features
    from cnnrepair.repair.layer import last_layer

    model = load_model(files / "m.pt2").module
    lay = last_layer(model, x[:2])
    a, b = shared_features(lay, x, x[[3, 1, 4]])
    assert np.array_equal(a[[3, 1, 4]], b)  # bit-identical wherever the input appears


# -- 3./4. no data lost: inputs inside --out, stray files, concurrent runs ------------------------------
def test_the_input_model_inside_out_is_never_touched(files, tmp_path, capsys):
    d = tmp_path / "d"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--out", str(d)]) == 0
    before = (d / "repaired.pt2").read_bytes()
    np.savez(tmp_path / "conflicting.npz", x=np.concatenate([np.load(files / "p.npz")["x"][:2]] * 2),
             y=np.array([0, 1, 2, 3], np.int64))
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main(["repair", str(d / "repaired.pt2"), "--points", str(tmp_path / "conflicting.npz"), "--out", str(d), *extra]) == 2
        _one_line(capsys, "lies inside --out")
        assert (d / "repaired.pt2").read_bytes() == before


def test_stray_files_in_out_are_refused_and_overwrite_replaces_only_repair_files(files, tmp_path, capsys):
    p = str(files / "p.npz")
    out = tmp_path / "o"
    out.mkdir()
    (out / "repaired.pt2").write_bytes(b"an earlier model without a certificate")
    assert main(["repair", str(files / "m.pt2"), "--points", p, "--out", str(out)]) == 2
    _one_line(capsys, "already holds repaired.pt2", "--overwrite")
    assert (out / "repaired.pt2").read_bytes() == b"an earlier model without a certificate"
    (out / "notes.txt").write_text("mine")
    assert main(["repair", str(files / "m.pt2"), "--points", p, "--out", str(out), "--overwrite"]) == 2
    _one_line(capsys, "did not write", "notes.txt")
    (out / "notes.txt").unlink()
    assert main(["repair", str(files / "m.pt2"), "--points", p, "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["certificate.json", "repaired.pt2"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the published folder is not left private like a temp folder
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".o.")) == []  # no staging or lock left behind
    # a failed repair with --overwrite leaves its certificate alone: no model that it does not cover
    np.savez(tmp_path / "bad.npz", x=np.concatenate([np.load(p)["x"][:1]] * 2), y=np.array([0, 1], np.int64))
    assert main(["repair", str(files / "m.onnx"), "--points", str(tmp_path / "bad.npz"), "--out", str(out), "--overwrite"]) == 1
    assert sorted(os.listdir(out)) == ["certificate.json"]


def test_a_second_run_into_a_locked_out_is_refused_at_once(files, tmp_path, capsys):
    from cnnrepair.modelrepair import output_dir

    out = tmp_path / "o"
    holder = output_dir(out, [])
    with holder:
        t0 = time.perf_counter()
        assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--out", str(out)]) == 2
        assert time.perf_counter() - t0 < 30
        _one_line(capsys, "another cnnrepair run is writing there")
    assert not out.exists() or not os.listdir(out)


def test_two_concurrent_repairs_into_one_out_never_both_succeed(files, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-c", "import sys; from cnnrepair.cli import main; sys.exit(main(sys.argv[1:]))", "repair"]
    procs = [subprocess.Popen([*cmd, str(files / name), "--points", str(files / "p.npz"), "--keep", str(files / "k.npz"),
                               "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("m.pt2", "m.onnx")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another" in loser or "already holds" in loser
    files_out = sorted(os.listdir(out))
    assert files_out[0] == "certificate.json" and len(files_out) == 2
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["model"]["file"] == files_out[1]  # the model there is the one its certificate covers
    assert main(["verify", str(out / "certificate.json"), "--model", str(out / files_out[1]), "--points", str(files / "p.npz"),
                 "--keep", str(files / "k.npz")]) == 0


# -- 5. verify recomputes every claim: an edited field fails ---------------------------------------
# Fields verify does not check, as docs/trust.md lists them: informational records and file names.
UNCHECKED = ("model.file", "source_model.file", "points_file.file", "keep_file.file", "solver.", "notes", "feature_noise.",
             "lower_bound_witness.")


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(obj, list) and obj and not all(isinstance(v, (int, float)) for v in obj):
        for i, v in enumerate(obj[:2]):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def _edited(value):
    """A different value of the same type, in the direction that claims more."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + max(1, abs(value))
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if value else [1]
    return 1


def _set(obj, path: str, value):
    keys = path.split(".")
    for k in keys[:-1]:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    last = keys[-1]
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


@pytest.mark.parametrize("spec", ["pointwise", "ball"])
def test_every_edited_certificate_field_fails_verify(files, tmp_path, spec):
    from cnnrepair.verify import verify_certificate

    out = tmp_path / "o"
    extra = ["--spec", "ball", "--eps", "0.01", "--range", "none", "--bounds", "ibp"] if spec == "ball" else []
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--keep", str(files / "k.npz"), "--out", str(out),
                 "--margin", "0.1", *extra]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    args = dict(model_path=out / "repaired.pt2", points_path=files / "p.npz", keep_path=files / "k.npz", original_path=files / "m.pt2")
    assert verify_certificate(out / "certificate.json", **args).holds
    accepted, refused, edited = [], [], 0
    for path, value in _leaves(cert):
        if path.startswith(UNCHECKED) or path in ("ball.bound_seconds", "ball.note"):
            continue
        bad = copy.deepcopy(cert)
        _set(bad, path, _edited(value))
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        edited += 1
        try:
            report = verify_certificate(tmp_path / "bad.json", **args)
        except CnnRepairError:
            refused.append(path)  # malformed: refused in one line
            continue
        if report.holds:
            accepted.append(path)
    assert edited >= (50 if spec == "pointwise" else 60)
    assert accepted == []
    assert len(refused) < edited / 2  # most edits are well-formed claims that verify recomputes and finds false


def test_every_edited_field_of_a_property_repair_with_a_final_relu_fails_verify(tmp_path):
    """The same on a certificate made from VNN-LIB files (its properties block) of an ERAN-style model (its ending)."""
    from cnnrepair.verify import verify_certificate
    from tests.test_vnnlib import _eran_style

    model, props, _ = _eran_style(tmp_path)
    out = tmp_path / "o"
    assert main(["repair", str(model), "--vnnlib", *map(str, props), "--out", str(out), "--margin", "0.02", "--bounds", "ibp"]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["ending"]["name"] == "relu" and len(cert["properties"]) == len(props)
    args = dict(model_path=out / "repaired.onnx", points_path=out / "points.npz", keep_path=out / "keep.npz", original_path=model,
                properties=props)
    assert verify_certificate(out / "certificate.json", **args).holds
    accepted, edited = [], 0
    for path, value in _leaves(cert):
        if path.startswith(UNCHECKED) or path in ("ball.bound_seconds", "ball.note") or (path.startswith("properties.")
                                                                                         and path.endswith(".file")):
            continue
        bad = copy.deepcopy(cert)
        _set(bad, path, 1e-9 if path == "spec.max_change" else _edited(value))  # a tighter bound claims more than a looser one
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        edited += 1
        try:
            if verify_certificate(tmp_path / "bad.json", **args).holds:
                accepted.append(path)
        except CnnRepairError:
            pass
    assert edited >= 60 and any(p.startswith("properties.") for p, _ in _leaves(cert)) and any(p.startswith("ending.") for p, _ in _leaves(cert))
    assert accepted == [], " ".join(accepted)


def test_verify_rejects_other_files_than_the_certificate_names(files, tmp_path):
    from cnnrepair.verify import verify_certificate

    out = tmp_path / "o"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--keep", str(files / "k.npz"), "--out", str(out)]) == 0
    k = np.load(files / "k.npz")
    np.savez(tmp_path / "k2.npz", x=k["x"], y=k["y"], extra=np.zeros(1))  # same points, another file
    problems = verify_certificate(out / "certificate.json", out / "repaired.pt2", files / "p.npz", tmp_path / "k2.npz").problems
    assert any("keep points the certificate was made on" in p for p in problems)
    _export(_mlp(seed=3), tmp_path / "other.pt2")
    problems = verify_certificate(out / "certificate.json", out / "repaired.pt2", files / "p.npz", files / "k.npz",
                                  tmp_path / "other.pt2").problems
    assert any("source model" in p for p in problems)
    cert = json.loads((out / "certificate.json").read_text())
    cert["spec"]["kind"] = "targets"  # switching the checks off is itself a failed claim: refused as malformed ...
    (tmp_path / "t.json").write_text(json.dumps(cert))
    with pytest.raises(CnnRepairError, match="spec of kind targets"):
        verify_certificate(tmp_path / "t.json", out / "repaired.pt2", files / "p.npz", files / "k.npz")
    spec = cert["spec"]  # ... and, with the spec rewritten whole, as claims a targets repair cannot make
    cert["spec"] = {"kind": "targets", "keep_price": None, "max_change": None, "freeze_bias": False, "norm": "l1",
                    "delta_weight": 1.0, "keep": spec["keep"]}
    (tmp_path / "t.json").write_text(json.dumps(cert))
    problems = verify_certificate(tmp_path / "t.json", out / "repaired.pt2", files / "p.npz", files / "k.npz").problems
    assert any("targets certificate guarantees no margin" in p for p in problems)


def test_a_certificate_is_a_typed_record_that_reads_back_as_it_was_written(files, tmp_path):
    from cnnrepair import Certificate
    from cnnrepair.io import sha256
    from cnnrepair.repair import KeepClaim, PointClaim

    out = tmp_path / "o"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--keep", str(files / "k.npz"), "--out", str(out)]) == 0
    written = json.loads((out / "certificate.json").read_text())
    cert = Certificate.read(out / "certificate.json")
    assert cert.to_dict() == written and list(cert.to_dict()) == list(written)  # the same fields, in the same order
    assert isinstance(cert.points[0], PointClaim) and isinstance(cert.keep, KeepClaim) and cert.keep.count == len(np.load(files / "k.npz")["x"])
    assert cert.model.sha256 == sha256(out / "repaired.pt2") and cert.keep_file.sha256 == sha256(files / "k.npz")
    assert cert.repaired and cert.check_claims(np.array([p.margin_after for p in cert.points]), np.zeros(cert.keep.count) + 1) == []
    low = np.array([p.margin_after for p in cert.points]) - 1.0
    assert any("below the margin" in p for p in cert.check_claims(low, np.ones(cert.keep.count)))


@pytest.mark.parametrize("edit", ["empty-spec", "point-empty", "points-string", "not-object", "old-format", "unknown-claim",
                                  "unknown-point-claim", "unknown-keep-claim"])
def test_malformed_certificates_are_one_line_errors(files, tmp_path, capsys, edit):
    out = tmp_path / "o"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--out", str(out)]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    if edit == "empty-spec":
        cert["spec"] = {}
    elif edit == "point-empty":
        cert["points"][0] = {}
    elif edit == "points-string":
        cert["points"] = "abc"
    elif edit == "not-object":
        cert = [1, 2]
    elif edit == "unknown-claim":  # a claim no check recomputes is refused, never passed over in silence
        cert["robust_everywhere"] = True
    elif edit == "unknown-point-claim":
        cert["points"][0]["certified_for_all_inputs"] = True
    elif edit == "unknown-keep-claim":
        cert["keep"]["all_test_images_kept"] = True
    else:
        cert["format"] = "cnnrepair-certificate/1"
    (tmp_path / "bad.json").write_text(json.dumps(cert))
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "bad.json"), "--model", str(out / "repaired.pt2"), "--points", str(files / "p.npz")]) == 2
    _one_line(capsys, "certificate", *(("unknown field",) if edit.startswith("unknown") else ()))
    assert main(["verify", str(out / "certificate.json"), "--model", str(tmp_path / "missing.pt2"), "--points", str(files / "p.npz")]) == 2
    _one_line(capsys, "missing.pt2")


# -- 6. Ctrl-C stops a long HiGHS solve promptly, and a repair writes nothing ------------------------
def test_ctrl_c_stops_a_long_highs_solve_within_seconds():
    script = """
import signal, time, numpy as np, scipy.sparse as sp
from cnnrepair.repair.highs import new_highs, pass_lp, run
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when this test runs in a background job that ignores it
rng = np.random.default_rng(0)
m, n = 4000, 8000
A = sp.random(m, n, density=0.05, random_state=0, format="csc")
h = new_highs(None, "highs-ipm")
pass_lp(h, rng.random(n), A, np.full(n, np.inf), rng.random(m), np.full(m, np.inf))
print("solving", flush=True)
t0 = time.perf_counter()
try:
    run(h)
    print("finished", time.perf_counter() - t0, flush=True)
except KeyboardInterrupt:
    print("interrupted", time.perf_counter() - t0, flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "solving"
    time.sleep(1.5)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    line = proc.stdout.readline().split()
    proc.wait(timeout=60)
    assert line[0] == "interrupted", line  # the solve was still running: the test is not vacuous
    assert time.perf_counter() - sent < 6.0  # well under a second when idle (HiGHS checks between its iterations); CI shares cores


def test_an_interrupted_repair_exits_130_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    import cnnrepair.modelrepair as mr

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mr, "repair_classifier", interrupted)
    out = tmp_path / "deep" / "o"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "nothing was written" in err and "checkpoint" not in err
    assert not (tmp_path / "deep").exists()


def test_the_default_time_limit_is_in_force():
    from cnnrepair.repair.inputs import DEFAULT_TIME_LIMIT

    assert 0 < DEFAULT_TIME_LIMIT < float("inf")
    assert "default: 3600" in subprocess.run([sys.executable, "-m", "cnnrepair.cli", "repair", "--help"], capture_output=True,
                                             text=True).stdout.replace("\n", " ").replace("  ", " ")


# -- 7. a full file system: one line, nothing left -----------------------------------------------------
@pytest.fixture()
def small_fs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command on this machine")
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not allowed here ({done.stderr.decode().strip()[:80]})")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_file_system_gives_one_line_and_leaves_nothing(tmp_path, small_fs, capsys):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3000), nn.ReLU(), nn.Linear(3000, 5)).eval()  # a .pt2 of ~200 kB
    _export(model, tmp_path / "big.pt2")
    x, pred = _points(model, 6)
    np.savez(tmp_path / "p.npz", x=x.numpy(), y=((pred + 1) % 5).astype(np.int64))
    assert (tmp_path / "big.pt2").stat().st_size > 100_000
    out = small_fs / "o"
    assert main(["repair", str(tmp_path / "big.pt2"), "--points", str(tmp_path / "p.npz"), "--out", str(out)]) == 2
    _one_line(capsys, "no space left")
    assert os.listdir(small_fs) == []


def test_a_read_only_out_is_one_line(files, tmp_path, capsys):
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a read-only tmpfs is not allowed here")
    try:
        assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--out", str(mount / "o")]) == 2
        _one_line(capsys, "o")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# -- 8./9. one line for bad input, never a traceback; bad input refused ---------------------------------
def test_bad_files_and_factories_are_one_line(files, tmp_path, capfd):
    p = str(files / "p.npz")
    (tmp_path / "junk.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["repair", str(tmp_path / "junk.pt2"), "--points", p, "--out", str(tmp_path / "o")]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("cnnrepair: error:"), err  # torch's own logged traceback is silenced
    with zipfile.ZipFile(files / "m.pt2") as zin, zipfile.ZipFile(tmp_path / "broken.pt2", "w") as zout:
        for info in zin.infolist():  # a real archive whose graph does not parse: torch logs a traceback, we say one line
            zout.writestr(info, zin.read(info)[:100] if info.filename.endswith("models/model.json") else zin.read(info))
    assert main(["repair", str(tmp_path / "broken.pt2"), "--points", p, "--out", str(tmp_path / "o")]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "not a readable torch.export program" in err[0], err
    torch.save(_mlp().state_dict(), tmp_path / "w.pt")
    assert main(["repair", str(tmp_path / "w.pt"), "--factory", "os:system", "--points", p, "--out", str(tmp_path / "o")]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--factory os:system" in err[0]
    np.savez(tmp_path / "zero.npz", x=np.float32(1.0), y=np.int64(0))
    assert main(["repair", str(files / "m.pt2"), "--points", str(tmp_path / "zero.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "N x input shape" in capfd.readouterr().err
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as z:
        import pickle

        z.writestr("x.npy", pickle.dumps([1, 2, 3]))
    assert main(["repair", str(files / "m.pt2"), "--points", str(tmp_path / "pickled.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "not a NumPy array" in capfd.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_refuses_labels_shapes_and_class_counts_that_do_not_fit(files, tmp_path, capsys):
    data = np.load(files / "p.npz")
    np.savez(tmp_path / "l10.npz", x=data["x"], y=np.full(len(data["y"]), 10, np.int64))
    src = tmp_path / "digits.pt2"
    from cnnrepair.paper.models import build_model

    torch.manual_seed(0)
    net = build_model("digits-nn", (1, 8, 8), 10).eval()
    program = torch.export.export(net, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(src))
    base = ["evaluate", str(src), "--dataset", "digits", "--eps", "0.05", "--n", "20"]
    np.savez(tmp_path / "d10.npz", x=np.zeros((3, 1, 8, 8), np.float32), y=np.full(3, 10, np.int64))
    assert main([*base, "--points", str(tmp_path / "d10.npz"), "--out", str(tmp_path / "e1")]) == 2
    _one_line(capsys, "labels 10..10", "10 classes")
    assert main([*base, "--points", str(files / "p.npz"), "--out", str(tmp_path / "e2")]) == 2
    _one_line(capsys, "cannot run on the model")
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    program = torch.export.export(other, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "three.pt2"))
    assert main([*base, "--repaired", str(tmp_path / "three.pt2"), "--out", str(tmp_path / "e3")]) == 2
    _one_line(capsys, "different numbers of classes")
    assert not any((tmp_path / n).exists() for n in ("e1", "e2", "e3"))


def test_vnnlib_refuses_a_negative_timeout(files, tmp_path, capsys):
    assert main(["vnnlib", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--eps", "0.01", "--timeout", "-1",
                 "--out", str(tmp_path / "v")]) == 2
    _one_line(capsys, "--timeout")
    assert not (tmp_path / "v").exists()


def test_the_python_api_names_wrong_arguments_and_leaves_the_model_as_it_was():
    model = _mlp()
    x, pred = _points(model, 12)
    y = (pred + 1) % 5
    with pytest.raises(CnnRepairError, match="torch.nn.Module"):
        repair_classifier("model.pt2", x, y)
    with pytest.raises(CnnRepairError, match=r"RepairSpec\(\*\*spec\)"):
        repair_classifier(model, x, y, {"margin": 0.1})
    with pytest.raises(CnnRepairError, match="margin must be a number"):
        RepairSpec(margin=True)
    with pytest.raises(CnnRepairError, match="array of numbers"):
        repair_classifier(model, [["a"]], [0])
    model.train()
    r = repair_classifier(model, x.tolist(), y.tolist(), RepairSpec(margin=0.05))  # lists are inputs too
    assert r.status == "repaired" and model.training and all(m.training for m in model.modules())
    model64 = _mlp().double().eval()
    r = repair_classifier(model64, x.float(), y, RepairSpec(margin=0.05))  # float32 inputs to a float64 model
    assert r.status == "repaired"


def test_a_targets_repair_prints_one_summary_and_its_certificate_verifies(files, tmp_path, capsys):
    """The paper's program claims nothing; its summary line says so (it raised a TypeError before) and verify re-checks
    what it does claim: the measured margins and the change of the saved file."""
    out = tmp_path / "t"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--keep", str(files / "k.npz"), "--spec", "targets",
                 "--out", str(out)]) == 0
    assert "nothing guaranteed" in capsys.readouterr().err
    args = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.pt2"), "--points", str(files / "p.npz"),
            "--keep", str(files / "k.npz"), "--original", str(files / "m.pt2")]
    assert main(args) == 0
    cert = json.loads((out / "certificate.json").read_text())
    cert["change"]["nonzero"] += 1
    (tmp_path / "bad.json").write_text(json.dumps(cert))
    assert main([args[0], str(tmp_path / "bad.json"), *args[2:]]) == 1


def test_keep_balls_are_taken_in_the_repair_balls_convention(tmp_path):
    """With --mean/--std, keep balls (--keep-eps) are pixel balls through the model's normalisation, like the repair balls
    (they were taken in raw model units before), and verify --original recomputes them the same way."""
    from cnnrepair.bounds import ball_box, feature_bounds
    from cnnrepair.formats import load_model
    from cnnrepair.repair import last_layer
    from cnnrepair.repair.program import MarginProblem

    model = _mlp()
    _export(model, tmp_path / "m.pt2")
    mean, std = 0.5, 0.25
    pixels = torch.rand(60, 1, 3, 4, generator=torch.Generator().manual_seed(3))
    x = (pixels - mean) / std
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    np.savez(tmp_path / "p.npz", x=x[:6].numpy(), y=((pred[:6] + 1) % 5).astype(np.int64))
    np.savez(tmp_path / "k.npz", x=x[6:].numpy(), y=pred[6:].astype(np.int64))
    out = tmp_path / "o"
    assert main(["repair", str(tmp_path / "m.pt2"), "--points", str(tmp_path / "p.npz"), "--keep", str(tmp_path / "k.npz"),
                 "--spec", "ball", "--eps", "0.002", "--keep-eps", "0.004", "--bounds", "crown", "--mean", str(mean),
                 "--std", str(std), "--margin", "0.01", "--out", str(out)]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    loaded = load_model(tmp_path / "m.pt2").module
    lay = last_layer(loaded, x[:2])
    fb = feature_bounds(loaded, lay.name, *ball_box(x[6:], 0.004, (mean,), (std,), (0.0, 1.0)), "crown")
    held = MarginProblem(lay.weight, lay.bias, fb.centre, pred[6:], 0.0, radii=fb.radius).point_margins() >= 0.0
    assert cert["keep"]["balls_certified_before"] == int(held.sum()) > 0
    assert cert["keep"]["balls_certified_after"] == cert["keep"]["balls_certified_before"]
    assert main(["verify", str(out / "certificate.json"), "--model", str(out / "repaired.pt2"), "--points", str(tmp_path / "p.npz"),
                 "--keep", str(tmp_path / "k.npz"), "--original", str(tmp_path / "m.pt2")]) == 0
