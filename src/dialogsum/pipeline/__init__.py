"""Pipelines: the parent/child orchestration (`orchestrator`) and the report and matrix built from the store
(`report`)."""
