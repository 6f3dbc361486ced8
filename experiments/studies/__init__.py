"""The paper's claims measured at laptop scale, a module per claim; `python experiments/study.py` is their command line."""
