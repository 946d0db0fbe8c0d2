"""The one exception type users see: launchers print its message without a traceback."""


class UserError(Exception):
    """Bad input (config, data, model path): the message says what, where and what is allowed."""
