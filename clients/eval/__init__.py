"""Evaluation harness: context awareness with and without attention steering, over HTTP only.

`ctxsteer eval nih|qa|paper` (see `cli.py`) runs against any OpenAI-compatible endpoint, so the same
numbers can be taken from other servers (which ignore the `steering` field). Nothing here imports torch;
matplotlib is imported only to draw figures.
"""
