"""Upstage's Solar chat API: the HTTP client (`client`), the persistent answer cache (`cache`) and the tracked
evaluation (`evaluation`)."""
