"""The papers' parts, one file each (the list is in minedit/__init__.py; DESIGN §3 gives each one's equation).

The bottom of the import graph: a part imports torch, diffusers, transformers, minedit.errors and other parts,
nothing else of minedit, so each one can be read, tested and reused on its own (tests/test_layout.py checks it).
"""
