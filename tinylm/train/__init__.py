"""Pretraining: data, the loop, its settings, evaluation, the run's log and checkpoints. Imports core only."""
