"""Evaluations: V-NIAH needle retrieval (needle.py), later VideoMME-style multiple choice."""
