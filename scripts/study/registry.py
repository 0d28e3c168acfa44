"""Every question of the study, by number: the one list that the planner (runner.py: which runs to make)
and the report (report.py: which sections to write) both read. A question's runs and its section are its
Question's (question.py); the runs of questions 10-14 are in depth_runs.py."""

from scripts.study import depth_questions, depth_runs, modern_questions, norm_questions, switch_questions
from scripts.study.question import RUNS as Q_RUNS
from scripts.study.question import Question, Run

MODULES = (norm_questions, modern_questions, depth_questions, switch_questions)
QUESTIONS: dict[int, Question] = dict(sorted((q.number, q) for m in MODULES for q in m.QUESTIONS))
RUNS = (*Q_RUNS, *depth_runs.RUNS)  # every run, in the order the study makes them

unplanned = {run.name for q in QUESTIONS.values() for run in q.runs} - {run.name for run in RUNS}
if unplanned:  # a run a question reads but the planner would never make: list it in question.RUNS
    raise ImportError(f"runs missing from question.RUNS or depth_runs.RUNS: {', '.join(sorted(unplanned))}")


def runs_for(numbers: set[int]) -> list[Run]:
    """The runs that these questions read, each once, in the order the study makes them (RUNS)."""
    wanted = {run.name for n in numbers for run in QUESTIONS[n].runs}
    return [run for run in RUNS if run.name in wanted]
