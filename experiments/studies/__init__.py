"""The paper's claims measured at laptop scale, a module per claim; experiments/study.py is their command line."""
