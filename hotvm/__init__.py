"""hotvm: hot backups of running VMs (the seed's layered-REDO workflow for today's hypervisors)."""

__version__ = "0.1.0"
