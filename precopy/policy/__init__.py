"""Decisions as plain code: when to switch over, the downtime cap, admission of migrations."""
