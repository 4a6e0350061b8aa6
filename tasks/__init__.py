"""Prefect tasks: thin wrappers that call the shardeval library."""
