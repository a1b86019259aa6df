"""Reference defences the tool builds itself (issue 29), one module each: a method is the
defender's objective (base.DefenceMethod); the builder (build.py) trains a starting checkpoint with
it and writes an ordinary checkpoint folder the sweep then attacks."""
