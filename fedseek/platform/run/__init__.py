"""Running jobs: simulation, the reporter (ledger, tracking, checkpoint parts) and the scheduler."""
