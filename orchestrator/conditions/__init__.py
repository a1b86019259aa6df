"""The immunisation conditions beside resistance (Rosati et al.; ../shared reference §1.4.3):

    config.py    what a spec asks (conditions: stability, trainability, generalisation) and the
                 tolerances that make each a pass or a fail
    jobs.py      the conditions' own runs after the attacks: each defence measured at release
                 (stability) and fine-tuned on a benign task (trainability), recorded in MLflow
    verdicts.py  the arithmetic from the records: Δ capability vs the base, the benign budget
                 ratio, in- vs out-of-domain worst case, the attack-transfer matrix, the paired
                 per-attacker ratio, and one verdict per condition per defence
"""
