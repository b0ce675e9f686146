"""The record of measurements (results/, LOG.md, targets.json) and the probes that made some of them."""
