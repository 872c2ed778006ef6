"""`tfsa-onnx optimize` interrupted at random moments (SIGINT, SIGKILL) over an existing output.

Each run rewrites OUT from the other of two models (different weights, so old and new results
differ), with and without external data, and is interrupted after a random delay spanning the
whole run. Afterwards OUT must load in onnxruntime and give the old result or the new one, and
neither input (graph or data) may have changed. A last clean run must leave no temporaries.

    pytest -m slow tests/test_interrupted_runs.py          # 200 runs (~3 minutes on 2 cores)
    python tests/test_interrupted_runs.py 200               # the same, printing the figures
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from model_files import digest, run, save_model

REPO = Path(__file__).resolve().parents[1]
WIDTH = 1024
ROWS = 8192  # a 32 MB table: writing the weights is a visible part of the run


@dataclass
class Tally:
    runs: int = 0
    interrupted: int = 0  # the process ended by the signal (not finished before it)
    kept_old: int = 0
    got_new: int = 0
    broken: int = 0  # OUT does not load, or gives neither result
    inputs_modified: int = 0
    temporaries_left: int = 0  # runs after which a .tmp was left (the next write removes it)
    temporaries_at_end: int = 0  # after a final clean run: must be 0
    failures: list[str] = field(default_factory=list)


def _optimize(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tfsa_onnx.cli", "optimize", str(source), "-o", str(out)]


def interrupted_runs(root: Path, n: int, seed: int = 0) -> Tally:
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    tally = Tally()
    setups = {}
    for external in (True, False):
        folder = root / ("external" if external else "single")
        folder.mkdir()
        models = [
            save_model(
                folder / f"{m}.onnx",
                f"{m}.onnx.data" if external else None,
                seed=s,
                width=WIDTH,
                table_rows=ROWS,
            )
            for m, s in (("a", 1), ("b", 2))
        ]
        files = [p for p in folder.iterdir()]
        sums = {p: digest(p) for p in files}
        results = [run(m) for m in models]
        out = folder / "out.onnx"
        times = []
        for _ in range(3):  # the median of 3 uninterrupted runs: where the delays are spread
            start = time.monotonic()
            subprocess.run(_optimize(models[0], out), env=env, check=True, capture_output=True)
            times.append(time.monotonic() - start)
        duration = sorted(times)[1]
        setups[external] = dict(models=models, sums=sums, results=results, out=out, current=0, t=duration)
    for i in range(n):
        external = i % 4 < 2
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGKILL
        s = setups[external]
        new = 1 - s["current"]
        proc = subprocess.Popen(
            _optimize(s["models"][new], s["out"]),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 1.05) * s["t"])  # the writes come at the end of a run
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        tally.runs += 1
        tally.interrupted += code != 0
        what = f"run {i} ({'external' if external else 'single file'}, {sig.name}, exit {code})"
        try:
            y = run(s["out"])
        except Exception as e:  # noqa: BLE001 - any load failure is a broken output
            tally.broken += 1
            tally.failures.append(f"{what}: OUT does not load: {str(e).splitlines()[0]}")
        else:
            if np.allclose(y, s["results"][new], atol=1e-5):
                tally.got_new += 1
                s["current"] = new
            elif np.allclose(y, s["results"][s["current"]], atol=1e-5):
                tally.kept_old += 1
            else:
                tally.broken += 1
                tally.failures.append(f"{what}: OUT gives neither the old nor the new result")
        changed = [p.name for p, h in s["sums"].items() if digest(p) != h]
        if changed:
            tally.inputs_modified += 1
            tally.failures.append(f"{what}: input files changed: {changed}")
        tally.temporaries_left += any(p.name.endswith(".tmp") for p in s["out"].parent.iterdir())
    for s in setups.values():
        subprocess.run(_optimize(s["models"][0], s["out"]), env=env, check=True, capture_output=True)
        tally.temporaries_at_end += sum(p.name.endswith(".tmp") for p in s["out"].parent.iterdir())
    return tally


def _check(tally: Tally) -> None:
    assert tally.interrupted > 0  # the signals did land inside runs
    assert tally.broken == 0 and tally.inputs_modified == 0, tally.failures
    assert tally.temporaries_at_end == 0


def test_a_few_interrupted_runs_keep_outputs_and_inputs_intact(tmp_path):
    _check(interrupted_runs(tmp_path, 6, seed=1))


@pytest.mark.slow
def test_200_interrupted_runs_keep_outputs_and_inputs_intact(tmp_path):
    _check(interrupted_runs(tmp_path, 200, seed=2))


if __name__ == "__main__":
    import tempfile

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as tmp:
        result = interrupted_runs(Path(tmp), count, seed=2)
    for line in result.failures:
        print(line)
    print({k: v for k, v in vars(result).items() if k != "failures"})
    sys.exit(1 if result.broken or result.inputs_modified or result.temporaries_at_end else 0)
