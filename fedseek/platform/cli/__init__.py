"""The `fedseek` command line: every subcommand and the shared console/fail helper."""
