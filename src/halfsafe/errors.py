"""The one exception type users see: a one-line message that says what to do."""


class HalfsafeError(Exception):
    """A bad input or an unmet requirement.

    The message is a single line: what was wrong, the value, what it means and what to do.
    The command line prints it without a traceback and exits with `exit_code`.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
