"""A real model on a laptop: SmolLM2-135M-Instruct, refusal-aligned, defended and attacked.

    python -m examples.smollm2            # build the world once (cached), run the sweep, report

world.py builds the checkpoints (the defender's recipe, apart from the attack tool);
sweep.yaml is the attack sweep over them.
"""
