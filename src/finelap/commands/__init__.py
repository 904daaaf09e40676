"""CLI subcommands; see finelap.cli.COMMANDS."""
