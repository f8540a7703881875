"""Prefect tasks: one backup step each, thin wrappers that call the plain-Python core in hotvm/."""
