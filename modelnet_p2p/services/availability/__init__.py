"""services/availability."""
