"""The statistics of budget-to-failure: survival against budget with censoring (survival.py) and
the worst case's bootstrap interval (bootstrap.py)."""
