"""The datasets: one folder per dataset with its prepare.py; token_files.py is what they write with."""
