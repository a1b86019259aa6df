"""The immunisation conditions beside resistance (Rosati et al.; ../shared reference §1.4.3): what a
spec asks (config.py), the runs that measure each defence after the attacks (jobs.py), and the
verdicts from the records (verdicts.py)."""
