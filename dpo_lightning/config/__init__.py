"""Every check of a composed config, before any model loads; ``ConfigError`` says what to do instead.

``validate_config(cfg, training=...)`` (``validate.py``) is the entry; the checks live by area beside it.
"""
