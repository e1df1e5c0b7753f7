"""fastssl's exceptions; this module imports nothing of fastssl, so any module can raise them."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""
