"""Job: one `python train.py` run of the study, what it was asked to do and what it did. The runner makes and
runs jobs (runner.py); the report and the questions read them (report.py, results.py)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from gpt_residual import runlog

NAN = float("nan")


@dataclass
class Job:
    """One `python train.py` run of the study: what to run, then (after run_job) what it did."""

    name: str  # its folder under runs/
    group: str  # the variant it belongs to, or "q" for a question's run
    seed: int
    args: list[str]  # train.py's arguments, config file first
    resolved: dict = field(default_factory=dict)  # the config they resolve to; a run is reused only if equal
    probe: bool = False  # a probe_init run: measures at initialisation, trains nothing
    run: str = ""  # the question's Run it is one seed of ("" for a variant's run)
    inspect: int = 0  # val batches for python -m scripts.inspect after training (0: not inspected)
    rc: int = -1  # train.py's exit code
    error: str = ""  # the last line of its stderr when it failed
    wall: float = NAN  # seconds the run took
    load: float = NAN  # the 1-minute load average after it: were its step times measured alone?
    evals: list[dict] = field(default_factory=list)  # metrics.jsonl: the evaluations (val_loss)
    trains: list[dict] = field(default_factory=list)  # the log records (ms_per_step)
    tele: list[dict] = field(default_factory=list)  # the telemetry records while training
    init: dict | None = None  # the probe's record at initialisation
    config: dict = field(default_factory=dict)  # the run's config.json
    inspection: dict | None = None  # inspect.json: per layer, what python -m scripts.inspect measured
    inspect_error: str = ""  # the last line of the inspection's stderr when it failed

    @property
    def status(self) -> str:
        return "ok" if self.rc == 0 else "diverged" if "not finite" in self.error else "failed"

    def describe(self) -> str:
        """What it was and how it ended, for the progress line."""
        what = self.name if self.group == "q" else self.group + (" probe" if self.probe else f" seed {self.seed}")
        if self.status != "ok":
            return f"{what} ... {self.status.upper()}: {self.error.removeprefix('error: ')}"
        return f"{what} ... " + (
            f"loss at init {self.init['loss']:.3f}" if self.probe else f"val {self.evals[-1]['val_loss']:.3f}"
        )

    def read(self, out: Path):
        """Its outcome (study.json) and records (metrics.jsonl, config.json) from its folder."""
        result = json.loads((out / "study.json").read_text())
        self.rc, self.error, self.wall = result["rc"], result["error"], result["wall"]
        self.load = result.get("load", NAN)
        recs = runlog.read(out) if (out / "metrics.jsonl").exists() else []
        self.evals = [r for r in recs if "val_loss" in r]
        self.trains = [r for r in recs if "ms_per_step" in r]
        self.tele = [r for r in recs if "rms" in r and not r.get("probe_init")]
        self.init = next((r for r in recs if r.get("probe_init")), None)
        self.config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        self.inspect_error = result.get("inspect_error", "")
        self.inspection = json.loads((out / "inspect.json").read_text()) if (out / "inspect.json").exists() else None
