"""Example third-party fedlight plugin package."""
