"""Domains: for each, the NumPyro task likelihood, a task generator matching the model, and the
closed forms where they exist.  Installed as ``hiermeta.models`` (``from hiermeta.models import
linear``); the rest of the library never imports it."""
