"""The one exception type the command line turns into a one-line message."""


class Da3Error(Exception):
    """A user-facing error: bad input, a missing package, a file that cannot be read.

    The message is one line that names the file or thing at fault and the problem. The
    command line prints it as ``da3: error: <message>`` and exits with status 2, without a
    traceback. Library callers can catch it like any exception.
    """
