"""Our interface to HiGHS (``highspy``), the project's LP engine: make a solver, pass an LP, run it
so that Ctrl-C stops it promptly, read its status.

Every LP of the project (the paper's program, the margin program's master and conflict checks, the
ball program) goes through these functions, so solver settings, quiet output and interrupt
handling are decided once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import numpy as np
import scipy.sparse as sp

INTERRUPT_WAIT = 2.0  # seconds to wait for HiGHS to stop after Ctrl-C before giving up on it (its interior point checks late)


@contextlib.contextmanager
def stdout_silenced():
    """Point file descriptor 1 at /dev/null for the duration (library code never prints)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def new_highs(time_limit: float | None, method: str):
    """A quiet single-threaded HiGHS instance: ``simplex``, or ``highs-ipm`` (interior point with crossover)."""
    import highspy

    with stdout_silenced():  # HiGHS prints a banner on stdout when the first instance is made
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.setOptionValue("solver", "ipm" if method == "highs-ipm" else "simplex")
    if method == "highs-ipm":
        h.setOptionValue("run_crossover", "on")
    if time_limit is not None and np.isfinite(time_limit):
        h.setOptionValue("time_limit", float(time_limit))
    return h


def set_time_limit(h, seconds: float) -> None:
    """Let the next solve of ``h`` run for ``seconds`` more. HiGHS measures its time limit against the instance's run
    time summed over every solve, so a re-solved instance needs the time it has already spent added."""
    h.setOptionValue("time_limit", float(h.getRunTime() + max(float(seconds), 1e-3)))


def run(h) -> None:
    """``h.run()`` in HiGHS's own solver thread, so that Ctrl-C (KeyboardInterrupt in the main thread)
    cancels the solve through HiGHS's interrupt callbacks (honoured between its iterations) and is re-raised,
    instead of waiting for the solve to end."""
    if not hasattr(h, "startSolve") or threading.current_thread() is not threading.main_thread():
        h.run()  # Ctrl-C reaches the main thread only; a worker thread's solve is stopped by its caller's time limit
        return
    h.HandleUserInterrupt = True
    h.startSolve()
    try:
        while not h.wait(0.05)[0]:
            pass
    except KeyboardInterrupt:
        h.cancelSolve()
        deadline = time.monotonic() + INTERRUPT_WAIT
        while time.monotonic() < deadline:
            try:
                if h.wait(0.05)[0]:
                    break
            except KeyboardInterrupt:
                break
        raise
    finally:
        h.HandleUserInterrupt = False


def highs_status(h) -> str:
    """The model status as a short name: optimal, infeasible, unbounded, time_limit, interrupted, ..."""
    import highspy

    status = h.getModelStatus()
    names = {highspy.HighsModelStatus.kOptimal: "optimal", highspy.HighsModelStatus.kInfeasible: "infeasible",
             highspy.HighsModelStatus.kUnbounded: "unbounded", highspy.HighsModelStatus.kTimeLimit: "time_limit",
             highspy.HighsModelStatus.kUnboundedOrInfeasible: "infeasible",
             highspy.HighsModelStatus.kInterrupt: "interrupted"}
    return names.get(status, h.modelStatusToString(status).lower().replace(" ", "_"))


def pass_lp(h, c, A: sp.csc_matrix, col_upper, row_lower, row_upper) -> None:
    """Pass ``min c.x  s.t.  row_lower <= A x <= row_upper, 0 <= x <= col_upper`` (infinities allowed)."""
    import highspy

    inf = highspy.kHighsInf
    model = highspy.HighsLp()
    model.num_col_, model.num_row_ = A.shape[1], A.shape[0]
    model.col_cost_ = c
    model.col_lower_ = np.zeros(A.shape[1])
    model.col_upper_ = np.where(np.isinf(col_upper), inf, col_upper)
    model.row_lower_ = np.where(np.isinf(row_lower), -inf, row_lower)
    model.row_upper_ = np.where(np.isinf(row_upper), inf, row_upper)
    model.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    model.a_matrix_.start_ = A.indptr
    model.a_matrix_.index_ = A.indices
    model.a_matrix_.value_ = A.data
    h.passModel(model)
