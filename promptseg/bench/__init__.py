"""The benchmark harness: `promptseg eval ...` runs and `promptseg bench ...` tools (spec §5)."""
