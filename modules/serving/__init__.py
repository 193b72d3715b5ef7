"""Serving: ranking models exported for inference (AOTInductor bundles) and what a request needs to be scored."""
