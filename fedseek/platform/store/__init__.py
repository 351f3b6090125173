"""Platform state: the SQL database, privacy ledger, institutions, checkpoints, resume, settings, migrations."""
