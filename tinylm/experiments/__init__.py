"""Experiments built from core, train and rlhf: the scaling sweep, attention cost, the RLHF curves."""
