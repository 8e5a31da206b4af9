"""The one error type users see: a message that names the problem and the fix."""


class QuanttreeError(Exception):
    """Bad input or an unusable environment; the message says what to do."""
