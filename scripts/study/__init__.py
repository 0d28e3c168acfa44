"""The study: train norm/residual variants and the questions' runs on the same data and budget, then write a
report (python -m scripts.study configs/small.py)."""
