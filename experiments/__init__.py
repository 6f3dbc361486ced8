"""The experiment harness: the paper's claims measured at laptop scale (study.py, studies/) and throughput
(bench.py); their results are RESULTS.md and BENCHMARKS.md."""
