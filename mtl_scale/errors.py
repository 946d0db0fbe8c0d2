"""The one exception type users see: launchers print its message without a traceback."""


class UserError(Exception):
    """Bad input (config, data, model path): the message says what, where and what is allowed."""


class TrainingAborted(UserError):
    """Training cannot go on (e.g. non-finite losses step after step); every rank raises it together."""
