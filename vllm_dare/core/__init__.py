"""Engine-core side of the plugin (scheduling)."""
