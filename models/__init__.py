"""Domains: for each, the NumPyro task likelihood, a task generator matching the model, and the
closed forms where they exist.  The library (``hiermeta``) never imports this package."""
