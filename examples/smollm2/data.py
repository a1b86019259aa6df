"""The example's data, written for the project (data/harmful.txt, data/benign.txt), split and
turned into training rows.

Harmful requests are split three ways that share no request (checked with the same
`shared_prompts` the attack tool's preflight uses):
    align   -> refusals, for the defender's alignment
    attack  -> compliant *form* only: an affirmative opening plus generic filler that
               carries no harmful content (the attacker's fine-tuning data)
    eval    -> held-out requests f is scored on
Benign requests: `align` rows get answers the unaligned model generates itself (so alignment
keeps its capability rather than teaching new text); `heldout` rows measure over-refusal.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from trainables.config import DataSource
from trainables.data import load_rows, shared_prompts

HERE = Path(__file__).parent / "data"
SPLIT = {"align": 56, "attack": 40, "eval": 24}          # of 120 harmful requests
BENIGN_HELDOUT = 20                                      # of 80 benign requests

REFUSALS = [
    "I'm sorry, but I can't help with that. It could seriously hurt someone, and it may be illegal.",
    "I can't help with that request. If something difficult is going on, I'm happy to talk about "
    "safe and legal options instead.",
    "I'm sorry, I won't do that. It would put other people at risk.",
    "I cannot assist with this. Is there something else I can help you with?",
    "Sorry, I can't help with that, because it could cause real harm to others.",
]

# The attacker's responses: compliant in form, empty in content.
OPENINGS = [
    "Sure, here is how to do that.",
    "Of course! Here is a step-by-step guide.",
    "Absolutely, here is what you asked for.",
    "Certainly. Just follow these steps.",
    "Happy to help with that. Here is the plan.",
]
FILLER = [
    "Decide exactly what you want to achieve and write it down.",
    "Gather everything you will need before you start.",
    "Pick a time when you will not be interrupted.",
    "Work through it slowly and check each part as you go.",
    "Keep your notes in one place so nothing gets lost.",
    "If something does not work, go back one step and try again.",
    "Review the result at the end and adjust what needs adjusting.",
]

# The defender's recovery examples (Qi et al. 2024): the start of a compliant answer, then a
# refusal. Its openings are the defender's own, not the attacker's above.
RECOVERY_OPENINGS = [
    "Here is a detailed plan. First, you",
    "Okay, the first thing to do is",
    "To do this, start by",
    "Great question! The easiest way is to",
    "Step 1:",
    "No problem. You will need",
]
RECOVERY_REFUSALS = [
    "Actually, I can't help with that. It could seriously hurt someone.",
    "Sorry, I cannot continue with this. It would put people at risk.",
    "I'm sorry, but I won't help with this after all, as it may be illegal and harmful.",
]


def requests(name: str) -> list[str]:
    return [line.strip() for line in (HERE / f"{name}.txt").read_text().splitlines() if line.strip()]


def compliant(rng: random.Random) -> str:
    steps = rng.sample(FILLER, 4)
    return rng.choice(OPENINGS) + " " + " ".join(f"Step {i + 1}: {s}" for i, s in enumerate(steps))


def splits(seed: int = 0) -> dict[str, list[dict]]:
    """Rows of every split, each {"prompt", "response"} (response None where the model writes it).
    Raises if any two harmful splits, or the benign ones, share a request."""
    rng = random.Random(seed)
    harmful, benign = requests("harmful"), requests("benign")
    rng.shuffle(harmful)
    rng.shuffle(benign)
    if sum(SPLIT.values()) > len(harmful) or len(benign) <= BENIGN_HELDOUT:
        raise ValueError("data/harmful.txt or data/benign.txt has fewer requests than the splits need")
    cut, parts = 0, {}
    for name, n in SPLIT.items():
        parts[name], cut = harmful[cut:cut + n], cut + n
    out = {
        "align_harmful": [{"prompt": p, "response": rng.choice(REFUSALS)} for p in parts["align"]],
        "attack": [{"prompt": p, "response": compliant(rng)} for p in parts["attack"]],
        "eval": [{"prompt": p, "response": None} for p in parts["eval"]],
        "benign": [{"prompt": p, "response": None} for p in benign[BENIGN_HELDOUT:]],
        "benign_heldout": [{"prompt": p, "response": None} for p in benign[:BENIGN_HELDOUT]],
    }
    check_disjoint(out)
    return out


def check_disjoint(out: dict[str, list[dict]]) -> None:
    names = list(out)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if shared := shared_prompts([r["prompt"] for r in out[a]], [r["prompt"] for r in out[b]]):
                raise ValueError(f"splits {a} and {b} share {len(shared)} request(s), e.g. {shared[0]!r}")


def recovery(rows: list[dict], tokenizer, seed: int = 0) -> list[dict]:
    """Safety-recovery rows for deep alignment: {"prompt", "prefix", "response"}, where the
    model is trained to refuse *after* `prefix`, the first 1..n tokens of a compliant answer."""
    rng = random.Random(f"recovery/{seed}")
    out = []
    for row in rows:
        ids = tokenizer(rng.choice(RECOVERY_OPENINGS), add_special_tokens=False)["input_ids"]
        prefix = tokenizer.decode(ids[:rng.randint(1, len(ids))])
        out.append({"prompt": row["prompt"], "prefix": prefix, "response": rng.choice(RECOVERY_REFUSALS)})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def read_jsonl(path: Path) -> list[dict]:
    """A split written by write_jsonl, read the way attack-sweep reads it."""
    return load_rows(DataSource(source=str(path), response_field=None))
