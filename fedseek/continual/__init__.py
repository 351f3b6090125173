"""Continual learning across data periods (EWC, Fisher, CL metrics)."""
