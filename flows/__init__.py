"""Prefect flows: the order of the backup steps, per VM, per host, and restores. No logic below here."""
