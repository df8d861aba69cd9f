"""The toy world (DESIGN §10): drawn shape scenes with exact edits and instructions at three levels, so that every
recipe trains from scratch on a CPU. `python -m minedit.toy --out DIR` writes one (see world.py).

A world of its own: nothing here imports model, build or training code (tests/test_layout.py); build.py imports
the toy tokenizer only when it builds a toy part.
"""
