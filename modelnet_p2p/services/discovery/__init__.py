"""services/discovery."""
