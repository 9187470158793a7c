"""Files on disk: atomic writes and atomic Lightning checkpoints.
"""
