"""Reading VNN-LIB properties as VNN-COMP writes them: an input box and a violation over the outputs.

A VNN-LIB 1.0 file (the format of every VNN-COMP benchmark) declares ``X_i`` (inputs, C order of
the model's input) and ``Y_j`` (outputs) as ``Real`` constants and asserts, together, bounds on the
inputs and a formula over the outputs that describes a *violation*: a verifier answering ``unsat``
has proved the property. What is read here is the subset the benchmarks use and a linear program
can hold:

* input assertions: comparisons of one ``X_i`` with a constant (``<=``, ``>=``, ``<``, ``>``,
  alone or under ``and``), giving one box;
* output assertions: comparisons of linear terms in the ``Y_j`` (``+``, ``-``, ``*`` by a constant),
  under ``and`` and ``or`` in any nesting, brought to disjunctive normal form: the property is
  violated when some disjunct ``A y <= b`` holds (a strict comparison is read as its closure, which
  only makes a proof stronger).

Anything else is refused in one line that names it: a disjunction over input boxes (split it into
one file per box), a comparison mixing inputs and outputs, a product of two variables, an unknown
operator, an undeclared or out-of-range variable, an input without both bounds.

The robustness form VNN-COMP's generators write, ``(or (and (>= Y_j Y_l)) ...)`` over every
``j != l``, is recognised as "label ``l`` against every other class" (:meth:`VnnlibProperty.label`),
and the same over some of the other classes (a targeted property, as oval21's) as "label ``l``
against those" (:meth:`VnnlibProperty.robustness`).

The VNN-LIB 2.0 parser on PyPI (``vnnlib`` 1.0.2) refuses these files (it reads VNN-LIB 2.0 only),
and its 0.0.1 release is an alpha source package that compiles with mypyc at install time, so this
reader is our own (docs/design.md).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnrepair.errors import CnnRepairError

_VAR = re.compile(r"^([XY])_(\d+)$")
_TOKEN = re.compile(r"\(|\)|[^\s()]+")
MAX_DISJUNCTS = 10_000  # the DNF of the output formula may not grow past this (a product of many disjunctions)


@dataclass(frozen=True)
class OutputCase:
    """One disjunct of a violation: the outputs ``y`` violate the property when ``A y <= b`` (every row)."""

    A: np.ndarray
    b: np.ndarray


@dataclass(frozen=True)
class VnnlibProperty:
    """One VNN-LIB property: the input box ``[lower, upper]`` (flattened, the model's input units) and the violation
    ``any(case holds for case in violation)`` over ``num_outputs`` outputs."""

    name: str
    lower: np.ndarray
    upper: np.ndarray
    violation: tuple[OutputCase, ...]
    num_outputs: int

    @property
    def num_inputs(self) -> int:
        return len(self.lower)

    def label(self) -> int | None:
        """``l`` when the violation is exactly "some other class scores at least as high as ``l``" (every case one row
        ``Y_l - Y_j <= 0``, over every ``j != l``): the robustness form; None for any other output constraint."""
        form = self.robustness()
        return form[0] if form is not None and len(form[1]) == self.num_outputs - 1 else None

    def robustness(self) -> tuple[int, tuple[int, ...]] | None:
        """``(l, rivals)`` when the violation is "one of ``rivals`` scores at least as high as ``l``" (every case one row
        ``Y_l - Y_j <= 0``): the robustness form over every other class, or a targeted one over some of them (oval21's
        properties name one target class); None for any other output constraint."""
        label, rivals = None, set()
        for case in self.violation:
            if case.A.shape[0] != 1 or case.b[0] != 0.0:
                return None
            row = case.A[0]
            pos, neg = np.flatnonzero(row > 0), np.flatnonzero(row < 0)
            if len(pos) != 1 or len(neg) != 1 or row[pos[0]] != -row[neg[0]]:
                return None
            lab, rival = int(pos[0]), int(neg[0])
            if label is not None and lab != label:
                return None
            label = lab
            rivals.add(rival)
        return None if label is None else (label, tuple(sorted(rivals)))

    def output_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(coef R x outputs, offset R): the property holds when every row ``coef . Y > offset`` (each case of the violation
        is one row ``a . Y <= b``, excluded by ``a . Y > b``); a one-line error for a case of several rows, whose
        exclusion is a disjunction no linear program holds."""
        wide = [k for k, case in enumerate(self.violation) if case.A.shape[0] != 1]
        if wide:
            raise CnnRepairError(f"{self.name}: case {wide[0] + 1} of its violation is a conjunction of {self.violation[wide[0]].A.shape[0]} "
                                 "output comparisons; ruling it out is a disjunction that no linear program holds (only cases of one "
                                 "comparison each, as the robustness and targeted forms and 'Y_j <= c' are, are repaired)")
        return np.stack([case.A[0] for case in self.violation]), np.array([case.b[0] for case in self.violation], np.float64)

    def violated_by(self, y: np.ndarray, tol: float = 0.0) -> np.ndarray:
        """For outputs ``y`` (N x num_outputs): does any case of the violation hold (to ``tol``)?"""
        y = np.atleast_2d(np.asarray(y, np.float64))
        out = np.zeros(len(y), bool)
        for case in self.violation:
            out |= ((y @ case.A.T) <= case.b + tol).all(1)
        return out


def _tokens(text: str, name: str) -> list:
    """The file's S-expressions as nested lists of strings."""
    text = "\n".join(line.split(";", 1)[0] for line in text.splitlines())
    stack: list[list] = [[]]
    for tok in _TOKEN.findall(text):
        if tok == "(":
            stack.append([])
        elif tok == ")":
            if len(stack) == 1:
                raise CnnRepairError(f"{name}: unbalanced ')' in the VNN-LIB text")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise CnnRepairError(f"{name}: a '(' is never closed in the VNN-LIB text")
    return stack[0]


class _Reader:
    def __init__(self, name: str):
        self.name = name
        self.declared: dict[str, int] = {"X": 0, "Y": 0}
        self.names: set[str] = set()

    def fail(self, what: str) -> CnnRepairError:
        return CnnRepairError(f"{self.name}: {what}")

    def capped(self, cases: list) -> list:
        """``cases`` (a DNF), refused once it holds more than :data:`MAX_DISJUNCTS`."""
        if len(cases) > MAX_DISJUNCTS:
            raise self.fail(f"the output formula has more than {MAX_DISJUNCTS:,} cases in disjunctive normal form")
        return cases

    def declare(self, expr: list) -> None:
        if len(expr) != 3 or not isinstance(expr[1], str) or expr[2] != "Real":
            raise self.fail(f"only (declare-const NAME Real) is read; got {_show(expr)}")
        m = _VAR.match(expr[1])
        if m is None:
            raise self.fail(f"variable {expr[1]!r} is neither an input X_i nor an output Y_j (hidden variables are not read)")
        kind, idx = m.group(1), int(m.group(2))
        self.names.add(expr[1])
        self.declared[kind] = max(self.declared[kind], idx + 1)

    def linear(self, term) -> tuple[dict[str, float], float]:
        """A term as (coefficients by variable, constant)."""
        if isinstance(term, str):
            if _VAR.match(term):
                if term not in self.names:
                    raise self.fail(f"variable {term} is used but never declared")
                return {term: 1.0}, 0.0
            try:
                return {}, float(term)
            except ValueError:
                raise self.fail(f"{term!r} is not a number or a declared variable") from None
        if not term or not isinstance(term[0], str):
            raise self.fail(f"cannot read the term {_show(term)}")
        op, args = term[0], [self.linear(a) for a in term[1:]]
        if op == "+" and args:
            return _combine(args, [1.0] * len(args))
        if op == "-" and len(args) == 1:
            return _combine(args, [-1.0])
        if op == "-" and args:
            return _combine(args, [1.0] + [-1.0] * (len(args) - 1))
        if op == "*" and args:
            const, coef = 1.0, None
            for c, k in args:
                if c:
                    if coef is not None:
                        raise self.fail(f"{_show(term)} multiplies two variables: not a linear constraint")
                    coef = (c, k)
                else:
                    const *= k
            if coef is None:
                return {}, const
            return {v: const * a for v, a in coef[0].items()}, const * coef[1]
        raise self.fail(f"operator {op!r} in {_show(term)} is not read (only + - * in terms)")

    def formula(self, expr) -> list[list[tuple[dict[str, float], float]]]:
        """DNF: a list of cases, each a list of rows ``sum coef * var <= bound`` given as (coef, bound)."""
        if not isinstance(expr, list) or not expr or not isinstance(expr[0], str):
            raise self.fail(f"cannot read the assertion {_show(expr)}")
        op = expr[0]
        if op in ("<=", ">=", "<", ">"):
            if len(expr) != 3:
                raise self.fail(f"{_show(expr)}: a comparison takes two terms")
            (cl, kl), (cr, kr) = self.linear(expr[1]), self.linear(expr[2])
            diff, const = _combine([(cl, kl), (cr, kr)], [1.0, -1.0])  # lhs - rhs
            if op in (">=", ">"):
                diff, const = {v: -a for v, a in diff.items()}, -const
            return [[(diff, -const)]]  # diff + const <= 0
        if op == "and":
            cases: list[list] = [[]]
            for part in expr[1:]:
                sub = self.formula(part)
                cases = [a + b for a in cases for b in sub]
                self.capped(cases)
            return cases
        if op == "or":
            out = [case for part in expr[1:] for case in self.formula(part)]
            return self.capped(out)
        raise self.fail(f"operator {op!r} is not read (assertions use <= >= < > and or)")


def _combine(parts: list[tuple[dict[str, float], float]], weights: list[float]) -> tuple[dict[str, float], float]:
    coef: dict[str, float] = {}
    const = 0.0
    for (c, k), w in zip(parts, weights):
        for v, a in c.items():
            coef[v] = coef.get(v, 0.0) + w * a
        const += w * k
    return {v: a for v, a in coef.items() if a != 0.0}, const


def _show(expr, limit: int = 80) -> str:
    text = expr if isinstance(expr, str) else "(" + " ".join(_show(e, limit) for e in expr) + ")"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_vnnlib(text: str, name: str = "property") -> VnnlibProperty:
    """One property from VNN-LIB text (see the module docstring for what is read); a one-line error naming what is not."""
    r = _Reader(name)
    exprs = _tokens(text, name)
    asserts = []
    for e in exprs:
        if not isinstance(e, list) or not e:
            raise r.fail(f"top-level {_show(e)} is not a (declare-const ...) or (assert ...)")
        if e[0] == "declare-const":
            r.declare(e)
        elif e[0] == "assert" and len(e) == 2:
            asserts.append(e[1])
        else:
            raise r.fail(f"top-level command {e[0]!r} is not read (only declare-const and assert)")
    nx, ny = r.declared["X"], r.declared["Y"]
    if nx == 0 or ny == 0:
        raise r.fail("declares no inputs X_i or no outputs Y_j")
    lower, upper = np.full(nx, -np.inf), np.full(nx, np.inf)
    cases: list[list] = [[]]
    for a in asserts:
        dnf = r.formula(a)
        used = {v for case in dnf for coef, _ in case for v in coef}
        kinds = {v[0] for v in used}
        if kinds == {"X", "Y"}:
            raise r.fail(f"the assertion {_show(a)} mixes inputs and outputs: not read")
        if kinds == {"X"}:
            if len(dnf) != 1:
                raise r.fail(f"the assertion {_show(a)} is a disjunction over inputs (several boxes): split it into one file per box")
            for coef, bound in dnf[0]:
                if len(coef) != 1:
                    raise r.fail(f"the input constraint in {_show(a)} involves several inputs: only bounds of one X_i are read")
                (v, c), = coef.items()
                i = int(v[2:])
                if c > 0:
                    upper[i] = min(upper[i], bound / c)
                else:
                    lower[i] = max(lower[i], bound / c)
            continue
        if not kinds:
            raise r.fail(f"the assertion {_show(a)} involves no variable")
        cases = [x + y for x in cases for y in dnf]
        r.capped(cases)
    missing = np.flatnonzero(~np.isfinite(lower) | ~np.isfinite(upper))
    if len(missing):
        raise r.fail(f"input X_{missing[0]} has no {'lower' if not np.isfinite(lower[missing[0]]) else 'upper'} bound "
                     f"({len(missing)} input(s) lack one); every input needs both")
    if (lower > upper).any():
        i = int(np.flatnonzero(lower > upper)[0])
        raise r.fail(f"input X_{i} has lower bound {lower[i]!r} above its upper bound {upper[i]!r}: the box is empty")
    if cases == [[]]:
        raise r.fail("asserts nothing about the outputs: there is no property to check")
    violation = []
    for case in cases:
        A = np.zeros((len(case), ny))
        b = np.zeros(len(case))
        for k, (coef, bound) in enumerate(case):
            for v, c in coef.items():
                A[k, int(v[2:])] = c
            b[k] = bound
        violation.append(OutputCase(A, b))
    return VnnlibProperty(name, lower, upper, tuple(violation), ny)


def read_vnnlib(path: Path) -> VnnlibProperty:
    """A property from a ``.vnnlib`` file (or ``.vnnlib.gz``, as some benchmarks ship them)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CnnRepairError(f"cannot read VNN-LIB file {path}: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise CnnRepairError(f"{path}: a damaged gzip file ({exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CnnRepairError(f"{path}: not a text file; a VNN-LIB property is text") from None
    return parse_vnnlib(text, path.name)


def read_instances(path: Path) -> list[tuple[Path, Path, float]]:
    """VNN-COMP's ``instances.csv``: (model, property, timeout) per line, paths relative to the file's folder."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CnnRepairError(f"cannot read instances file {path}: {exc}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 3:
            raise CnnRepairError(f"{path}:{n}: a line of instances.csv is model,property,timeout; got {line.strip()!r}")
        try:
            timeout = float(cells[2])
        except ValueError:
            raise CnnRepairError(f"{path}:{n}: timeout {cells[2]!r} is not a number of seconds") from None
        out.append((path.parent / cells[0], path.parent / cells[1], timeout))
    if not out:
        raise CnnRepairError(f"{path}: no instances listed")
    return out
