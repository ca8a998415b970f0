"""Example handlers used by the repository's flows (``flows/groups.yaml``)."""
