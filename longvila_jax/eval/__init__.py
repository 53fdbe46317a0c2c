"""Evaluations: V-NIAH needle retrieval (needle.py) and VideoMME-style multiple choice
(mcq.py), both over the inference engine."""
