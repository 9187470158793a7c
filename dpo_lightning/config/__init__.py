"""Every check of a composed config, before any model loads; ``ConfigError`` says what to do instead.
"""
