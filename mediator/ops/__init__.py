"""Operating a deployment: the status reader and recovery after Redis lost data."""
