"""Measuring edits: minedit's metrics, the VIEScore judge, the benchmarks' own protocols and data layouts, and the
cross-attention maps of one edit (the list is in minedit/__init__.py).

It may load a trained model (model.load_model) but never imports training code (tests/test_layout.py).
"""
