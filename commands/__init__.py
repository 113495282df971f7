"""The `fl-lab` commands: the top layer, the only one that imports every other package."""
