"""``python -m shardeval`` runs the command line."""

from shardeval.cli import main

main()
