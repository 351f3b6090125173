"""Real deployment: TLS material and keys, service commands, the guarded SuperLink, the flwr CLI, a local federation."""
