"""Checks that would otherwise fail late, run before any model is loaded: `multitune preflight`.

``multitune train`` runs the same checks first and stops listing every failure at once.
"""
