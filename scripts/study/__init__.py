"""The study: train norm/residual variants and the questions' runs on the same data and budget, then write a
report (python -m scripts.study configs/small.py).

Imports run one way: runner.py (the command: flags, plan, estimate) -> execute.py (running the jobs),
report.py (the header and the variants) -> registry.py (every question) -> norm_questions.py,
modern_questions.py, depth_questions.py, switch_questions.py (questions 1-5, 6-9, 10 and 14, 11-13) ->
question.py, depth_runs.py (Question, Run: each question's runs), results.py (what a section reads; numbers
and tables), stats.py (Welch, Holm), figures.py, presets.py -> job.py (Job: one train.py run)."""
