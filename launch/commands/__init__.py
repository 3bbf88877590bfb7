"""User commands that are not stages: ``rnnpipe sample``, ``evaluate``, ``plot`` and the
first-contact job's probe. Imports the rooms below it.
"""
