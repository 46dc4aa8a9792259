"""The benchmark harness: `promptseg eval ...` runs and `promptseg bench ...` tools."""
