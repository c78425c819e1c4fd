"""The ground floor: settings, errors, event names and shared constants.

Imports nothing else of sftflow; every other layer may import it (see docs/architecture.md).
"""
