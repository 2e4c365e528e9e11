"""fanout's orchestrator: builds the chord, sends it, waits for the fan-in, shows it."""
