"""Every question of the study, by number: the one list that the planner (runner.py: which runs to make)
and the report (report.py: which sections to write) both read. A question's runs and its section are its
Question's (question.py)."""

from scripts.study import modern_questions, norm_questions
from scripts.study.question import RUNS, Question, Run

QUESTIONS: dict[int, Question] = {q.number: q for q in (*norm_questions.QUESTIONS, *modern_questions.QUESTIONS)}

unplanned = {run.name for q in QUESTIONS.values() for run in q.runs} - {run.name for run in RUNS}
if unplanned:  # a run a question reads but the planner would never make: list it in question.RUNS
    raise ImportError(f"runs missing from question.RUNS: {', '.join(sorted(unplanned))}")


def runs_for(numbers: set[int]) -> list[Run]:
    """The runs that these questions read, each once, in the order the study makes them (question.RUNS)."""
    wanted = {run.name for n in numbers for run in QUESTIONS[n].runs}
    return [run for run in RUNS if run.name in wanted]
